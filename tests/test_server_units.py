"""The server's parts in process: the dynamic batcher's rules, the KServe v2 codec as tritonclient builds and
reads it, merging rows of different widths, and the model folder layout."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest

from cddrec.contract import GraphContract
from cddrec.errors import ModelFileError
from cddrec.runtime.server.batcher import Batcher, BatchPolicy
from cddrec.runtime.server.models import model_source
from cddrec.runtime.server.protocol import ProtocolError, encode_infer_response, parse_infer, tensors_of
from cddrec.runtime.server.tensors import merge_feeds

CONTRACT = GraphContract(k=3, steps=2, hidden=4, max_len=5, num_items=20)


class Engine:
    """A runner that records its batches and can be held (the engine 'busy') or made to fail."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.release.set()
        self.fail_on = None

    def __call__(self, payloads):
        self.release.wait(10)
        self.batches.append(list(payloads))
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("engine exploded")
        return [ValueError(f"refused {p}") if p == "refuse" else f"done {p}" for p in payloads]


def run(coro):
    return asyncio.run(coro)


async def _started(engine: Engine, **policy) -> Batcher:
    b = Batcher({"a": engine, "b": engine}, BatchPolicy(**policy))
    b.start()
    return b


def test_a_lone_request_on_an_idle_engine_never_waits_for_the_timeout():
    async def main():
        b = await _started(Engine(), max_wait_s=2.0)
        t0 = time.perf_counter()
        assert await b.submit("a", "x", 1) == "done x"
        took = time.perf_counter() - t0
        await b.close()
        return took

    assert run(main()) < 1.0  # the batch window is 2 s


def test_requests_arriving_while_the_engine_runs_form_the_next_batches():
    engine = Engine()

    async def main():
        b = await _started(engine, max_batch=4, max_wait_s=0.05)
        engine.release.clear()  # the engine will be busy with the first batch
        first = asyncio.ensure_future(b.submit("a", 0, 1))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit("a", i, 1)) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        assert b.queued == 10
        engine.release.set()
        out = await asyncio.gather(first, *rest)
        await b.close()
        return out, b.stats

    out, stats = run(main())
    assert out == [f"done {i}" for i in range(11)]
    assert [len(x) for x in engine.batches] == [1, 4, 4, 2] and stats.batches == 4


def test_a_lone_single_user_request_runs_on_the_loop_thread_and_the_rest_on_workers():
    """``inline_single``: one user, nothing else queued, every worker idle: the loop's own thread;
    a request of two users, or one arriving while a worker is busy, goes to a worker."""
    threads, release = [], threading.Event()

    def engine(payloads):
        threads.append((threading.current_thread().name, list(payloads)))
        if "hold" in payloads:
            release.wait(5)
        return [f"done {p}" for p in payloads]

    async def main():
        b = Batcher({"a": engine}, BatchPolicy(max_wait_s=0, instances=2, inline_single=True))
        b.start()
        assert await b.submit("a", "one", 1) == "done one"
        assert await b.submit("a", "two users", 2) == "done two users"
        held = asyncio.ensure_future(b.submit("a", "hold", 2))  # two users: a worker
        await asyncio.sleep(0.05)
        assert b.running == 1
        assert await b.submit("a", "beside", 1) == "done beside"  # a worker is busy: not inline
        release.set()
        await held
        await b.close()

    run(main())
    where = {p[0]: name for name, p in threads}
    assert where["one"] == threading.main_thread().name
    assert where["two users"].startswith("engine") and where["beside"].startswith("engine")


@pytest.mark.parametrize("poll_s", [0.0, 0.5])
def test_after_a_lone_inline_request_the_dispatcher_polls_for_the_next_then_sleeps(poll_s):
    """``idle_poll``: the dispatcher keeps turning the loop (not asleep) for that long after a lone
    request ran inline, serves what arrives meanwhile, then sleeps."""
    threads = []

    def engine(payloads):
        threads.append(threading.current_thread().name)
        return [f"done {p}" for p in payloads]

    async def main():
        b = Batcher({"a": engine}, BatchPolicy(max_wait_s=0, instances=2, inline_single=True, idle_poll_s=poll_s))
        b.start()
        assert await b.submit("a", "one", 1) == "done one"
        await asyncio.sleep(0.02)
        polling = not b._sleeping
        assert await b.submit("a", "next", 1) == "done next"  # arrives during the poll (if any): served
        await asyncio.sleep(poll_s + 0.3)
        asleep_after = b._sleeping
        await b.close()
        return polling, asleep_after

    polling, asleep_after = run(main())
    assert polling is (poll_s > 0) and asleep_after
    assert threads == [threading.main_thread().name] * 2  # both lone requests ran on the loop's thread


