"""GPU serving: batch buckets (pure numpy), the bucketed static-shape paths run on the CPU, device
placement of the unrolled module, the declared CUDA tolerance, and (marked gpu) ort-cuda /
ort-cuda-graph / torch-cuda parity against the fp32 reference on fresh random histories."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from cddrec.contract import GraphContract
from cddrec.errors import BackendUnavailable
from cddrec.export.graph import UnrolledRecommender
from cddrec.export.onnx_export import contract_for
from cddrec.export.torch_cuda_graphs import BucketedModule
from cddrec.inference import reference_runner
from cddrec.parity import compare_runners
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
def _feeds(rng, shapes, items) -> dict:
    """Fresh left-padded histories of random lengths, one feed per (B, S), labelled "BxS"."""
    return {f"{B}x{S}": {"item_ids": _left_padded(rng, B, S, items, rng.integers(1, S + 1, size=B))}
            for B, S in shapes}


def test_ort_static_buckets_match_reference(trained_tiny, trained_tiny_onnx):
    from cddrec.checkpoint import load_checkpoint

    model, _ = load_checkpoint(trained_tiny)
    be = load_backend(trained_tiny_onnx, "ort-cpu", buckets=BUCKETS, history=10)
    rng = np.random.default_rng(2)
    N = model.cfg.num_items
    feeds = _feeds(rng, ((1, 8), (3, 8), (16, 12), (37, 10), (5, 30)), N)
    rep = compare_runners({"ort-cpu buckets": be.infer}, reference_runner(model), feeds,
                          **be.contract.parity_rule("cpu"))
    assert rep.ok, rep.failures()
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
    feeds = _feeds(np.random.default_rng(3), ((2, 8), (20, 9), (6, 14)), model.cfg.num_items)
    rep = compare_runners({"buckets": lambda feed: runner(feed["item_ids"])}, reference_runner(model), feeds,
                          **contract_for(model, 10).parity_rule("cpu"))
    assert rep.ok, rep.failures()
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


class HostCopies(TorchDispatchMode):
    """Records every op of a forward pass that makes a tensor from host data (``torch.tensor(...)``
    dispatches ``lift_fresh``) or copies between devices: what CUDA-graph capture forbids
    (cudaErrorStreamCaptureUnsupported). Device-side fills (zeros, arange, full_like) are fine."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("lift_fresh", "lift_fresh_copy"):
            self.found.append(f"{func}: a tensor made from host data")
        tensors_in = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        tensors_out = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        devices = {t.device.type for t in tensors_in + tensors_out}
        if len(devices) > 1 and any(t.dim() > 0 for t in tensors_in):  # a wrapped Python scalar is no copy
            self.found.append(f"{func}: tensors on {sorted(devices)}")
        return out


def host_copies(module, *args) -> list[str]:
    """The ops of ``module(*args)`` that copy host data, run on the CPU (``lift_fresh``) and on the
    meta device (where a CPU tensor among an op's arguments is a host tensor leaking into the
    device graph, e.g. an unregistered constant)."""
    found = []
    for device in ("cpu", "meta"):
        moved = module.to(device)
        moved_args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        mode = HostCopies()
        with torch.no_grad(), mode:
            moved(*moved_args)
        found += [f"{device}: {f}" for f in mode.found]
    return found


@pytest.mark.parametrize("variant", ["plain", "stochastic", "fp16", "fused", "fused-stochastic", "two-stage"])
def test_forward_makes_no_host_to_device_copy(tiny_model, variant):
    """Issue 21 item 1: the forward pass that torch-cuda captures builds nothing from host data (the
    masking rule's ``torch.tensor([0, N + 1], device=...)`` was a host-to-device copy)."""
    from cddrec.export.catalogue import TwoStageTopK
    from cddrec.export.fusion import FUSIONS, FusedRecommender

    stochastic = "stochastic" in variant
    if variant.startswith("fused"):
        module = FusedRecommender(tiny_model, 5, stochastic=stochastic, fusions=FUSIONS)
    else:
        module = UnrolledRecommender(tiny_model, 5, stochastic=stochastic, fp16=variant == "fp16")
    if variant == "two-stage":
        module = TwoStageTopK(module, 20)
    cfg = tiny_model.cfg
    args = [torch.randint(0, cfg.num_items + 1, (3, cfg.max_len + 2))]
    if stochastic:
        args.append(torch.randn(tiny_model.steps, 3, cfg.hidden_size))
    assert host_copies(module.eval(), *args) == []


