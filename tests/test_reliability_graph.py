"""The raw graph treats invalid ids as padding and serves a batch of 0 (issue 13, item 12); graphs whose
metadata does not fit them are refused at load (issue 19 items 13, 16)."""

import numpy as np
import onnxruntime as ort
import pytest
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


# ------------------------------------------------- graphs whose metadata does not fit them
def _rewrite(src, dst, edit):
    import onnx

    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


def _rename_tensor(proto, old, new):
    for vi in list(proto.graph.input) + list(proto.graph.output):
        if vi.name == old:
            vi.name = new
    for node in proto.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]


def test_graph_with_other_tensor_names_is_refused_at_load_in_one_line(tmp_path, trained_tiny_onnx):
    """Issue 19 item 13: cddrec metadata on a graph with other input/output names gave a KeyError traceback."""
    from click.testing import CliRunner

    from cddrec.app.infer import main as infer_main
    from cddrec.errors import ModelFileError
    from cddrec.runtime.backends import load_backend

    for old, new in (("item_ids", "ids"), ("top_scores", "scores")):
        bad = _rewrite(trained_tiny_onnx, tmp_path / f"{new}.onnx", lambda p, o=old, n=new: _rename_tensor(p, o, n))
        with pytest.raises(ModelFileError, match=f"{new}.onnx: the graph does not match its cddrec metadata: "
                                                 "inputs/outputs .* re-export"):
            load_backend(bad, "ort-cpu")
        req = tmp_path / "r.jsonl"
        req.write_text('{"user": "a", "history": ["1"]}\n')
        r = CliRunner().invoke(infer_main, ["--model", str(bad), "--batch", str(req), "-o", str(tmp_path / "o.jsonl")])
        assert r.exit_code == 1 and "does not match its cddrec metadata" in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def _with_metadata(src, dst, **entries):
    def edit(proto):
        for p in proto.metadata_props:
            if p.key in entries:
                p.value = entries.pop(p.key)
        for key, value in entries.items():
            e = proto.metadata_props.add()
            e.key, e.value = key, value

    return _rewrite(src, dst, edit)


def test_vocab_file_must_be_a_file_name_beside_the_graph(tmp_path, trained_tiny):
    """Issue 19 item 16: metadata ``vocab_file`` "/etc/passwd" was opened."""
    import json

    from cddrec.errors import ModelFileError
    from cddrec.export.onnx_export import ExportOptions, export_model
    from cddrec.runtime.recommender import Recommender

    graph = tmp_path / "m.onnx"
    export_model(trained_tiny, graph, ExportOptions(k=5, vocab_sidecar=True))
    assert Recommender.load(graph).info.vocab.keys == json.loads((tmp_path / "m.vocab.json").read_text())["keys"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "v.json").write_text((tmp_path / "m.vocab.json").read_text())
    for name in ("/etc/passwd", str(tmp_path / "m.vocab.json"), "../m.vocab.json", "sub/v.json", "..", ""):
        bad = _with_metadata(graph, tmp_path / "bad.onnx", vocab_file=name)
        with pytest.raises(ModelFileError, match="metadata 'vocab_file' must be the name of a file beside the graph"):
            Recommender.load(bad)


def test_duplicate_vocabulary_keys_are_refused_at_load(tmp_path, trained_tiny_onnx):
    """Issue 19 item 16: two ids with one key would serve one of them under the other's name."""
    import json

    from cddrec.errors import ModelFileError
    from cddrec.export.metadata import read_metadata
    from cddrec.runtime.recommender import Recommender

    vocab = json.loads(read_metadata(trained_tiny_onnx)["vocab"])
    vocab["keys"][3] = vocab["keys"][1]
    bad = _with_metadata(trained_tiny_onnx, tmp_path / "dup.onnx", vocab=json.dumps(vocab))
    with pytest.raises(ModelFileError, match=f"repeats the item key {vocab['keys'][1]!r}"):
        Recommender.load(bad)