def test_close_ends_a_poll_at_once():
    async def main():
        b = Batcher({"a": Engine()}, BatchPolicy(max_wait_s=0, instances=2, inline_single=True, idle_poll_s=30.0))
        b.start()
        assert await b.submit("a", "one", 1) == "done one"
        await asyncio.sleep(0.02)
        assert not b._sleeping  # polling, for 30 s
        t0 = time.perf_counter()
        await b.close()
        return time.perf_counter() - t0

    assert run(main()) < 5.0


class Held:
    """A runner whose batches each wait for their own release."""

    def __init__(self):
        self.gates: dict = {}
        self.events: list[str] = []
        self.started = threading.Semaphore(0)

    def gate(self, p) -> threading.Event:
        return self.gates.setdefault(p, threading.Event())

    def __call__(self, payloads):
        self.started.release()
        for p in payloads:
            self.gate(p).wait(5)
        self.events.append(f"ran {payloads}")
        return [f"done {p}" for p in payloads]


def test_instances_run_batches_side_by_side_and_a_retired_model_waits_for_every_one():
    """Two workers: a second batch starts while the first is held; ``after_running`` (how a reload
    closes the old model) waits until the last batch handed to the workers is done, not the first."""
    eng = Held()

    async def main():
        b = Batcher({"a": eng}, BatchPolicy(max_batch=1, max_wait_s=0, instances=2))
        b.start()
        first = asyncio.ensure_future(b.submit("a", 1, 1))
        second = asyncio.ensure_future(b.submit("a", 2, 1))
        for _ in range(2):  # both batches on the engine at once, neither released
            assert await asyncio.to_thread(eng.started.acquire, True, 5)
        assert b.running == 2 and b.busy
        retired = b.after_running(lambda: eng.events.append("closed"))
        eng.gate(1).set()
        assert await first == "done 1"
        await asyncio.sleep(0.05)
        assert "closed" not in eng.events  # the second batch still runs on the old model
        eng.gate(2).set()
        assert await second == "done 2"
        await retired
        await b.close()

    run(main())
    assert eng.events == ["ran [1]", "ran [2]", "closed"]


def test_several_workers_split_the_waiting_users_into_fair_shares():
    """One user runs on worker 1; 63 arrive meanwhile: worker 2 takes 32 (ceil(64 users / 2)), not all
    63, and the remaining 31 go to worker 1 once it frees; one worker alone would take them all."""
    def sizes(instances: int) -> list[int]:
        eng = Held()

        async def main():
            b = Batcher({"a": eng}, BatchPolicy(max_wait_s=0, instances=instances))
            b.start()
            first = asyncio.ensure_future(b.submit("a", 0, 1))
            assert await asyncio.to_thread(eng.started.acquire, True, 5)
            rest = [asyncio.ensure_future(b.submit("a", i, 1)) for i in range(1, 64)]
            await asyncio.sleep(0.05)
            eng.gate(0).set()  # worker 1 frees while worker 2 holds its batch
            await first
            await asyncio.sleep(0.05)
            for i in range(64):
                eng.gate(i).set()
            out = await asyncio.gather(first, *rest)
            await b.close()
            assert out == [f"done {i}" for i in range(64)]
            return sorted(b.stats.sizes)  # in the order they were answered

        return run(main())

    assert sizes(2) == [1, 31, 32]
    assert sizes(1) == [1, 63]


