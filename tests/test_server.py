"""cddrec-serve, started for real (a subprocess, torch blocked) on the --triton-repo layout of a tiny graph:
the KServe v2 protocol as tritonclient speaks it, the key route against cddrec-infer, dynamic batching under
200 concurrent requests, and bad requests answered with their 4xx while everyone else is served."""

from __future__ import annotations

import asyncio
import gzip
import json

import numpy as np
import pytest
from serve_helpers import ServerProcess

from cddrec.runtime.pipeline import run_batch
from cddrec.runtime.recommender import Recommender
from cddrec.runtime.triton_client import TritonClientCodec

httpclient = pytest.importorskip("tritonclient.http")
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def repo(tmp_path_factory, trained_tiny_onnx):
    from cddrec.export.triton import write_triton_repo

    return write_triton_repo(trained_tiny_onnx, tmp_path_factory.mktemp("repo"), gpu=False)


@pytest.fixture(scope="module")
def server(repo):
    # two engine instances: every test of this module runs on batches side by side
    proc = ServerProcess(["--model", repo.model_dir.parent, "--instances", "2", "--threads", "1", "--max-batch", "64",
                          "--max-body-bytes", MAX_BODY, "--idle-poll-ms", "0.5"])
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


@pytest.fixture(scope="module")
def rec(trained_tiny_onnx):
    return Recommender.load(trained_tiny_onnx, threads=1)


def random_histories(rec, n: int, seed: int, max_len: int = 20) -> list[list]:
    rng = np.random.default_rng(seed)
    keys = [int(k) for k in rec.info.vocab.keys]
    out = [[keys[j] for j in rng.integers(0, len(keys), int(rng.integers(1, max_len + 1)))] for _ in range(n)]
    out[1] = ["never-seen", 10**9]  # cold start: the popularity list
    out[2] = out[2] + ["unknown-item"]
    out[3] = []
    return out


def test_health_and_metadata_from_the_contract(server, rec):
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("cddrec")
    assert not c.is_model_ready("other")
    meta = c.get_model_metadata("cddrec")  # the model folder's name, as Triton names it
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "item_ids", "datatype": "INT64", "shape": [-1, -1]}]
    assert meta["outputs"][:2] == [{"name": "top_items", "datatype": "INT64", "shape": [-1, rec.info.K]},
                                   {"name": "top_scores", "datatype": "FP32", "shape": [-1, rec.info.K]}]
    assert meta["parameters"]["num_items"] == rec.contract.num_items and meta["parameters"]["L"] == rec.info.L
    assert c.get_model_metadata("cddrec", "1") == meta
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    config = c.get_model_config("cddrec")
    assert config["max_batch_size"] == 64 and config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert config["parameters"] == {"threads_per_instance": {"string_value": "1"},  # the fixture's --threads 1
                                    "idle_poll_ms": {"string_value": "0.5"}, "workers": {"string_value": "1"},
                                    "pinned": {"string_value": "false"}}
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 2000, "default_queue_policy": {
        "max_queue_size": 1024, "default_timeout_microseconds": 10_000_000}}  # the defaults
    assert c.get_model_repository_index() == [{"name": "cddrec", "version": "1", "state": "READY"}]
    assert server.json("/v2/models/cddrec/versions/7")[0] == 404


