"""cddrec-serve --workers N: several server processes on one port (real subprocesses, torch blocked in the
supervisor and never loaded by a worker): answers equal the Recommender's, metrics add up over the workers,
SIGTERM drains all and exits 0, a worker that dies stops the server with one line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import ServerProcess

from cddrec.runtime.recommender import Recommender

aiohttp = pytest.importorskip("aiohttp")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _workers_of(pid: int) -> list[int]:
    """The worker processes of a supervisor (its spawned children, not multiprocessing's resource tracker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"resource_tracker" not in cmdline:
            out.append(int(stat.parent.name))
    return sorted(out)


def _affinity_of_every_thread(pid: int) -> set[int]:
    """The cores a process's threads may run on (the engine's and the event loop's alike): one set for all."""
    sets = {frozenset(os.sched_getaffinity(int(t.name))) for t in Path(f"/proc/{pid}/task").iterdir()}
    assert len(sets) == 1, sets
    return set(next(iter(sets)))


def _burst(url: str, bodies: list) -> list[tuple[int, dict]]:
    async def one(session, body):
        async with session.post(url + "/v1/recommend", json=body) as r:
            return r.status, await r.json()

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(bodies), force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await asyncio.gather(*(one(session, b) for b in bodies))

    return asyncio.run(main())


@pytest.fixture(scope="module")
def rec(trained_tiny_onnx):
    return Recommender.load(trained_tiny_onnx, threads=1)


def test_workers_answer_as_the_recommender_and_their_metrics_add_up(trained_tiny_onnx, rec):
    server = ServerProcess(["--model", trained_tiny_onnx, "--workers", "2", "--instances", "1", "--threads", "1",
                            "--idle-poll-ms", "0", "--access-log", "--pin"])
    cores = os.sched_getaffinity(0)
    pinned = len(cores) >= 2  # --pin: each worker bound to its share of the cores (not with more workers than cores)
    try:
        assert ("2 worker processes (each bound to its share of the cores) x" if pinned else "2 worker processes x")\
            + " 1 engine instance(s) x 1 thread(s)" in server.output()
        workers = _workers_of(server.proc.pid)
        assert len(workers) == 2
        shares = [_affinity_of_every_thread(pid) for pid in workers]
        if pinned:  # disjoint, as even as can be, every core used
            assert not shares[0] & shares[1] and shares[0] | shares[1] == cores, (shares, cores)
            assert abs(len(shares[0]) - len(shares[1])) <= 1
        else:
            assert shares == [cores, cores]
        assert _affinity_of_every_thread(server.proc.pid) == cores  # the supervisor bound none of its own
        for pid in workers:  # serving never loads torch, in a worker either
            assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
        keys = [int(k) for k in rec.info.vocab.keys]
        bodies = [{"user": i, "history": keys[i % 30:i % 30 + 3 + i % 5]} for i in range(120)]
        answers = _burst(server.url, bodies)  # a connection each: the kernel spreads them over the workers
        want = rec.recommend([b["history"] for b in bodies])
        for (status, got), w in zip(answers, want):
            assert status == 200 and got["items"] == list(w.items), got
        # every worker's counts, whichever worker answers the scrape
        assert server.metric('cddrec_requests_total{route="/v1/recommend",status="200"}') == 120
        assert server.metric("cddrec_engine_instances") == 2
        assert server.metric("cddrec_batch_size_sum") == 120
        status, config = server.json(f"/v2/models/{Path(trained_tiny_onnx).stem}/config")
        assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]  # 1 per worker
        assert config["parameters"]["workers"] == {"string_value": "2"}
        assert config["parameters"]["pinned"] == {"string_value": str(pinned).lower()}
    finally:
        code = server.stop()
    assert code == 0, server.output()
    assert "cddrec-serve: stopped" in server.output() and "Traceback" not in server.output(), server.output()
    assert server.output().count('"path":"/v1/recommend"') == 120  # --access-log: a JSON line per request
    assert not any(Path(f"/proc/{p}").exists() for p in workers)


def test_a_worker_that_dies_stops_the_server_with_one_line(trained_tiny_onnx):
    server = ServerProcess(["--model", trained_tiny_onnx, "--workers", "2", "--instances", "1", "--threads", "1"])
    workers = _workers_of(server.proc.pid)
    assert [_affinity_of_every_thread(p) for p in workers] == [os.sched_getaffinity(0)] * 2  # not bound by default
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    code = server.stop()
    out = server.output()
    assert code == 1 and f"(pid {victim}) was killed by SIGKILL; the server stopped" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, -15, "")])
def test_a_signal_before_the_workers_are_ready_stops_as_one_process_would(trained_tiny_onnx, sig, code, words):
    import subprocess

    from serve_helpers import BLOCK_TORCH

    proc = subprocess.Popen([sys.executable, "-c", BLOCK_TORCH + "from cddrec.app.serve import main\nmain()\n",
                             "--model", str(trained_tiny_onnx), "--workers", "2", "--instances", "1", "--threads", "1",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while len(_workers_of(proc.pid)) < 2 and time.monotonic() < deadline:  # both spawned (while they are, for a
        time.sleep(0.005)  # few milliseconds, SIGINT is ignored) ...
    time.sleep(0.05)  # ... and started; their imports take far longer, so the signal comes before they are ready
    proc.send_signal(sig)
    try:
        out = proc.communicate(timeout=60)[0]
    finally:  # a supervisor that ignored the signal must not outlive the test, nor its workers
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=30)
    assert proc.returncode == code and words in out and "Traceback" not in out and "ready at" not in out, out


@pytest.mark.parametrize("args, words", [(["--pin"], "use it with --workers N"),
                                         (["--workers", str(next(w for w in range(2, 65)
                                                                 if len(os.sched_getaffinity(0)) % w)), "--pin"],
                                          "cannot share the")])
def test_pin_that_cannot_bind_equal_shares_is_refused_in_one_line(trained_tiny_onnx, args, words):
    from click.testing import CliRunner

    from cddrec.app.serve import main

    r = CliRunner().invoke(main, ["--model", str(trained_tiny_onnx), "--port", "0", *args])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
