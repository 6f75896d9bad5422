"""cddrec-serve in operation (real subprocesses, torch blocked): backpressure (503), SIGTERM drains what is in
flight and exits 0, and model versions reload atomically under load (HTTP and SIGHUP; a broken version is
refused and the old one keeps serving)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from serve_helpers import ServerProcess

from cddrec.runtime.recommender import Recommender

aiohttp = pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def keys(trained_tiny_onnx):
    return [int(k) for k in Recommender.load(trained_tiny_onnx, threads=1).info.vocab.keys]


def _burst(url: str, bodies: list) -> list[tuple[int, dict, dict]]:
    async def one(session, body):
        async with session.post(url + "/v1/recommend", json=body) as r:
            return r.status, dict(r.headers), await r.json()

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(bodies)),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await asyncio.gather(*(one(session, b) for b in bodies))

    return asyncio.run(main())


def test_overload_gets_503_with_retry_after_and_the_rest_are_served(trained_tiny_onnx, keys):
    server = ServerProcess(["--model", trained_tiny_onnx, "--threads", "1", "--max-batch", "8", "--max-queue", "8",
                            "--max-wait-ms", "100", "--access-log"])
    try:
        bodies = [[{"user": f"{r}-{u}", "history": keys[u:u + 5]} for u in range(8)] for r in range(40)]
        answers = _burst(server.url, bodies)
        statuses = [s for s, _, _ in answers]
        assert 503 in statuses and 200 in statuses, statuses
        for status, headers, body in answers:
            if status == 503:
                assert headers["Retry-After"] == "1" and "--max-queue 8" in body["error"]
            else:
                assert status == 200 and len(body) == 8 and all(len(x["items"]) == 10 for x in body)
        status, body = server.json("/v1/recommend", {"user": "after", "history": keys[:3]})
        assert status == 200 and body["user"] == "after"
        assert server.metric("cddrec_rejected_total") == statuses.count(503)
    finally:
        assert server.stop() == 0
    access = [json.loads(x) for x in server.lines if x.startswith("{")]
    assert len(access) >= 41 and {"path", "status", "ms", "method", "client"} <= set(access[0])
    assert sorted(a["status"] for a in access if a["path"] == "/v1/recommend")[-1] == 503


def test_sigterm_stops_accepting_answers_what_is_in_flight_and_exits_0(trained_tiny_onnx, keys):
    server = ServerProcess(["--model", trained_tiny_onnx, "--threads", "1"])
    rng = np.random.default_rng(3)
    heavy = [[{"user": u, "history": [keys[j] for j in rng.integers(0, len(keys), 2500)]} for u in range(200)]
             for _ in range(6)]  # about half a second of work each (less on a fast machine)
    done: list[tuple[float, int, int]] = []

    def send(body):
        req = urllib.request.Request(server.url + "/v1/recommend", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            done.append((time.time(), r.status, len(json.loads(r.read()))))

    threads = [threading.Thread(target=send, args=(b,)) for b in heavy]
    for t in threads:
        t.start()

    def started() -> float:  # accepted by the server: answered, or being answered
        return server.metric('cddrec_requests_in_flight{route="/v1/recommend"}') + \
            server.metric('cddrec_requests_total{route="/v1/recommend",status="200"}')

    server.wait_for(lambda: started() >= 6, timeout=60)
    signalled = time.time()
    server.send(signal.SIGTERM)
    for t in threads:
        t.join(120)
    code = server.stop()
    assert code == 0, server.output()
    assert sorted(s for _, s, _ in done) == [200] * 6 and all(n == 200 for _, _, n in done)
    assert max(t for t, _, _ in done) > signalled, "every request had finished before SIGTERM: nothing was drained"
    assert "stopped" in server.output() and "Traceback" not in server.output()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url + "/v2/health/live", timeout=5)


def _install(graph, folder, version: int, data: bytes | None = None) -> None:
    """Write a version as an exporter would: a temporary file, then a rename."""
    d = folder / str(version)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".model.onnx.tmp"
    if data is None:
        shutil.copyfile(graph, tmp)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, d / "model.onnx")


@pytest.mark.parametrize("processes", [1, 2])
def test_reload_under_load_drops_nothing_and_a_broken_version_leaves_the_old_one(trained_tiny_onnx, keys,
                                                                                  tmp_path, processes):
    """With several worker processes, a load through one worker's route reaches the others (the
    supervisor passes it on as SIGHUP), and SIGHUP to the supervisor reaches every worker."""
    folder = tmp_path / "recs"
    _install(trained_tiny_onnx, folder, 1)
    server = ServerProcess(["--model", folder, "--threads", "1", "--workers", processes])
    reloads = 'cddrec_model_reloads_total{result="ok"}'

    stop = threading.Event()
    seen: list[tuple[int, str]] = []

    def load_loop(w: int) -> None:
        ids = [[0] * 4 + [1 + (w + j) % 40 for j in range(4)]]
        v2 = {"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 8], "data": ids[0]}]}
        i = 0
        while not stop.is_set():
            i += 1
            if i % 2:
                status, body = server.json("/v2/models/recs/infer", v2)
                seen.append((status, body.get("model_version", body.get("error"))))
            else:
                status, body = server.json("/v1/recommend", {"user": i, "history": keys[w:w + 6]})
                seen.append((status, "keys" if status == 200 else body.get("error")))

    workers = [threading.Thread(target=load_loop, args=(w,)) for w in range(4)]
    for t in workers:
        t.start()
    try:
        time.sleep(0.5)
        _install(trained_tiny_onnx, folder, 2)
        assert server.json("/v2/models/recs/versions/1/ready")[0] == 200
        status, body = server.json("/v2/repository/models/recs/load", {})
        assert (status, body) == (200, {"name": "recs", "version": "2"})
        server.wait_for(lambda: server.metric(reloads) == processes)  # the other workers follow
        time.sleep(0.5)
        _install(trained_tiny_onnx, folder, 3, b"this is not a graph")
        status, body = server.json("/v2/repository/models/recs/load", {})
        assert status == 400 and "version 2 keeps serving" in body["error"] and "recs/3/model.onnx" in body["error"]
        assert server.json("/v2/models/recs")[1]["versions"] == ["2"]
        time.sleep(0.3)
        shutil.rmtree(folder / "3")
        _install(trained_tiny_onnx, folder, 4)
        server.send(signal.SIGHUP)
        server.wait_for(lambda: server.metric(reloads) == 2 * processes and server.metric("cddrec_model_version") == 4)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in workers:
            t.join(60)
    bad = [s for s in seen if s[0] != 200]
    assert not bad, bad[:5]
    versions = [v for _, v in seen if v != "keys"]
    assert versions[0] == "1" and versions[-1] == "4" and "2" in versions and len(seen) > 50
    assert server.metric('cddrec_model_reloads_total{result="ok"}') == 2 * processes  # each loaded 2 and 4
    assert server.metric('cddrec_model_reloads_total{result="failed"}') == 1  # the worker asked for 3 only
    assert server.metric("cddrec_model_version") == 4
    assert server.stop() == 0


def test_ray_errors_are_one_line_before_anything_starts(tmp_path, trained_tiny_onnx):
    """A Ray head that does not answer and a graph that does not load are one line each (no minutes of Ray
    retries, no traceback from inside a replica), for cddrec-serve --ray and cddrec-infer --ray alike."""
    from click.testing import CliRunner

    from cddrec.app.infer import main as infer_main
    from cddrec.app.serve import main as serve_main

    bad = tmp_path / "bad.onnx"
    bad.write_text("not a graph")
    req = tmp_path / "r.jsonl"
    req.write_text('{"user": "u", "history": [1]}\n')
    cases = [(serve_main, ["--model", str(trained_tiny_onnx), "--ray", "127.0.0.1:1"], "no Ray head answers"),
             (serve_main, ["--model", str(bad), "--ray", "local"], "cannot load it as a graph"),
             (infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(req), "-o", str(tmp_path / "out"),
                           "--ray", "127.0.0.1:1"], "no Ray head answers")]
    for main, args, says in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output
        assert len([x for x in r.output.splitlines() if x.startswith("Error:")]) == 1, r.output


def test_a_port_another_server_claims_while_the_model_loads_is_a_one_line_error(trained_tiny_onnx, monkeypatch):
    """Two servers started at once may both bind the port (SO_REUSEADDR, neither listening yet); the one that
    listens second gets the one-line error, not uvicorn's tracebacks."""
    import socket

    from cddrec.errors import ConfigError
    from cddrec.runtime.server import standalone
    from cddrec.runtime.server.app import ServerConfig

    ours = standalone.bind("127.0.0.1", 0)  # bound, not listening: as after our own bind()
    port = ours.getsockname()[1]
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", port))  # allowed: neither listens yet
    other.listen()  # the other server gets there first
    monkeypatch.setattr(standalone, "bind", lambda host, p: ours)
    try:
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: .*in use.*choose another --port"):
            standalone.serve(ServerConfig(str(trained_tiny_onnx)), "127.0.0.1", port, echo=lambda m: None)
    finally:
        ours.close()
        other.close()