def test_tritonclient_program_returns_the_recommenders_items(server, repo, rec):
    """A program written for Triton and the --triton-repo model, unchanged: sidecar codec + tritonclient.http."""
    codec = TritonClientCodec.load(repo.sidecar)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    histories = random_histories(rec, 24, seed=5, max_len=3 * rec.info.L)  # wider than L too
    batch = codec.encode(histories)
    inp = httpclient.InferInput(codec.input_name, list(batch.item_ids.shape), "INT64")
    inp.set_data_from_numpy(batch.item_ids)
    want = rec.recommend(histories)
    for kwargs in ({}, {"request_compression_algorithm": "gzip"},
                   {"outputs": [httpclient.InferRequestedOutput("top_items", binary_data=False),
                                httpclient.InferRequestedOutput("top_scores", binary_data=True)]}):
        res = client.infer(codec.model_name, [inp], **kwargs)
        assert res.get_response()["model_version"] == "1"
        got = codec.decode(batch, res.as_numpy("top_items"), res.as_numpy("top_scores"))
        for g, w in zip(got, want):
            assert g["items"] == w.items and g["source"] == w.source
            np.testing.assert_allclose(g["scores"], w.scores, rtol=1e-5, atol=1e-5)
    one = httpclient.InferInput("item_ids", [1, 3], "INT64")
    one.set_data_from_numpy(np.array([[0, 1, 2]], dtype=np.int64), binary_data=False)  # JSON tensor data
    res = client.infer("cddrec", [one], model_version="1")
    assert res.as_numpy("top_items").shape == (1, rec.info.K) and res.as_numpy("user_embedding").shape[0] == 1
    assert res.as_numpy("top_items").tolist() == rec.backend.infer({"item_ids": np.array([[0, 1, 2]])})[
        "top_items"].tolist()


def test_recommend_route_equals_cddrec_infer(server, rec, tmp_path):
    histories = random_histories(rec, 40, seed=7)
    requests = [{"user": f"u{i}", "history": h} for i, h in enumerate(histories)]
    src = tmp_path / "req.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    run_batch(rec, src, tmp_path / "out.jsonl", k=6)
    want = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    status, got = server.json("/v1/recommend", [{**r, "k": 6} for r in requests])
    assert status == 200 and len(got) == len(want)
    status, single = server.json("/v1/recommend", {**requests[0], "k": 6})
    assert status == 200 and single == got[0]
    for g, w in zip(got, want):
        assert set(g) == {"user", "items", "scores", "source"}
        assert g["user"] == w["user"] and g["items"] == w["items"]
        np.testing.assert_allclose(g["scores"], w["scores"], atol=2e-6)
        assert g["source"] == w["source"]  # the same field and value as cddrec-infer's
    assert got[1]["source"] == got[3]["source"] == "popularity" and got[0]["source"] == "model"
    status, full = server.json("/v1/recommend", {"history": histories[0]})
    assert status == 200 and full["user"] is None and len(full["items"]) == rec.info.K


def test_200_concurrent_requests_are_answered_correctly_in_batches(server, rec):
    import aiohttp

    histories = random_histories(rec, 200, seed=9, max_len=2 * rec.info.L)
    want = rec.recommend(histories, k=5)
    known = [[rec.info.vocab.id(x) for x in h if rec.info.vocab.id(x)] for h in histories]
    enc = [np.array([[0] * (max(rec.info.L, len(h)) - len(h)) + h], dtype=np.int64) for h in known]  # widths vary
    batches_before = server.metric("cddrec_batch_size_count")

    async def one(session, i):
        if i % 2:  # half on the key route, half as tensors
            async with session.post(server.url + "/v1/recommend", json={"user": i, "history": histories[i], "k": 5}) as r:
                return r.status, await r.json()
        body = {"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": list(enc[i].shape),
                            "data": enc[i].ravel().tolist()}], "outputs": [{"name": "top_items"}]}
        async with session.post(server.url + "/v2/models/cddrec/infer", json=body) as r:
            return r.status, await r.json()

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
            return await asyncio.gather(*(one(session, i) for i in range(200)))

    answers = asyncio.run(main())
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        if i % 2:
            assert body["user"] == i and body["items"] == want[i].items
        elif known[i]:
            ids = [int(x) for x in body["outputs"][0]["data"]][:5]
            assert rec.mapper.keys(np.array(ids)).to_pylist() == want[i].items
    batches = server.metric("cddrec_batch_size_count") - batches_before
    assert 0 < batches < 200, f"{batches} batches for 200 requests: no request was batched with another"


