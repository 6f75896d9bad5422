"""GPU serving: batch buckets (pure numpy), the bucketed static-shape paths run on the CPU, device
placement of the unrolled module, the declared CUDA tolerance, and (marked gpu) ort-cuda /
ort-cuda-graph / torch-cuda parity against the fp32 reference on fresh random histories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cddrec.contract import GraphContract
from cddrec.errors import BackendUnavailable
from cddrec.export.graph import UnrolledRecommender
from cddrec.export.torch_cuda_graphs import BucketedModule
from cddrec.inference import reference_scores
from cddrec.parity import compare_topk
from cddrec.runtime.backends import load_backend
from cddrec.runtime.buckets import choose_bucket, fit_columns, fits_history, pad_rows, plan, run_bucketed

OUTPUTS = ["top_items", "top_scores", "user_embedding"]

BUCKETS = (1, 4, 16)


def _left_padded(rng, B, S, items, lens):
    ids = np.zeros((B, S), dtype=np.int64)
    for b, n in enumerate(lens):
        ids[b, S - n:] = rng.integers(1, items + 1, size=n)
    return ids


# ------------------------------------------------------------------ pure bucket logic
def test_choose_bucket_pad_and_fit():
    assert [choose_bucket(n, BUCKETS) for n in (1, 2, 4, 5, 16, 17)] == [1, 4, 4, 16, 16, None]
    ids = np.arange(1, 7, dtype=np.int64).reshape(2, 3)
    padded = pad_rows(ids, 4)
    assert padded.shape == (4, 3) and (padded[:2] == ids).all() and not padded[2:].any()
    with pytest.raises(ValueError):
        pad_rows(ids, 1)
    rng = np.random.default_rng(0)
    long = _left_padded(rng, 5, 9, 30, [1, 3, 4, 5, 9])
    assert fits_history(long, 4).tolist() == [True, True, True, False, False]
    assert (fit_columns(long, 4)[:3] == long[:3, -4:]).all()
    short = fit_columns(long[:, -2:], 5)  # left-padded with zeros up to the captured length
    assert short.shape == (5, 5) and not short[:, :3].any() and (short[:, 3:] == long[:, -2:]).all()


def test_plan_covers_every_row_once_and_run_bucketed_restores_order():
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 12, size=37)
    ids = _left_padded(rng, 37, 11, 50, lens)
    chunks = plan(ids, BUCKETS, history=6)
    rows = np.concatenate([c.rows for c in chunks])
    assert sorted(rows.tolist()) == list(range(37))
    assert all(c.bucket is None or len(c.rows) <= c.bucket for c in chunks)
    assert [c.bucket for c in chunks if c.bucket is None] == ([None] if (lens > 6).any() else [])
    seen = []

    def captured(bucket, x):  # row sums identify rows; padding rows sum to 0
        assert x.shape == (bucket, 6)
        seen.append(bucket)
        return {"s": x.sum(axis=1), "m": np.stack([x.max(axis=1), x.min(axis=1)], axis=1)}

    def uncaptured(x):
        return {"s": x.sum(axis=1), "m": np.stack([x.max(axis=1), x.min(axis=1)], axis=1)}

    out = run_bucketed(ids, BUCKETS, 6, captured, uncaptured)
    assert (out["s"] == ids.sum(axis=1)).all() and (out["m"][:, 0] == ids.max(axis=1)).all()
    assert set(seen) <= set(BUCKETS) and 16 in seen


# ------------------------------------------------- bucketed static-shape paths on the CPU
def _check_parity(got, ref_full, k, rtol=1e-5, atol=1e-4):
    ref_scores, ref_items = ref_full.topk(k, dim=1)
    p = compare_topk(got["top_items"], got["top_scores"], ref_items.numpy(), ref_scores.numpy(), ref_full.numpy(),
                     rtol=rtol, atol=atol)
    assert p.ok, p
    return p


def test_ort_static_buckets_match_reference(trained_tiny, trained_tiny_onnx):
    from cddrec.checkpoint import load_checkpoint

    model, _ = load_checkpoint(trained_tiny)
    be = load_backend(trained_tiny_onnx, "ort-cpu", buckets=BUCKETS, history=10)
    rng = np.random.default_rng(2)
    N = model.cfg.num_items
    for B, S in ((1, 8), (3, 8), (16, 12), (37, 10), (5, 30)):
        lens = rng.integers(1, S + 1, size=B)
        ids = _left_padded(rng, B, S, N, lens)
        got = be.infer({"item_ids": ids})
        assert got["top_items"].shape == (B, 10) and got["user_embedding"].shape == (B, model.cfg.hidden_size)
        full, _ = reference_scores(model, torch.from_numpy(ids))
        _check_parity(got, full, 10)
    assert set(be._static) <= set(BUCKETS) and 16 in be._static
    # outputs are the caller's own: a later request does not overwrite them
    a = be.infer({"item_ids": _left_padded(rng, 4, 8, N, [3] * 4)})
    keep = {k: v.copy() for k, v in a.items()}
    be.infer({"item_ids": _left_padded(rng, 4, 8, N, [8] * 4)})
    assert all((a[k] == keep[k]).all() for k in a)


def test_cuda_graph_options_need_cuda(trained_tiny_onnx):
    with pytest.raises(ValueError, match="cuda"):
        load_backend(trained_tiny_onnx, "ort-cpu", cuda_graph=True)


def test_bucketed_module_eager_path_matches_reference(trained_tiny):
    from cddrec.checkpoint import load_checkpoint

    model, _ = load_checkpoint(trained_tiny)
    module = UnrolledRecommender(model, 10).eval()
    runner = BucketedModule(module, module, "cpu", OUTPUTS, buckets=BUCKETS, history=9, capture=False)
    rng = np.random.default_rng(3)
    for B, S in ((2, 8), (20, 9), (6, 14)):
        ids = _left_padded(rng, B, S, model.cfg.num_items, rng.integers(1, S + 1, size=B))
        full, _ = reference_scores(model, torch.from_numpy(ids))
        _check_parity(runner(ids), full, 10)
    with pytest.raises(ValueError, match="CUDA"):
        BucketedModule(module, module, "cpu", OUTPUTS, buckets=(2,), history=4, capture=True).bucket(2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_torch_cuda_unavailable_on_cpu(trained_tiny):
    for name in ("torch-cuda", "torch-cuda-fp16"):
        with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
            load_backend(trained_tiny, name)


def test_unrolled_module_has_no_stray_device_tensors(tiny_model):
    """Every tensor the unrolled module holds is a registered parameter or buffer (moved by .to()),
    and it runs entirely on the 'meta' device: no constant is created on a fixed device (the
    cause of torch.compile's "aten.cat found two different devices cuda:0, cpu")."""
    module = UnrolledRecommender(tiny_model, 5).eval()
    for sub_name, sub in module.named_modules():
        registered = {id(t) for t in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False))}
        stray = [n for n, v in vars(sub).items() if isinstance(v, torch.Tensor) and id(v) not in registered]
        assert not stray, f"{sub_name or 'module'} holds unregistered tensors {stray}"
    meta = UnrolledRecommender(tiny_model, 5).eval().to("meta")
    ids = torch.randint(1, tiny_model.cfg.num_items + 1, (3, tiny_model.cfg.max_len + 2), device="meta")
    with torch.no_grad():
        items, scores, user = meta(ids)
    assert items.device.type == scores.device.type == user.device.type == "meta"
    assert tuple(items.shape) == (3, 5) and tuple(user.shape) == (3, tiny_model.cfg.hidden_size)