def test_a_freed_worker_waits_for_its_share_not_for_max_batch_users():
    """Both workers busy with 4 users each, 4 more queue; when one frees, its share (ceil((4 waiting + 4
    running) / 2) = 4) is already there, so the batch starts at once instead of waiting --max-wait (2 s)
    for 256 users."""
    eng = Held()

    async def main():
        b = Batcher({"a": eng}, BatchPolicy(max_wait_s=2.0, instances=2))
        b.start()
        a = asyncio.ensure_future(b.submit("a", "A", 4))
        held = asyncio.ensure_future(b.submit("a", "B", 4))
        for _ in range(2):
            assert await asyncio.to_thread(eng.started.acquire, True, 5)
        rest = [asyncio.ensure_future(b.submit("a", i, 1)) for i in range(4)]
        await asyncio.sleep(0.05)
        for i in ("A", 0, 1, 2, 3):
            eng.gate(i).set()
        t0 = time.perf_counter()
        out = await asyncio.gather(a, *rest)
        took = time.perf_counter() - t0
        assert not held.done()  # B still holds the other worker
        eng.gate("B").set()
        await held
        await b.close()
        return out, took

    out, took = run(main())
    assert out == ["done A"] + [f"done {i}" for i in range(4)]
    assert took < 1.0  # the window is 2 s


def test_one_worker_retires_on_its_own_thread_after_the_batches_handed_to_it():
    eng, where = Held(), []

    async def main():
        b = Batcher({"a": eng}, BatchPolicy(max_batch=1, max_wait_s=0))
        b.start()
        job = asyncio.ensure_future(b.submit("a", 1, 1))
        assert await asyncio.to_thread(eng.started.acquire, True, 5)
        retired = b.after_running(lambda: where.append(threading.current_thread().name))
        await asyncio.sleep(0.05)
        assert not where
        eng.gate(1).set()
        await job
        await retired
        await b.close()

    run(main())
    assert where and where[0].startswith("engine")


def test_close_answers_the_batches_running_on_every_worker():
    eng = Held()

    async def main():
        b = Batcher({"a": eng}, BatchPolicy(max_batch=1, max_wait_s=0, instances=3))
        b.start()
        jobs = [asyncio.ensure_future(b.submit("a", i, 1)) for i in range(5)]
        for _ in range(3):
            assert await asyncio.to_thread(eng.started.acquire, True, 5)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
        for i in range(5):
            eng.gate(i).set()
        await closing
        return await asyncio.gather(*jobs)

    assert run(main()) == [f"done {i}" for i in range(5)]


def test_kinds_batch_apart_and_keep_their_order():
    engine = Engine()

    async def main():
        b = await _started(engine, max_batch=8, max_wait_s=0)
        engine.release.clear()
        first = asyncio.ensure_future(b.submit("a", "a0", 1))
        await asyncio.sleep(0.05)
        jobs = [asyncio.ensure_future(b.submit(k, f"{k}{i}", 1)) for i in range(1, 4) for k in ("a", "b")]
        await asyncio.sleep(0.05)
        engine.release.set()
        await asyncio.gather(first, *jobs)
        await b.close()

    run(main())
    assert engine.batches == [["a0"], ["a1", "a2", "a3"], ["b1", "b2", "b3"]]


def test_a_full_queue_answers_503_with_retry_after_and_a_timeout_504():
    engine = Engine()

    async def main():
        b = await _started(engine, max_batch=2, max_queue=3, timeout_s=5.0)
        engine.release.clear()
        running = asyncio.ensure_future(b.submit("a", "run", 2))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(b.submit("a", "wait", 3))
        await asyncio.sleep(0.01)
        with pytest.raises(ProtocolError) as full:
            await b.submit("a", "over", 1)
        with pytest.raises(ProtocolError) as late:
            await b.submit("a", "late", 0, timeout_s=0.1)  # no room needed, but no answer in time
        assert b.queued == 3  # the timed-out job left the queue
        engine.release.set()
        got = await asyncio.gather(running, waiting)
        await b.close()
        return full.value, late.value, got

    full, late, got = run(main())
    assert full.status == 503 and full.headers["retry-after"] == "1" and "--max-queue 3" in full.message
    assert late.status == 504 and "100 ms" in late.message
    assert got == ["done run", "done wait"]
    assert all("late" not in batch for batch in engine.batches)