def _v2(ids, datatype="INT64", shape=None, **extra) -> dict:
    arr = np.asarray(ids)
    t = {"name": "item_ids", "datatype": datatype, "shape": list(arr.shape) if shape is None else shape,
         "data": arr.ravel().tolist(), **extra}
    return {"inputs": [t]}


BAD = [  # (path, body or bytes, headers, status, words the error must hold)
    ("/v1/recommend", {"history": "abc"}, {}, 400, ["history", "list"]),
    ("/v1/recommend", {"history": [1, True]}, {}, 400, ["history", "entry 1", "bool"]),
    ("/v1/recommend", {"history": ["x" * 300]}, {}, 400, ["characters", "at most 256"]),
    ("/v1/recommend", {"user": [1], "history": []}, {}, 400, ["user"]),
    ("/v1/recommend", {"hist": [1]}, {}, 400, ["missing field 'history'"]),
    ("/v1/recommend", {"history": [1], "k": 1000}, {}, 400, ["k=1000", "at most K"]),
    ("/v1/recommend", [{"history": [1]}, 5], {}, 400, ["request 1", "object"]),
    ("/v1/recommend", b"{not json", {}, 400, ["not valid JSON"]),
    ("/v1/recommend", [{"history": [1]}] * 65, {}, 400, ["at most 64"]),
    ("/v1/recommend", {"history": list(range(40_000))}, {}, 413, ["over the limit", str(MAX_BODY)]),
    ("/v1/recommend", b"abc", {"Content-Encoding": "br"}, 415, ["Content-Encoding"]),
    ("/v2/models/cddrec/infer", _v2([[1, 2]], "INT32"), {}, 400, ["datatype", "INT64", "INT32"]),
    ("/v2/models/cddrec/infer", _v2([1, 2]), {}, 400, ["shape", "[2]", "[-1, -1]"]),
    ("/v2/models/cddrec/infer", _v2([[1, 2]], shape=[1, 3]), {}, 400, ["holds 2 values", "needs 3"]),
    ("/v2/models/cddrec/infer", _v2([[1, 10**6]]), {}, 400, ["ids must lie in 0..", "1000000"]),
    ("/v2/models/cddrec/infer", _v2([[1.5, 2]]), {}, 400, ["integers"]),
    ("/v2/models/cddrec/infer", {"inputs": [{"name": "ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}, {},
     400, ["unknown input 'ids'", "item_ids"]),
    ("/v2/models/cddrec/infer", {"inputs": []}, {}, 400, ["inputs"]),
    ("/v2/models/cddrec/infer", {**_v2([[1]]), "outputs": [{"name": "scores"}]}, {}, 400, ["unknown output"]),
    ("/v2/models/cddrec/infer", _v2([[1]] * 65), {}, 400, ["batch size 65", "1..64"]),
    ("/v2/models/cddrec/infer", json.dumps({"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, 2],
                                                        "parameters": {"binary_data_size": 8}}]}).encode() + bytes(8),
     {"Inference-Header-Content-Length": "95"}, 400, ["binary_data_size must be 16"]),
    ("/v2/models/other/infer", _v2([[1]]), {}, 404, ["unknown model 'other'", "cddrec"]),
    ("/v2/models/cddrec/versions/3/infer", _v2([[1]]), {}, 404, ["version '3'", "not loaded"]),
    ("/v3/nothing", None, {}, 404, ["no route"]),
    ("/v1/recommend/", {"history": [1]}, {}, 404, ["no route", "/v1/recommend/"]),  # not an empty 307
    ("/v1/recommend", gzip.compress(b'{"history": [1]}')[:-4], {"Content-Encoding": "gzip"}, 400, ["truncated gzip"]),
    ("/v1/recommend", gzip.compress(b'{"history": [1]}') + b"xx", {"Content-Encoding": "gzip"}, 400,
     ["2 bytes after the end"]),
    ("/v1/recommend", gzip.compress(b"{}") * 65, {"Content-Encoding": "gzip"}, 400, ["over 64 members"]),
    ("/v2/repository/models/cddrec/unload", {}, {}, 400, ["does not unload"]),
]


@pytest.mark.parametrize("path,body,headers,status,words", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_gets_its_4xx_and_the_next_good_one_is_served(server, path, body, headers, status, words):
    if isinstance(body, bytes) and "Inference-Header-Content-Length" in headers:
        headers = {**headers, "Inference-Header-Content-Length": str(body.index(b"}]}") + 3)}
    got, hdrs, raw = server.request(path, body, headers=headers)
    assert got == status, raw
    assert hdrs["content-type"] == "application/json"
    err = json.loads(raw)["error"]
    for w in words:
        assert w in err, err
    ok, answer = server.json("/v1/recommend", {"user": "next", "history": [1, 2, 3]})
    assert ok == 200 and answer["user"] == "next"


def test_wrong_method_and_gzip_body(server):
    status, body = server.json("/v1/recommend", method="GET")
    assert status == 405 and "method not allowed" in body["error"]
    status, headers, raw = server.request("/v2/health/ready", method="HEAD")  # as load balancers probe
    assert status == 200 and raw == b"" and int(headers["content-length"]) > 0
    raw = gzip.compress(json.dumps({"user": 1, "history": [1, 2]}).encode())
    status, _, out = server.request("/v1/recommend", raw, headers={"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(out)["user"] == 1
    raw = gzip.compress(b'{"user": 2, ') + gzip.compress(b'"history": [1, 2]}')  # two members (RFC 1952)
    status, _, out = server.request("/v1/recommend", raw, headers={"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(out)["user"] == 2


def test_metrics_count_requests_by_route_and_status(server):
    server.json("/v1/recommend", {"history": "bad"})
    server.json("/v1/recommend", {"history": [1]})
    _, _, raw = server.request("/metrics")
    text = raw.decode()
    assert 'cddrec_requests_total{route="/v1/recommend",status="400"}' in text
    assert 'cddrec_requests_total{route="/v1/recommend",status="200"}' in text
    assert 'cddrec_request_duration_seconds_bucket{le="0.005",route="/v1/recommend"}' in text
    assert 'cddrec_model_version{model="cddrec"} 1.0' in text and "cddrec_engine_instances 2.0" in text
    for name in ("cddrec_batch_size_bucket", "cddrec_queue_users", "cddrec_batch_duration_seconds_count",
                 "cddrec_requests_in_flight{route=\"/v1/recommend\"} 0.0"):
        assert name in text


def test_load_benchmark_reports_throughput_latency_batches_and_the_engine_alone(server, trained_tiny_onnx, tmp_path):
    from cddrec.benchmarks.serve_load import bench_serve

    table, paths = bench_serve(server.url, [1, 8, 64], 0.4, ["v2", "keys"], str(trained_tiny_onnx), 1, tmp_path,
                               "load", echo=lambda m: None)
    doc = json.loads((tmp_path / "load.json").read_text())
    assert doc["command"] and doc["commit"] and doc["server_model"]["name"] == "cddrec"
    rows = {(r["route"], r["concurrency"]): r for r in doc["results"]}
    assert set(rows) == {(r, c) for r in ("v2", "keys") for c in (1, 8, 64)}
    for r in rows.values():
        assert r["requests"] > 0 and r["errors"] == {} and r["p50_ms"] <= r["p99_ms"]
        assert r["mean_batch"] is not None and r["mean_batch"] >= 1 and 0 < r["engine_busy"] < 1.2
    assert rows[("v2", 1)]["mean_batch"] == pytest.approx(1.0, abs=0.05)  # one client: batches of one
    # ONNX Runtime alone timed around the steps it is compared with: batch 1 around c1, 256 around c64
    assert [rows[("v2", c)]["engine_near"] and rows[("v2", c)]["engine_near"]["batch"] for c in (1, 8, 64)] \
        == [1, None, 256]
    near = rows[("keys", 64)]["engine_near"]
    assert near["before"]["users_per_s"] > 0 and near["after"]["users_per_s"] > 0
    assert near["users_per_s"] == pytest.approx((near["before"]["users_per_s"] + near["after"]["users_per_s"]) / 2)
    ratio = doc["ratios"]["keys"]["c64_throughput_vs_ort_b256"]
    assert ratio == pytest.approx(rows[("keys", 64)]["requests_per_s"] / near["users_per_s"])
    assert "c1_p50_minus_ort_b1_p50_ms" in doc["ratios"]["v2"]
    # and in the server's engine layout (its instances and their threads, from its model config)
    instances = doc["server_model"]["instances"]
    assert (instances, doc["server_model"]["threads_per_instance"]) == (2, 1)  # the fixture's server
    assert ("layout" in near) == (instances > 1)
    if instances > 1:
        assert near["layout"]["callers"] == instances and near["layout"]["threads"] == 1
        assert near["layout"]["users_per_s"] > 0
        assert doc["ratios"]["keys"]["c64_throughput_vs_ort_layout_b256"] == pytest.approx(
            rows[("keys", 64)]["requests_per_s"] / near["layout"]["users_per_s"])
        assert "server's engine layout" in table
    assert "| v2 | 8 |" in table and str(tmp_path / "load.md") in paths


def test_load_benchmark_of_one_server_in_rounds_gives_each_rounds_ratios_and_their_medians(server, trained_tiny_onnx,
                                                                                            tmp_path):
    from cddrec.benchmarks.serve_load import bench_serve

    said = []
    table, paths = bench_serve(server.url, [1, 64], 0.3, ["v2"], str(trained_tiny_onnx), 1, tmp_path, "r",
                               echo=said.append, rounds=3)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["rounds"] == 3 and [(r["round"], r["concurrency"]) for r in doc["results"]] \
        == [(n, c) for n in (1, 2, 3) for c in (1, 64)]  # every step once per round, in turn
    by_round = doc["ratios_by_round"]
    assert len(by_round) == 3
    for n, d in enumerate(by_round, 1):  # each round's ratio from that round's own step and ORT timings
        step = next(r for r in doc["results"] if r["round"] == n and r["concurrency"] == 64)
        assert d["v2"]["c64_throughput_vs_ort_b256"] == pytest.approx(
            step["requests_per_s"] / step["engine_near"]["users_per_s"])
    median = doc["ratios"]["v2"]
    for key in ("c64_throughput_vs_ort_b256", "c64_p99_ms", "c1_p50_minus_ort_b1_p50_ms"):
        assert median[key] == pytest.approx(float(np.median([d["v2"][key] for d in by_round])))
    assert median["c1_target_met"] == (median["c1_p50_minus_ort_b1_p50_ms"] <= 0.5)
    assert "| median | v2 |" in table and "| 3 | v2 | 64 |" in table and any("round 3/3 v2" in m for m in said)
    # each step's figures: their median over the rounds
    for d in doc["medians"]:
        steps = [r for r in doc["results"] if r["concurrency"] == d["concurrency"]]
        for key in ("requests_per_s", "p50_ms", "p99_ms", "mean_batch"):
            assert d[key] == pytest.approx(float(np.median([r[key] for r in steps])))
    assert [d["concurrency"] for d in doc["medians"]] == [1, 64] and "Medians over the rounds" in table


def two_names(server) -> list[str]:
    """Two distinct URLs of the fixture's server (it listens on 127.0.0.1 only): localhost where it resolves to
    127.0.0.1, else 127.1 (the same address in inet_aton's short form)."""
    import socket

    port = int(server.url.rsplit(":", 1)[1])
    local = {a[4][0] for a in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
    return [server.url, f"http://{'localhost' if '127.0.0.1' in local else '127.1'}:{port}"]


def test_load_benchmark_compares_servers_in_interleaved_rounds(server, tmp_path, monkeypatch):
    """``--serve URL1,URL2 --rounds N``: every step on each server in turn, the first server rotating by
    round; medians over the rounds and per-round ratios against server 1, rounds and servers numbered from 1;
    servers of different models are refused."""
    from cddrec.benchmarks import serve_load
    from cddrec.benchmarks.serve_load import bench_serve

    order = []
    real_drive = serve_load.drive
    monkeypatch.setattr(serve_load, "drive", lambda url, *a: order.append(url) or real_drive(url, *a))
    urls = two_names(server)  # the same server under two names: two entries for the comparison's bookkeeping
    said = []
    table, paths = bench_serve([urls[0], urls[1] + "/"], [1, 8], 0.3, ["v2"], None, 1, tmp_path, "cmp",
                               echo=said.append, rounds=2)
    doc = json.loads((tmp_path / "cmp.json").read_text())
    assert doc["urls"] == urls and len(doc["results"]) == 8
    assert order == [urls[i] for i in (0, 1, 0, 1, 1, 0, 1, 0)]
    assert [r["server"] for r in doc["results"]] == [1, 2, 1, 2, 2, 1, 2, 1]  # round 2 starts with server 2
    assert [r["round"] for r in doc["results"]] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert said[0].startswith("8 steps (2 round(s) x 1 route(s) x 2 concurrency(ies) x 2 servers) of 0.3 s after "
                              "a 0.3 s warm-up: about 5 s")
    assert all(r["requests"] > 0 and r["errors"] == {} for r in doc["results"])
    assert doc["settings"][0] == "version 1, 2 instance(s) x 1 thread(s), max-wait 2 ms, idle-poll 0.5 ms"
    rows = {(d["concurrency"], d["server"]): d for d in doc["summary"]}
    assert set(rows) == {(c, s) for c in (1, 8) for s in (1, 2)}
    by = {(r["round"], r["concurrency"], r["server"]): r for r in doc["results"]}
    want = np.median([by[(n, 8, 2)]["requests_per_s"] / by[(n, 8, 1)]["requests_per_s"] for n in (1, 2)])
    assert rows[(8, 2)]["throughput_vs_first"] == pytest.approx(want)
    assert rows[(8, 2)]["median_p99_ms"] == pytest.approx(np.median([by[(n, 8, 2)]["p99_ms"] for n in (1, 2)]))
    assert "| v2 | 8 | 2 |" in table and f"- server 2: {urls[1]} (version 1, 2 instance(s)" in table
    assert "| median p99 ms |" in table
    assert str(tmp_path / "cmp.md") in paths and not list(tmp_path.glob("*.png"))  # no plot of a comparison

    real_model = serve_load.server_model
    other = {**real_model(server.url), "num_items": 7}
    monkeypatch.setattr(serve_load, "server_model", lambda url: other if "other" in url else real_model(url))
    with pytest.raises(ValueError, match="same model"):
        bench_serve([server.url, "http://other:1"], [1], 0.3, ["v2"], None, 1, tmp_path, "cmp2", echo=lambda m: None)
    for twice in ([server.url, server.url], [server.url, server.url + "/"]):
        with pytest.raises(ValueError, match="given twice"):
            bench_serve(twice, [1], 0.3, ["v2"], None, 1, tmp_path, "cmp4", echo=lambda m: None)
    assert not list(tmp_path.glob("cmp[234]*"))


@pytest.mark.parametrize("sig,code,word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_load_benchmark_stops_at_once_on_a_signal(server, tmp_path, sig, code, word):
    """SIGINT/SIGTERM during a load step: the clients stop at once (the event loop's signal handlers, not an
    exception raised inside a transport callback, which the loop would swallow as one more client error),
    one line, exit 130/143, no result written."""
    import signal
    import subprocess
    import sys
    import time

    batches = server.metric("cddrec_batch_size_count")
    proc = subprocess.Popen([sys.executable, "-m", "cddrec.app.bench", "--serve", server.url, "--concurrency", "8",
                             "--seconds", "5", "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server.wait_for(lambda: server.metric("cddrec_batch_size_count") > batches + 50)  # the load is on
        time.sleep(1.2)  # past the warm-up, into the measured window
        t0 = time.perf_counter()
        proc.send_signal(getattr(signal, sig))
        out, _ = proc.communicate(timeout=30)
        took = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == code, out
    assert out.strip().splitlines() == [word], out  # no traceback, no "never retrieved", no table
    assert took < 3, took  # not the rest of the 5 s step, nor the key route after it
    assert not list((tmp_path / "out").glob("*.json")) and not list((tmp_path / "out").glob("*.md"))


def test_load_benchmark_errors_name_the_server(server, tmp_path, monkeypatch):
    """An unreachable server, a URL that is no http(s) URL, a web server that is not cddrec-serve, one that
    never answers, a server given twice, an empty item and --rounds with one server: each one line that names
    the URL (usage errors exit 2, a server that cannot be benchmarked 1), before any load."""
    import http.server
    import socket
    import threading
    import time

    from click.testing import CliRunner

    from cddrec.app.bench import main
    from cddrec.benchmarks import serve_load

    monkeypatch.setattr(serve_load, "META_TIMEOUT", 0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once this socket is closed
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501 to everything
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections are taken by the kernel, never answered
    port = server.url.rsplit(":", 1)[1]
    web_url, silent_url = f"http://127.0.0.1:{web.server_address[1]}", f"http://127.0.0.1:{silent.getsockname()[1]}"
    cases = [([closed], 1, f"{closed}: cannot connect (Connection refused); is cddrec-serve running there?"),
             ([web_url + "/"], 1, f"{web_url}: not a cddrec-serve (POST /v2/repository/index answered 501)"),
             ([silent_url], 1, f"{silent_url}: no answer to POST /v2/repository/index within 0.5 s"),
             ([f"localhost:{port}"], 2, f"localhost:{port}: not an http(s)://HOST:PORT URL"),
             ([f"ftp://127.0.0.1:{port}"], 2, f"ftp://127.0.0.1:{port}: not an http(s)://HOST:PORT URL"),
             ([f"{server.url},{server.url}/"], 2, f"one server given twice ({server.url} and {server.url})"),
             ([f"{server.url},"], 2, "has an empty item"),
             ([f"{server.url},{two_names(server)[1]}", "--rounds", "0"], 2, "--rounds"),
             (["--rounds", "2"], 2, "--rounds repeats the load steps: give --serve URL")]
    try:
        for args, code, words in cases:
            t0 = time.perf_counter()
            r = CliRunner().invoke(main, ([] if args[0].startswith("--") else ["--serve"]) + args
                                   + ["--seconds", "0.3", "--concurrency", "1", "-o", str(tmp_path / "o")])
            errors = [x for x in r.output.splitlines() if x.startswith("Error:")]  # a usage error adds its usage
            assert r.exit_code == code and len(errors) == 1 and words in errors[0], (args, r.output)
            assert "Traceback" not in r.output and r.output.strip().splitlines()[-1] == errors[0], r.output
            assert time.perf_counter() - t0 < 5, args
    finally:
        web.shutdown()
        web.server_close()
        silent.close()
    assert not list((tmp_path / "o").glob("*.json"))


def test_load_benchmark_refuses_another_graph_and_a_reloaded_server(server, trained_tiny, tmp_path, monkeypatch):
    """--model must be the servers' graph (a key route with another graph's keys would time the popularity
    fallback), in both modes; a server whose model version changes during the run (a reload) stops it: its
    figures would mix two models."""
    from cddrec.benchmarks import serve_load
    from cddrec.benchmarks.serve_load import bench_serve
    from cddrec.export.onnx_export import ExportOptions, export_model

    other = tmp_path / "k5.onnx"  # the server's model, exported with another K: another graph
    export_model(trained_tiny, other, ExportOptions(k=5))
    order = []
    real_drive = serve_load.drive
    monkeypatch.setattr(serve_load, "drive", lambda url, *a: order.append(url) or real_drive(url, *a))
    for urls in ([server.url], two_names(server)):
        with pytest.raises(ValueError, match=rf"--model {other} is not the graph {server.url} serves: the graph has "
                                             r"K=5, the server K=10"):
            bench_serve(urls, [1], 0.3, ["keys"], str(other), 1, tmp_path, "g", echo=lambda m: None)
    assert order == []  # refused before any load

    real_model = serve_load.server_model
    asked: dict[str, int] = {}

    def reloaded(url: str) -> dict:  # the second server reloads (version 2, another K) during its first step
        asked[url] = asked.get(url, 0) + 1
        info = real_model(url)
        return {**info, "version": "2", "K": 5} if url != server.url and asked[url] > 1 else info

    monkeypatch.setattr(serve_load, "server_model", reloaded)
    name = two_names(server)[1]
    with pytest.raises(ValueError, match=rf"{name}: the server now serves cddrec version 2 \(K=5, L=8, \d+ items\), "
                                         r"not cddrec version 1 \(K=10"):
        bench_serve(two_names(server), [1, 8], 0.3, ["v2"], None, 1, tmp_path, "r", echo=lambda m: None)
    assert order == [server.url, name]  # stopped after the step where it changed
    asked.clear()
    order.clear()
    with pytest.raises(ValueError, match=rf"{name}: the server now serves cddrec version 2"):
        bench_serve(name, [1, 8], 0.3, ["v2"], None, 1, tmp_path, "r", echo=lambda m: None)
    assert order == [name]
    assert not list(tmp_path.glob("[gr].*"))


def test_command_errors_are_one_line(server, tmp_path):
    from click.testing import CliRunner

    from cddrec.app.serve import main

    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "m.onnx").write_bytes(b"not even read: the port is taken")
    for args, words in ((["--model", str(tmp_path / "missing.onnx"), "--port", "0"], "no such file"),
                        (["--model", str(tmp_path), "--port", "0"], "expected a model file"),
                        (["--model", str(tmp_path / "m.onnx"), "--port", port], "Address already in use"),
                        (["--model", str(tmp_path), "--replicas", "2"], "add --ray"),
                        (["--model", str(tmp_path), "--max-wait-ms", "nan"], "not a finite number"),
                        (["--model", str(tmp_path), "--timeout-ms", "inf"], "inf is not in the range"),
                        (["--model", str(tmp_path), "--timeout-ms", "1e300"], "0<x<=86400000"),  # /config in us
                        (["--model", str(tmp_path), "--idle-poll-ms", "1e9"], "0<=x<=1000"),
                        (["--model", str(tmp_path), "--backend", "torch", "--idle-poll-ms", "5"], "ort-cpu only"),
                        (["--model", str(tmp_path), "--workers", "2", "--ray", "local"], "--replicas"),
                        (["--model", str(tmp_path), "--model-name", "a/b"], "one path segment"),
                        (["--model", str(tmp_path), "--model-name", ""], "one path segment")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code in (1, 2) and words in r.output and "Traceback" not in r.output, r.output


def test_gpu_check_takes_the_port_cddrec_serve_got(trained_tiny_onnx, tmp_path):
    """The GPU check starts cddrec-serve with --port 0 and reads the port it got from its ready line
    (no port picked first that another process could take in between)."""
    import subprocess
    import sys
    import urllib.request

    from cddrec.benchmarks.gpu_bench import ready_url

    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cddrec.app.serve", "--model", str(trained_tiny_onnx),
                                 "--threads", "1", "--port", "0"], stdout=out, stderr=subprocess.STDOUT)
        try:
            url = ready_url(log, proc, 120)
            assert url is not None and not url.endswith(":0"), log.read_text()
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=10) as r:
                assert r.status == 200
        finally:
            proc.terminate()
            proc.wait(30)
    assert ready_url(log, proc, 5) is None  # an exited server: no URL, no wait