def test_gpu_tolerance_declared_and_round_trips():
    c = GraphContract(k=5, steps=4, hidden=16, max_len=8, num_items=50)
    assert c.tolerance_on("cpu") == c.tolerance
    rtol, atol = c.tolerance_on("cuda")
    assert rtol >= c.tolerance[0] and atol >= c.tolerance[1]
    half = GraphContract(k=5, steps=4, hidden=16, max_len=8, num_items=50, fp16=True)
    assert half.tolerance_on("cuda") == half.tolerance  # fp16's bound already covers the device
    back = GraphContract.from_metadata({**c.to_metadata(), "vocab": "{}"})
    assert back.tolerance_on("cuda") == (rtol, atol)
    custom = GraphContract(k=5, steps=4, hidden=16, max_len=8, num_items=50, gpu_rtol=1e-3, gpu_atol=2e-3)
    assert GraphContract.from_metadata(custom.to_metadata()).tolerance_on("cuda") == (1e-3, 2e-3)
    with pytest.raises(ValueError):
        c.tolerance_on("tpu")


def test_validation_report_names_devices(trained_tiny, tmp_path):
    from cddrec.export.onnx_export import cuda_available, export_model

    rep = export_model(trained_tiny, tmp_path / "m.onnx", k=5)
    assert rep.validated_on == (["cpu", "cuda"] if cuda_available() else ["cpu"])
    assert bool(rep.parity_cuda) == cuda_available()


# ------------------------------------------------------------------------ on a GPU
def _cuda_ort():
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed")