def test_an_engine_failure_fails_only_its_batch_and_is_logged_once(caplog):
    engine = Engine()
    engine.fail_on = "boom"

    async def main():
        b = await _started(engine, max_batch=2, max_wait_s=0)
        engine.release.clear()
        first = asyncio.ensure_future(b.submit("a", "x", 1))
        await asyncio.sleep(0.05)
        doomed = [asyncio.ensure_future(b.submit("a", p, 1)) for p in ("boom", "y")]
        after = [asyncio.ensure_future(b.submit("a", p, 1)) for p in ("z", "refuse")]
        await asyncio.sleep(0.01)
        engine.release.set()
        res = await asyncio.gather(first, *doomed, *after, return_exceptions=True)
        await b.close()
        return res

    with caplog.at_level(logging.ERROR, logger="cddrec.serve"):
        res = run(main())
    assert res[0] == "done x" and res[3] == "done z"
    assert all(isinstance(r, ProtocolError) and r.status == 500 and "engine exploded" in r.message for r in res[1:3])
    assert isinstance(res[4], ValueError) and "refused" in str(res[4])  # a job the runner refuses fails alone
    assert len([r for r in caplog.records if "engine failed" in r.getMessage()]) == 1


def test_close_runs_what_is_queued_and_refuses_new_requests():
    engine = Engine()

    async def main():
        b = await _started(engine, max_batch=1, max_wait_s=0)
        engine.release.clear()
        jobs = [asyncio.ensure_future(b.submit("a", i, 1)) for i in range(3)]
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.01)
        with pytest.raises(ProtocolError) as refused:
            await b.submit("a", "new", 1)
        engine.release.set()
        await closing
        return await asyncio.gather(*jobs), refused.value

    done, refused = run(main())
    assert done == ["done 0", "done 1", "done 2"] and refused.status == 503


# ------------------------------------------------------------------------------ protocol
def test_binary_request_and_response_round_trip_as_tritonclient_builds_and_reads_them():
    http = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    ids = np.array([[0, 3, 4, 5], [1, 2, 3, 20]], dtype=np.int64)
    inp = http.InferInput("item_ids", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    outs = [http.InferRequestedOutput("top_items"), http.InferRequestedOutput("top_scores", binary_data=False)]
    body, json_size = _get_inference_request([inp], "req-7", outs, 0, False, False, 0, 2500, None)
    req = parse_infer(body, str(json_size), CONTRACT, max_batch=8)
    assert req.rows == 2 and req.width == 4 and req.id == "req-7" and req.timeout_s == 0.0025
    np.testing.assert_array_equal(req.inputs["item_ids"], ids)
    assert req.outputs == [("top_items", True), ("top_scores", False)]
    top = {"top_items": np.array([[7, 8, 9], [1, 2, 3]], dtype=np.int64),
           "top_scores": np.array([[0.5, 0.25, 0.125], [3.0, 2.0, 1.0]], dtype=np.float32)}
    raw, headers = encode_infer_response("m", "2", req, top)
    res = http.InferResult.from_response_body(raw, header_length=int(headers["inference-header-content-length"]))
    np.testing.assert_array_equal(res.as_numpy("top_items"), top["top_items"])
    np.testing.assert_array_equal(res.as_numpy("top_scores"), top["top_scores"])
    assert res.get_response()["id"] == "req-7" and res.get_response()["model_version"] == "2"
    req.outputs = [("top_scores", False)]
    raw, headers = encode_infer_response("m", "2", req, top)  # all JSON: no header length
    assert "inference-header-content-length" not in headers
    np.testing.assert_array_equal(http.InferResult.from_response_body(raw).as_numpy("top_scores"), top["top_scores"])


@pytest.mark.parametrize("body,header,words", [
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}', "500",
     ["Inference-Header-Content-Length is 500"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}xyz', None,
     ["not valid JSON"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}abcdefgh', "85",
     ["8 bytes of binary data", "belong to no input"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 0], "data": []}]}', None,
     ["at least 1 item"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [-1]}]}', None,
     ["0..20", "-1"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1], '
     b'"parameters": {"shared_memory_region": "r"}}]}', None, ["shared memory"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}], '
     b'"outputs": [{"name": "top_items", "parameters": {"classification": 2}}]}', None, ["classification"]),
    # non-ASCII digits pass str.isdigit() but not int(): a 400, not a 500
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}', "\u00b2",
     ["Inference-Header-Content-Length must be an integer"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 3], "data": [0, 5, true]}]}', None,
     ["list of numbers"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": 5}]}', None,
     ["list of numbers"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1], "parameters": []}]}',
     None, ["'parameters' must be an object"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}], "outputs": []}', None,
     ["non-empty list", "leave it out"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}], '
     b'"outputs": [{"name": "top_items"}, {"name": "top_items"}]}', None, ["asked for twice"]),
    (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 1], "parameters": {"binary_data_size": 8}}]}'
     b'\x01\x00\x00\x00\x00\x00\x00\x00', None, ["needs the header Inference-Header-Content-Length"]),
])
def test_protocol_errors_name_the_field(body, header, words):
    with pytest.raises(ProtocolError) as e:
        parse_infer(body, header, CONTRACT, max_batch=8)
    assert e.value.status == 400
    for w in words:
        assert w in e.value.message