def test_host_copy_check_catches_a_host_constant():
    """The check itself: a forward that builds a constant from host data is caught (by the CPU run:
    ``torch.tensor(..., device="meta")`` dispatches nothing)."""

    class Bad(torch.nn.Module):
        def forward(self, x):
            return x + torch.tensor([1.0, 2.0], device=x.device)

    assert host_copies(Bad(), torch.zeros(3, 2))


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
    from cddrec.export.onnx_export import ExportOptions, cuda_available, export_model

    rep = export_model(trained_tiny, tmp_path / "m.onnx", ExportOptions(k=5))
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
    uncaptured path) against the fp32 reference under the graph's CUDA rule (``parity_rule("cuda")``)."""
    _cuda_ort()
    from cddrec.checkpoint import load_checkpoint
    from cddrec.export.onnx_export import ExportOptions, export_model

    pt = _paper_like(tmp_path_factory)
    rep = export_model(pt, pt.with_suffix(".onnx"), ExportOptions(k=10, fp16=fp16))
    assert rep.validated_on == ["cpu", "cuda"] and rep.parity_cuda
    model, _ = load_checkpoint(pt)
    plain = load_backend(pt.with_suffix(".onnx"), "ort-cuda")
    graphs = load_backend(pt.with_suffix(".onnx"), "ort-cuda-graph", buckets=(1, 8, 64), history=12, warmup=True)
    assert set(graphs._static) == {1, 8, 64}  # every bucket captured at warm-up
    feeds = _feeds(np.random.default_rng(5), ((1, 12), (5, 12), (64, 12), (100, 12), (9, 40)), model.cfg.num_items)
    parity = compare_runners({"ort-cuda": plain.infer, "ort-cuda-graph": graphs.infer}, reference_runner(model), feeds,
                             runs=3, **plain.contract.parity_rule("cuda"))  # runs: capture, then replays
    assert parity.ok, parity.failures()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch-cuda", "torch-cuda-fp16"])
def test_torch_cuda_parity(tmp_path_factory, name):
    """torch-cuda: captured buckets (padded), uncaptured long rows, against the fp32 reference."""
    from cddrec.checkpoint import load_checkpoint

    pt = _paper_like(tmp_path_factory)
    model, _ = load_checkpoint(pt)
    be = load_backend(pt, name, k=10, buckets=(1, 8, 64), history=12, warmup=True)
    assert set(be.runner._static) == {1, 8, 64} and all(s.graph is not None for s in be.runner._static.values())
    feeds = _feeds(np.random.default_rng(6), ((1, 12), (7, 12), (64, 12), (70, 12), (9, 40)), model.cfg.num_items)
    parity = compare_runners({name: be.infer}, reference_runner(model), feeds, runs=2,
                             **be.contract.parity_rule("cuda"))
    assert parity.ok, parity.failures()


@pytest.mark.gpu
def test_early_exit_graph_on_cuda(tmp_path_factory):
    """An S-step graph (cddrec-export --steps S): validated on CUDA at export, and ort-cuda /
    ort-cuda-graph serve the S-step reference under the CUDA rule (not the T-step one)."""
    _cuda_ort()
    from cddrec.checkpoint import load_checkpoint
    from cddrec.export.onnx_export import ExportOptions, export_model

    pt = _paper_like(tmp_path_factory)
    graph = pt.with_name("m_s2.onnx")
    rep = export_model(pt, graph, ExportOptions(k=10, steps=2))
    assert rep.validated_on == ["cpu", "cuda"] and rep.contract["steps_run"] == 2
    model, _ = load_checkpoint(pt)
    plain = load_backend(graph, "ort-cuda")
    assert plain.contract.steps_run == 2
    runners = {"ort-cuda": plain.infer,
               "ort-cuda-graph": load_backend(graph, "ort-cuda-graph", buckets=(1, 8), history=12, warmup=True).infer}
    feeds = _feeds(np.random.default_rng(8), ((1, 12), (8, 12), (9, 40)), model.cfg.num_items)
    rule = plain.contract.parity_rule("cuda")
    parity = compare_runners(runners, reference_runner(model, steps=2), feeds, runs=2, **rule)
    assert parity.ok, parity.failures()
    assert not compare_runners({"ort-cuda": runners["ort-cuda"]}, reference_runner(model), feeds, **rule).ok


