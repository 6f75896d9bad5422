"""The raw graph treats invalid ids as padding and serves a batch of 0 (issue 13, item 12)."""

import numpy as np
import onnxruntime as ort
import torch

from cddrec.config import ModelConfig
from cddrec.export.onnx_export import build_graph, contract_for
from cddrec.inference import reference_topk
from cddrec.model import CDDRec
from cddrec.parity import compare_topk

N = 30


def _graph(tmp_path, open_gates):
    cfg = ModelConfig(hidden_size=16, num_heads=2, max_len=8, steps=3, num_items=N)
    torch.manual_seed(0)
    model = open_gates(CDDRec(cfg).eval())
    path = tmp_path / "g.onnx"
    build_graph(model, path, contract_for(model, 5), "torchscript")
    return model, ort.InferenceSession(str(path))


def test_invalid_ids_are_padding_in_the_graph_and_the_reference(tmp_path, open_gates):
    model, sess = _graph(tmp_path, open_gates)
    rng = np.random.default_rng(7)
    ids = rng.integers(1, N + 1, size=(9, 12))
    bad = ids.copy()
    where = rng.random(ids.shape) < 0.3
    bad[where] = rng.choice([-1, -2, -N - 2, 0, N + 1, N + 2, 10**6, -(2**62)], size=where.sum())
    clean = np.where(where, 0, ids)
    got = sess.run(None, {"item_ids": bad})
    want = sess.run(None, {"item_ids": clean})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
    ref_items, ref_scores, _ = reference_topk(model, torch.as_tensor(bad), 5)
    par = compare_topk(got[0], got[1], ref_items.numpy(), ref_scores.numpy())
    assert par.ok, par
    assert not np.isin(got[0], [0, N + 1]).any()  # the padding row and the mask token are never served


def test_batch_of_zero_users(tmp_path, open_gates):
    _, sess = _graph(tmp_path, open_gates)
    items, scores, user = sess.run(None, {"item_ids": np.zeros((0, 6), np.int64)})
    assert items.shape == (0, 5) and scores.shape == (0, 5) and user.shape == (0, 16)