def test_a_repeated_binary_header_is_decoded_once_and_its_data_still_checked():
    """tritonclient sends one JSON header for every request of a shape: the second request with it takes
    the remembered plan, which must read the same arrays and refuse the same bad data as the full parse."""
    contract = GraphContract(k=3, steps=2, hidden=4, max_len=5, num_items=20, stochastic=False)
    head = (b'{"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [2, 3], '
            b'"parameters": {"binary_data_size": 48}}], "parameters": {"binary_data_output": true, "timeout": 7000}}')
    rng = np.random.default_rng()

    def body(ids: np.ndarray) -> bytes:
        return head + ids.astype("<i8").tobytes()

    plans = tensors_of(contract).plans
    for _ in range(5):  # the first parse remembers the plan; the others use it
        ids = rng.integers(0, 21, size=(2, 3))
        req = parse_infer(body(ids), str(len(head)), contract, max_batch=8)
        np.testing.assert_array_equal(req.inputs["item_ids"], ids)
        assert (req.rows, req.width, req.timeout_s, req.id) == (2, 3, 0.007, None)
        assert req.outputs == [(name, True) for name in contract.output_names]
        assert len(plans) == 1
    for bad, words in [(body(np.array([[1, 2, 3], [4, 5, 21]])), ["0..20", "21"]),
                       (body(np.array([[1, 2, 3], [-4, 5, 6]])), ["0..20", "-4"]),
                       (body(np.zeros((2, 3)))[:-8], ["48 bytes of binary data", "40"]),
                       (body(np.zeros((2, 3))) + b"\0" * 8, ["48 bytes of binary data", "56"])]:
        with pytest.raises(ProtocolError) as e:
            parse_infer(bad, str(len(head)), contract, max_batch=8)
        assert e.value.status == 400 and all(w in e.value.message for w in words), e.value.message
    with pytest.raises(ProtocolError, match="1..1"):  # the plan is per --max-batch
        parse_infer(body(np.ones((2, 3))), str(len(head)), contract, max_batch=1)


def test_rows_of_different_widths_are_left_padded_to_the_widest():
    feeds = [{"item_ids": np.array([[1, 2]])}, {"item_ids": np.array([[0, 3, 4, 5], [6, 7, 8, 9]])},
             {"item_ids": np.array([[9]])}]
    merged = merge_feeds(feeds, CONTRACT)["item_ids"]
    assert merged.tolist() == [[0, 0, 1, 2], [0, 3, 4, 5], [6, 7, 8, 9], [0, 0, 0, 9]]
    stochastic = GraphContract(k=3, steps=2, hidden=4, max_len=5, num_items=20, stochastic=True)
    noise = merge_feeds([{"item_ids": np.ones((1, 2), np.int64), "noise": np.zeros((2, 1, 4), np.float32)},
                         {"item_ids": np.ones((3, 2), np.int64), "noise": np.ones((2, 3, 4), np.float32)}],
                        stochastic)["noise"]
    assert noise.shape == (2, 4, 4) and noise[:, 0].sum() == 0 and noise[:, 1:].min() == 1  # (T, batch, d)


