"""Exported graphs: one item table, a minimum opset, relative tolerance, stochastic graphs served, small catalogues."""

import dataclasses
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
from cddrec.export.onnx_export import ExportOptions, contract_for, export_model, validate_graph
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
    rep = export_model(path, tmp_path / "m.onnx", ExportOptions(k=10, **options))
    assert len(_table_copies(tmp_path / "m.onnx", tiny_cfg.num_rows, tiny_cfg.hidden_size)) == 1
    assert rep.topk_mismatches == 0 or options.get("fp16")


def test_minimum_opset_is_checked(tmp_path, tiny_cfg):
    from cddrec.app.export import main as export_main

    path, _ = _ckpt(tmp_path / "m.pt", tiny_cfg)
    with pytest.raises(ExportError, match=f"needs opset {MIN_OPSET} or newer"):
        export_model(path, tmp_path / "m.onnx", ExportOptions(opset=MIN_OPSET - 1))
    r = CliRunner().invoke(export_main, [str(path), "--opset", "11"])
    assert r.exit_code == 2 and "--opset" in r.output and f">={MIN_OPSET}" in r.output, r.output
    rep = export_model(path, tmp_path / "m.onnx", ExportOptions(opset=MIN_OPSET))
    assert rep.contract["opset"] == MIN_OPSET


def test_relative_tolerance_accepts_large_scores_and_rejects_a_wrong_graph(tmp_path, tiny_cfg):
    # an item table scaled so scores reach ~1000: fp32 rounding is ~1e-4 absolute, well within rtol
    path, model = _ckpt(tmp_path / "big.pt", tiny_cfg, scale=120.0)
    rep = export_model(path, tmp_path / "big.onnx", ExportOptions(k=10))
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
        export_model(path, tmp_path / "m.onnx", ExportOptions(stochastic=True))
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


# ------------------------------------------------------ export checks what serving checks
def test_model_without_popularity_is_refused_at_export_with_its_cause(tmp_path, tiny_cfg):
    """Issue 19 item 10: it exported, then cddrec-infer said "popular_topk has 0 entries ...
    re-export the model", which cannot help."""
    path, _ = _ckpt(tmp_path / "m.pt", tiny_cfg)
    ck = torch.load(path, weights_only=True)
    del ck["popularity"]
    torch.save(ck, tmp_path / "nopop.pt")
    with pytest.raises(ExportError, match="nopop.pt: the model file has no item popularity counts"):
        export_model(tmp_path / "nopop.pt", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("sidecar", [False, True])
def test_vocabulary_shorter_than_the_catalogue_is_refused_at_export(tmp_path, tiny_cfg, sidecar):
    """Issue 19 item 10: a vocabulary shorter than num_items exported, then serving refused it."""
    torch.manual_seed(0)
    model = CDDRec(tiny_cfg).eval()
    save_checkpoint(tmp_path / "short.pt", model, Vocab.build(str(i) for i in range(tiny_cfg.num_items - 5)),
                    torch.arange(tiny_cfg.num_rows))
    with pytest.raises(ExportError, match=f"vocabulary of {tiny_cfg.num_items - 5} item keys but its model scores "
                                          f"{tiny_cfg.num_items} items"):
        export_model(tmp_path / "short.pt", tmp_path / "m.onnx", ExportOptions(vocab_sidecar=sidecar))
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.vocab.json").exists()


def test_export_and_serving_read_metadata_with_one_function(tmp_path, tiny_cfg, monkeypatch):
    """The check at export is serving's own reader (``contract.serving_info``), not a copy of it."""
    import cddrec.export.onnx_export as onnx_export
    from cddrec.contract import MetadataError

    path, _ = _ckpt(tmp_path / "m.pt", tiny_cfg)
    calls = []

    def refuse(meta, source, vocab_doc=None):
        calls.append(source)
        raise MetadataError(f"{source}: refused by serving", "something")

    monkeypatch.setattr(onnx_export, "serving_info", refuse)
    with pytest.raises(ExportError, match="would give a graph serving refuses .*refused by serving"):
        export_model(path, tmp_path / "m.onnx")
    assert calls and not (tmp_path / "m.onnx").exists()


def test_export_options_refuse_what_cannot_work():
    with pytest.raises(ExportError, match="--int8-scoring .* add --int8"):
        ExportOptions(int8_scoring=True)
    with pytest.raises(ExportError, match="exporter must be one of"):
        ExportOptions(exporter="tracer")
    with pytest.raises(ExportError, match="not with --fp16"):
        ExportOptions(int8=True, fp16=True)
    with pytest.raises(dataclasses.FrozenInstanceError):  # an options object is a value
        ExportOptions().k = 3


# ------------------------------------------------------ the graph's inputs and outputs
def _edit(src, dst, edit):
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


def test_validation_checks_axes_dtypes_and_sizes_not_only_names(tmp_path, tiny_cfg):
    """Issue 21 item 3: validation checked tensor names only."""
    path, model = _ckpt(tmp_path / "m.pt", tiny_cfg)
    export_model(path, tmp_path / "m.onnx", ExportOptions(k=10))
    contract = contract_for(model, 10)

    def rename_axis(p):  # what the dynamo exporter used to write
        for vi in list(p.graph.input) + list(p.graph.output):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param == "batch":
                    d.dim_param = "s42"

    def wrong_k(p):
        p.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 11

    def wrong_dtype(p):
        p.graph.output[2].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE

    for edit, message in ((rename_axis, "item_ids axis 0 is named 's42', not 'batch'"),
                          (wrong_k, "top_items axis 1 is 11, not K=10"),
                          (wrong_dtype, "user_embedding is float64, not float32")):
        bad = _edit(tmp_path / "m.onnx", tmp_path / f"{edit.__name__}.onnx", edit)
        with pytest.raises(ExportError, match=message):
            validate_graph(bad, model, contract)
    # serving: a graph whose axes carry other names loads, but not for static-shape buckets, which
    # fix batch and history by name (the override would silently do nothing)
    from cddrec.errors import ModelFileError
    from cddrec.runtime.backends import load_backend

    load_backend(tmp_path / "rename_axis.onnx", "ort-cpu")
    with pytest.raises(ModelFileError, match="axis 0 is named 's42', not 'batch'"):
        load_backend(tmp_path / "rename_axis.onnx", "ort-cpu", buckets=(1, 4))
