"""Exported graphs: one item table, a minimum opset, relative tolerance, stochastic graphs served, small catalogues."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cddrec.checkpoint import save_checkpoint
from cddrec.config import ModelConfig
from cddrec.contract import MIN_OPSET
from cddrec.errors import ExportError
from cddrec.export.onnx_export import contract_for, export_model, validate_graph
from cddrec.model import CDDRec
from cddrec.vocab import Vocab


def _ckpt(path, cfg, scale=0.5, seed=7):
    torch.manual_seed(seed)
    model = CDDRec(cfg).eval()
    with torch.no_grad():
        model.item_emb.weight.normal_(0, scale)
        if model.decoder is not None and getattr(model.decoder, "gate", None) is not None:
            model.decoder.gate.normal_()
    save_checkpoint(path, model, Vocab.build(str(100 + i) for i in range(cfg.num_items)), torch.arange(cfg.num_rows))
    return path, model


def _table_copies(path, rows, d):
    proto = onnx.load(str(path))
    return [i.name for i in proto.graph.initializer if int(np.prod(i.dims)) == rows * d]


@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"fp16": True}])
def test_every_graph_stores_the_item_table_once(tmp_path, tiny_cfg, options):
    path, _ = _ckpt(tmp_path / "m.pt", tiny_cfg)
    rep = export_model(path, tmp_path / "m.onnx", k=10, **options)
    assert len(_table_copies(tmp_path / "m.onnx", tiny_cfg.num_rows, tiny_cfg.hidden_size)) == 1
    assert rep.topk_mismatches == 0 or options.get("fp16")


def test_minimum_opset_is_checked(tmp_path, tiny_cfg):
    from cddrec.app.export import main as export_main

    path, _ = _ckpt(tmp_path / "m.pt", tiny_cfg)
    with pytest.raises(ExportError, match=f"needs opset {MIN_OPSET} or newer"):
        export_model(path, tmp_path / "m.onnx", opset=MIN_OPSET - 1)
    r = CliRunner().invoke(export_main, [str(path), "--opset", "11"])
    assert r.exit_code == 2 and "--opset" in r.output and f">={MIN_OPSET}" in r.output, r.output
    rep = export_model(path, tmp_path / "m.onnx", opset=MIN_OPSET)
    assert rep.contract["opset"] == MIN_OPSET


def test_relative_tolerance_accepts_large_scores_and_rejects_a_wrong_graph(tmp_path, tiny_cfg):
    # an item table scaled so scores reach ~1000: fp32 rounding is ~1e-4 absolute, well within rtol
    path, model = _ckpt(tmp_path / "big.pt", tiny_cfg, scale=120.0)
    rep = export_model(path, tmp_path / "big.onnx", k=10)
    # tolerance = atol + rtol * (largest |reference score|): scores of ~1000 give a tolerance of ~1e-2
    assert all(p["tolerance"] > 5e-3 for p in rep.parity.values()), rep.parity
    assert all(p["max_abs_diff"] <= p["tolerance"] for p in rep.parity.values())
    # the same graph validated against a model whose item table differs by 1e-3 relative: rejected
    wrong = CDDRec(model.cfg).eval()
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong.item_emb.weight.mul_(1.001)
    with pytest.raises(ExportError, match="score difference"):
        validate_graph(tmp_path / "big.onnx", wrong, contract_for(wrong, 10))


def test_stochastic_graph_is_served_end_to_end(tmp_path, tiny_cfg):
    from cddrec.app.export import main as export_main
    from cddrec.app.infer import main as infer_main

    path, _ = _ckpt(tmp_path / "m.pt", tiny_cfg)
    graph = tmp_path / "s.onnx"
    r = CliRunner().invoke(export_main, [str(path), "-o", str(graph), "--stochastic", "--k", "5"])
    assert r.exit_code == 0, r.output
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps({"user": u, "history": ["101", "102", str(100 + u)]}) + "\n" for u in range(9)))
    out = tmp_path / "recs.jsonl"
    r = CliRunner().invoke(infer_main, ["--model", str(graph), "--batch", str(req), "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 9 and all(len(x["items"]) == 5 for x in recs)
    assert all("101" not in x["items"] and "102" not in x["items"] for x in recs)


@pytest.mark.parametrize("variant", [{"steps": 1}, {"decoder": False}])
def test_stochastic_without_a_sampled_step_is_refused(tmp_path, tiny_cfg, variant):
    path, _ = _ckpt(tmp_path / "m.pt", tiny_cfg.replace(**variant))
    with pytest.raises(ExportError, match="--stochastic needs a model with a decoder and T >= 2"):
        export_model(path, tmp_path / "m.onnx", stochastic=True)
    assert not (tmp_path / "m.onnx").exists()


def test_small_catalogue_clamps_k_and_says_so(tmp_path):
    from cddrec.app.export import main as export_main
    from cddrec.runtime.backends import load_backend

    cfg = ModelConfig(num_items=3, hidden_size=8, num_heads=2, max_len=4, steps=2)
    path, _ = _ckpt(tmp_path / "three.pt", cfg)
    r = CliRunner().invoke(export_main, [str(path), "-o", str(tmp_path / "three.onnx")])  # default --k 10
    assert r.exit_code == 0, r.output
    assert "--k 10 exceeds the 3 items" in r.output and "K=3" in r.output
    for name, model in (("ort-cpu", tmp_path / "three.onnx"), ("torch", path)):
        be = load_backend(model, name, k=10)
        out = be.infer({"item_ids": np.array([[0, 0, 0, 1]])})
        assert out["top_items"].shape == (1, 3)