# -------------------------------------------------------------------------------- models
def test_model_folder_layouts(tmp_path):
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"x")
    assert model_source(graph).name == "m" and model_source(graph).newest() == (1, graph)
    repo = tmp_path / "repo"
    for v in (1, 2, 10):
        (repo / "recs" / str(v)).mkdir(parents=True)
        if v != 10:  # a version being copied: not yet a model
            (repo / "recs" / str(v) / "model.onnx").write_bytes(b"x")
    (repo / "recs" / "notes").mkdir()
    (repo / "recs" / "\u00b2").mkdir()  # isdigit() but not a number: not a version, not a crash
    (repo / "recs" / "\u00b2" / "model.onnx").write_bytes(b"x")
    for path in (repo / "recs", repo):  # the model folder, or the repository root holding it
        src = model_source(path)
        assert src.name == "recs" and sorted(src.versions()) == [1, 2]
        assert src.newest() == (2, repo / "recs" / "2" / "model.onnx")
    assert model_source(repo, name="other").name == "other"
    (repo / "second" / "1").mkdir(parents=True)
    with pytest.raises(ModelFileError, match="found 2 model folders"):
        model_source(repo)
    with pytest.raises(ModelFileError, match="no such file"):
        model_source(tmp_path / "missing")
    empty = tmp_path / "empty" / "1"
    empty.mkdir(parents=True)
    with pytest.raises(ModelFileError, match="no version folder holds model.onnx"):
        model_source(empty.parent).newest()


def test_a_k_beyond_the_graph_says_what_would_help():
    with pytest.raises(ValueError, match=r"k=10: this graph returns at most K=3 items; re-export with cddrec-export --k 10"):
        CONTRACT.check_k(10)
    with pytest.raises(ValueError, match="k=1000000000: .*; the catalogue has 20 items"):  # no re-export can give that
        CONTRACT.check_k(1_000_000_000)
    assert CONTRACT.check_k(None) == 3 and CONTRACT.check_k(2) == 2


def test_worker_core_shares_are_equal_and_keep_a_cores_hyperthreads_together(monkeypatch):
    from cddrec.runtime.server import standalone
    from cddrec.runtime.server.app import ServerConfig
    from cddrec.runtime.server.standalone import core_shares, pin_problem

    monkeypatch.setattr(standalone, "_topology_key", lambda cpu: (0, cpu, cpu))  # one package, no hyperthreads
    assert core_shares([0, 1], 2) == [(0,), (1,)]
    assert core_shares([2, 5, 6, 9], 1) == [(2, 5, 6, 9)]
    assert core_shares(list(range(8)), 4) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    # two packages of two cores with two hyperthreads each, numbered as Linux often does (siblings n, n+4)
    topo = {c: (c % 4 // 2, c % 2, c) for c in range(8)}
    monkeypatch.setattr(standalone, "_topology_key", topo.__getitem__)
    assert core_shares(list(range(8)), 2) == [(0, 1, 4, 5), (2, 3, 6, 7)]  # a package each
    assert core_shares(list(range(8)), 4) == [(0, 4), (1, 5), (2, 6), (3, 7)]  # a core (both threads) each
    # what --pin refuses, in one line each
    if hasattr(standalone.os, "sched_setaffinity"):
        assert pin_problem(2, [0, 1]) is None
        assert "--workers N" in pin_problem(1, [0, 1])
        assert "cannot share the 8 CPU(s)" in pin_problem(3, list(range(8)))
        assert "cannot share the 1 CPU(s)" in pin_problem(2, [0])
    monkeypatch.delattr(standalone.os, "sched_setaffinity", raising=False)
    assert "does not bind" in pin_problem(2, [0, 1])
    # a bound worker's engine layout comes from its own cores, not from every core divided again
    assert ServerConfig("m.onnx", workers=3, cpus=(0, 1, 2)).layout == (3, 1)
    assert ServerConfig("m.onnx", workers=3, cpus=(6, 7), threads=2).layout == (1, 2)