def _paper_like(tmp_path_factory):
    from cddrec.benchmarks.sizes import random_model

    d = tmp_path_factory.mktemp("gpu")
    return random_model(d / "m.pt", items=2000, hidden_size=64, steps=8, max_len=12, heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_ort_cuda_parity_and_graph_buckets(tmp_path_factory, fp16):
    """ort-cuda (uncaptured) and ort-cuda-graph (captured buckets, padded requests, long rows on the
    uncaptured path) against the fp32 reference with the contract's CUDA tolerance."""
    _cuda_ort()
    from cddrec.checkpoint import load_checkpoint
    from cddrec.export.onnx_export import export_model

    pt = _paper_like(tmp_path_factory)
    rep = export_model(pt, pt.with_suffix(".onnx"), k=10, fp16=fp16)
    assert rep.validated_on == ["cpu", "cuda"] and rep.parity_cuda
    model, _ = load_checkpoint(pt)
    rtol, atol = rep_contract(rep).tolerance_on("cuda")
    plain = load_backend(pt.with_suffix(".onnx"), "ort-cuda")
    graphs = load_backend(pt.with_suffix(".onnx"), "ort-cuda-graph", buckets=(1, 8, 64), history=12)
    rng = np.random.default_rng(5)
    for B, S in ((1, 12), (5, 12), (64, 12), (100, 12), (9, 40)):
        ids = _left_padded(rng, B, S, model.cfg.num_items, rng.integers(1, S + 1, size=B))
        full, _ = reference_scores(model, torch.from_numpy(ids))
        for be in (plain, graphs):
            for _ in range(3):  # first run captures, later runs replay
                got = be.infer({"item_ids": ids})
            p = _check_parity(got, full, 10, rtol, atol) if not fp16 else None
            if fp16:
                ref_scores, ref_items = full.topk(10, dim=1)
                p = compare_topk(got["top_items"], got["top_scores"], ref_items.numpy(), ref_scores.numpy(),
                                 full.numpy(), rtol=rtol, atol=atol)
                assert p.max_abs_diff <= p.tolerance and p.overlap >= 0.9, p


def rep_contract(rep) -> GraphContract:
    return GraphContract(**rep.contract)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch-cuda", "torch-cuda-fp16"])
def test_torch_cuda_parity(tmp_path_factory, name):
    """torch-cuda: captured buckets (padded), uncaptured long rows, against the fp32 reference."""
    from cddrec.checkpoint import load_checkpoint

    pt = _paper_like(tmp_path_factory)
    model, _ = load_checkpoint(pt)
    be = load_backend(pt, name, k=10, buckets=(1, 8, 64), history=12)
    c = be.contract
    rtol, atol = c.tolerance_on("cuda")
    rng = np.random.default_rng(6)
    for B, S in ((1, 12), (7, 12), (64, 12), (70, 12), (9, 40)):
        ids = _left_padded(rng, B, S, model.cfg.num_items, rng.integers(1, S + 1, size=B))
        full, _ = reference_scores(model, torch.from_numpy(ids))
        got = be.infer({"item_ids": ids})
        got = be.infer({"item_ids": ids})  # a replay
        ref_scores, ref_items = full.topk(10, dim=1)
        p = compare_topk(got["top_items"], got["top_scores"], ref_items.numpy(), ref_scores.numpy(), full.numpy(),
                         rtol=rtol, atol=atol)
        assert p.max_abs_diff <= p.tolerance, p
        if not c.fp16:
            assert p.ok, p
    assert be.runner._static and all(s.graph is not None for s in be.runner._static.values())


@pytest.mark.gpu
def test_torch_compile_on_cuda_model(tmp_path_factory):
    pt = _paper_like(tmp_path_factory)
    be = load_backend(pt, "torch-compile", k=10)
    assert next(be.module.parameters()).device.type == "cuda"
    ids = np.random.default_rng(7).integers(1, 2001, size=(4, 12))
    assert be.infer({"item_ids": ids})["top_items"].shape == (4, 10)


def test_infer_tf32_flag_only_for_ort_cuda(tmp_path, trained_tiny_onnx):
    from click.testing import CliRunner

    from cddrec.app.infer import main as infer_main

    req = tmp_path / "r.jsonl"
    req.write_text('{"user": "a", "history": ["1"]}\n')
    res = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(req), "--output",
                                          str(tmp_path / "o.jsonl"), "--backend", "ort-cpu", "--tf32"])
    assert res.exit_code != 0 and "--tf32 applies to ort-cuda" in res.output
