"""cddrec-serve --ray local: the same app on a Ray Serve replica behind Ray's HTTP proxy (one light test)."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from serve_helpers import ServerProcess

from cddrec.benchmarks.ports import free_port
from cddrec.runtime.recommender import Recommender

pytest.importorskip("ray.serve")
httpclient = pytest.importorskip("tritonclient.http")


def test_ray_serve_replica_answers_both_protocols_reloads_and_stops(trained_tiny_onnx):
    rec = Recommender.load(trained_tiny_onnx, threads=1)
    keys = [int(k) for k in rec.info.vocab.keys]
    server = ServerProcess(["--model", trained_tiny_onnx, "--ray", "local", "--replicas", "1", "--threads", "1"],
                           timeout=300, port=free_port())
    try:
        history = keys[3:9]
        status, body = server.json("/v1/recommend", {"user": "r", "history": history, "k": 4})
        assert status == 200, (body, server.output())
        assert body == {"user": "r", "items": rec.recommend([history], k=4)[0].items,
                                          "scores": body["scores"], "source": "model"}
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        ids = np.array([[0, 0] + [rec.info.vocab.id(k) for k in history]], dtype=np.int64)
        x = httpclient.InferInput("item_ids", list(ids.shape), "INT64")
        x.set_data_from_numpy(ids)
        res = client.infer(trained_tiny_onnx.stem, [x])
        assert res.as_numpy("top_items").tolist() == rec.backend.infer({"item_ids": ids})["top_items"].tolist()
        assert server.json("/v2/models/nope")[0] == 404
        server.send(signal.SIGHUP)  # every replica loads the newest version again
        server.wait_for(lambda: server.metric('cddrec_model_reloads_total{result="ok"}') == 1, timeout=120)
    finally:
        code = server.stop(timeout=180)
    assert code == 0, server.output()
    assert "stopped" in server.output()