@pytest.mark.gpu
def test_torch_compile_on_cuda_model(tmp_path_factory):
    from cddrec.checkpoint import load_checkpoint

    pt = _paper_like(tmp_path_factory)
    model, _ = load_checkpoint(pt)
    be = load_backend(pt, "torch-compile", k=10, buckets=(1, 8), warmup=True)
    assert next(be.module.parameters()).device.type == "cuda"
    feeds = _feeds(np.random.default_rng(7), ((4, 12), (3, 9)), model.cfg.num_items)
    parity = compare_runners({"torch-compile": be.infer}, reference_runner(model), feeds,
                             **be.contract.parity_rule("cuda"))
    assert parity.ok, parity.failures()


# ------------------------------------------------------------ torch.compile and warm-up
def test_torch_compile_serves_any_width_without_recompiling(trained_tiny):
    """Issue 21 item 6: torch-compile compiled with static shapes while cddrec-infer sends a new
    history width per batch: it recompiled until dynamo's limit, then ran eagerly. Requests are
    now padded into buckets compiled at warm-up: ten widths and batch sizes compile nothing more."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from cddrec.checkpoint import load_checkpoint

    model, _ = load_checkpoint(trained_tiny)
    torch._dynamo.reset()
    counters.clear()
    be = load_backend(trained_tiny, "torch-compile", k=10, device="cpu", buckets=(1, 4, 16), compile_backend="eager",
                      warmup=True)
    assert set(be.runner._static) == {1, 4, 16}
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 3  # one graph per bucket shape, at warm-up
    L = model.cfg.max_len
    shapes = list(zip((1, 2, 3, 5, 7, 9, 11, 13, 16, 20), range(L - 5, L + 5)))  # ten widths, around L
    feeds = _feeds(np.random.default_rng(8), shapes, model.cfg.num_items)
    with torch._dynamo.config.patch(error_on_recompile=True):
        parity = compare_runners({"torch-compile": be.infer}, reference_runner(model), feeds,
                                 **be.contract.parity_rule("cpu"))
    assert parity.ok, parity.failures()
    assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled while serving


def test_compile_modes_that_capture_are_not_captured_again():
    """Issue 21 item 2: max-autotune turns on inductor's CUDA graphs, as reduce-overhead does; the
    torch-cuda backend must not capture those again (a capture inside a capture)."""
    from cddrec.export.torch_serving import inductor_captures, manual_capture

    assert inductor_captures("reduce-overhead") and inductor_captures("max-autotune")
    assert not inductor_captures("default") and not inductor_captures("max-autotune-no-cudagraphs")
    assert not inductor_captures(None)
    assert [manual_capture(True, m) for m in (None, "default", "max-autotune-no-cudagraphs")] == [True] * 3
    assert [manual_capture(True, m) for m in ("reduce-overhead", "max-autotune")] == [False, False]
    assert not manual_capture(False, None)


def test_recommender_load_warms_every_bucket(trained_tiny_onnx):
    """Issue 21 item 5: loading creates every bucket's static-shape session (on CUDA: captures it),
    so no live request pays for it, and says how long that took."""
    from cddrec.runtime.recommender import Recommender

    rec = Recommender.load(trained_tiny_onnx, "ort-cpu", buckets=BUCKETS)
    assert set(rec.backend._static) == set(BUCKETS)
    assert rec.backend.warmup_seconds > 0 and rec.backend.load_seconds > 0
    cold = Recommender.load(trained_tiny_onnx, "ort-cpu", buckets=BUCKETS, warmup=False)
    assert not cold.backend._static
    assert rec.startup_line().startswith("ort-cpu: loaded in ") and "warm-up" in rec.startup_line()


def test_infer_says_how_long_loading_and_warm_up_took(trained_tiny_onnx, tmp_path):
    from click.testing import CliRunner

    from cddrec.app.infer import main as infer_main

    req = tmp_path / "r.jsonl"
    req.write_text('{"user": "a", "history": ["1"]}\n')
    r = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(req), "-o",
                                        str(tmp_path / "o.jsonl"), "--quiet"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("ort-cpu: loaded in"))
    assert re.match(r"ort-cpu: loaded in \d+\.\d\d s, warm-up \d+\.\d\d s; \d+ engine instance\(s\) x \d+ "
                    r"thread\(s\); served 1 users", line), line


def test_infer_tf32_flag_only_for_ort_cuda(tmp_path, trained_tiny_onnx):
    from click.testing import CliRunner

    from cddrec.app.infer import main as infer_main

    req = tmp_path / "r.jsonl"
    req.write_text('{"user": "a", "history": ["1"]}\n')
    res = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(req), "--output",
                                          str(tmp_path / "o.jsonl"), "--backend", "ort-cpu", "--tf32"])
    assert res.exit_code != 0 and "--tf32 applies to ort-cuda" in res.output


def test_gpu_check_parity_dry_run_on_cpu(trained_tiny, trained_tiny_onnx, tmp_path):
    """The GPU check's parity step (benchmarks/gpu_bench.check_parity) on its CPU variants: the code
    that runs first on a lent GPU, through the one parity loop, passes here; the early-exit graph is
    judged against the reference of its own S steps (against all T it would fail)."""
    from cddrec.benchmarks.gpu_bench import Files, check_parity
    from cddrec.checkpoint import load_checkpoint
    from cddrec.export.onnx_export import ExportOptions, export_model

    files = Files(str(trained_tiny), str(trained_tiny_onnx), str(tmp_path / "m16.onnx"), str(tmp_path / "s1.onnx"), 1)
    export_model(trained_tiny, files.graph16, ExportOptions(k=10, fp16=True))
    export_model(trained_tiny, files.graph_s, ExportOptions(k=10, steps=1))
    model, _ = load_checkpoint(trained_tiny)
    out = check_parity(model, contract_for(model, 10), "cpu", files, [1, 9])
    assert set(out) == {"ort-cpu", "ort-cpu-buckets", "ort-cpu-fp16-graph", "torch-fast", "ort-cpu-early-exit-S1"}
    for name, v in out.items():
        assert "error" not in v and v["ok"], (name, v)
        assert set(v["batches"]) == {"1", "9"} and v["exact_ids"] == ("fp16" not in name)
    assert out["ort-cpu-early-exit-S1"]["steps"] == 1 and out["ort-cpu"]["steps"] == model.steps
    wrong = Files(files.model_pt, files.graph_s, files.graph16, files.graph_s, 1)  # the S=1 graph judged as T steps
    assert not check_parity(model, contract_for(model, 10), "cpu", wrong, [9])["ort-cpu"]["ok"]


def test_caller_cuda_options_and_the_capture_options_both_reach_the_provider(trained_tiny_onnx, monkeypatch):
    """Issue 21 item 4: a caller's ``cuda_options`` and the captured session's own
    (``enable_cuda_graph``) used to collide (a TypeError); both must reach ``providers_for``."""
    import cddrec.runtime.backends as backends
    import cddrec.runtime.session as session

    seen = []

    def providers(device, *, tf32=False, cuda_options=None):  # CUDA asked for, the CPU provider given
        seen.append((device, dict(cuda_options or {})))
        return ["CPUExecutionProvider"]

    class Bucket:  # device buffers need a GPU; the session options are what is checked here
        def __init__(self, ort, session, device, bucket, history, contract):
            self.session = session

    monkeypatch.setattr(session, "providers_for", providers)
    monkeypatch.setattr(backends, "cuda_provider_available", lambda: True)
    monkeypatch.setattr(backends, "_StaticBucket", Bucket)
    caller = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}
    be = load_backend(trained_tiny_onnx, "ort-cuda-graph", buckets=(1, 4), cuda_options=caller, warmup=False)
    assert seen == [("cuda", caller)]
    be.static_bucket(4)
    assert seen[-1] == ("cuda", {**caller, "enable_cuda_graph": "1"})
    assert be.session_kwargs["cuda_options"] == caller  # the caller's dict is not changed


def test_gpu_check_device_mode_refuses_a_machine_without_a_gpu(tmp_path):
    """``gpu_check.sh`` without a mode is the device sequence: it moves the carried parts out of the
    checkout, so on a machine without a GPU it refuses (one line, exit 1) and touches nothing;
    unknown options are refused too. (``--dry-run`` is the rehearsal here.)"""
    import os
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: the device sequence would run")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "GPU_CHECK_HOME": str(tmp_path / "home"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "no GPU here" in r.stdout and "--dry-run" in r.stdout
    assert not (tmp_path / "home").exists()
    r = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "unknown option --bogus" in r.stdout
