"""GPU checks and timings in one run (see ``gpu_check.sh``): the PyTorch path on CUDA (eager,
torch.compile, CUDA-graph replay of the unrolled steps, fp16/bf16), ONNX Runtime and TensorRT
where importable. Parity of every variant against the plain fp32 eager reference.

    python -m cddrec.benchmarks.gpu_bench --out $OUT [--device cuda] [--seconds 0.5]

On a machine without CUDA, ``--device cpu`` runs the same code on small sizes (a dry run).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import click
import numpy as np

from cddrec.parity import compare_topk

from .sizes import PAPER_ITEMS
from .timer import time_calls


def _timer(device: str):
    """``run(fn, seconds, batch) -> Timing`` through the one benchmark timer, synchronizing CUDA."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def run(fn, seconds: float, batch: int):
        return time_calls(lambda i: fn(), batch, warmup=3, min_runs=20, min_seconds=seconds, sync=sync).as_dict()

    return run


def _parity(got, ref) -> dict:
    """The one comparator on (items, scores, ...) tensors of a variant and of the reference."""
    p = compare_topk(got[0].cpu().numpy(), got[1].float().cpu().numpy(), ref[0].cpu().numpy(),
                     ref[1].float().cpu().numpy())
    return {"max_abs_score_diff": p.max_abs_diff, "top10_overlap": p.overlap, "mismatches_beyond_ties": p.topk_mismatches}


class CudaGraphRunner:
    """Capture the unrolled module once per batch size and replay it."""

    def __init__(self, module, example):
        import torch

        self.static_in = example.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(3):
                module(self.static_in)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = module(self.static_in)

    def __call__(self, x):
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--device", default="cuda", show_default=True)
@click.option("--items", default=PAPER_ITEMS, show_default=True)
@click.option("--batch-sizes", default="1,64,256,1024,4096", show_default=True)
@click.option("--seconds", default=0.5, show_default=True, help="timed seconds per variant and batch size")
@click.option("--compile/--no-compile", "do_compile", default=True)
def main(out_dir, device, items, batch_sizes, seconds, do_compile):
    import torch

    from cddrec.config import CDDRecConfig
    from cddrec.export.graph import UnrolledRecommender
    from cddrec.inference import reference_topk
    from cddrec.model import CDDRec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": device, "items": items, "torch": torch.__version__, "variants": {}, "parity": {},
                    "errors": {}}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise click.ClickException("CUDA is not available")
        report["gpu"] = torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for parity
    torch.manual_seed(0)
    cfg = CDDRecConfig(num_items=items)
    model = CDDRec(cfg).eval().to(device)
    sizes = [int(b) for b in batch_sizes.split(",")]
    timer = _timer(device)
    rng = np.random.default_rng(0)

    def save():
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    unrolled = UnrolledRecommender(model, 10).eval().to(device)
    variants = {
        "eager-plain": lambda x: reference_topk(model, x, 10, plain=True),
        "eager-fast": lambda x: reference_topk(model, x, 10, plain=False),
        "unrolled-eager": lambda x: unrolled(x),
    }
    for dtype in ("float16", "bfloat16"):
        dt = getattr(torch, dtype)

        def autocast_run(x, dt=dt):
            with torch.autocast(device_type=device.split(":")[0], dtype=dt):
                return unrolled(x)

        variants[f"unrolled-autocast-{dtype}"] = autocast_run
    if do_compile:
        try:
            compiled = torch.compile(unrolled, dynamic=False)
            variants["unrolled-compile"] = lambda x: compiled(x)
        except Exception as e:  # noqa: BLE001
            report["errors"]["compile"] = repr(e)
    for name, fn in variants.items():
        rows = []
        for b in sizes:
            x = torch.as_tensor(rng.integers(1, items + 1, size=(b, cfg.max_len)), device=device)
            try:
                with torch.no_grad():
                    rows.append(timer(lambda fn=fn, x=x: fn(x), seconds, b))
                    ref = reference_topk(model, x, 10, plain=True)
                    got = fn(x)
                report["parity"].setdefault(name, {})[str(b)] = _parity(got, ref)
            except Exception as e:  # noqa: BLE001 - record and go on
                report["errors"][f"{name}@{b}"] = "".join(traceback.format_exception_only(type(e), e))[-500:]
        report["variants"][name] = rows
        save()
    if device.startswith("cuda"):
        rows = []
        for b in sizes:
            x = torch.as_tensor(rng.integers(1, items + 1, size=(b, cfg.max_len)), device=device)
            try:
                runner = CudaGraphRunner(unrolled, x)
                rows.append(timer(lambda runner=runner, x=x: runner(x), seconds, b))
                ref = reference_topk(model, x, 10, plain=True)
                got = runner(x)
                report["parity"].setdefault("unrolled-cudagraph", {})[str(b)] = _parity(got, ref)
            except Exception as e:  # noqa: BLE001
                report["errors"][f"cudagraph@{b}"] = repr(e)[-500:]
        report["variants"]["unrolled-cudagraph"] = rows
        save()
    # ONNX Runtime (whatever providers are installed) and TensorRT where importable
    try:
        import tempfile

        from cddrec.checkpoint import save_checkpoint
        from cddrec.export.onnx_export import export_model
        from cddrec.runtime.backends import load_backend
        from cddrec.vocab import Vocab

        tmp = Path(tempfile.mkdtemp())
        save_checkpoint(tmp / "m.pt", model.cpu(), Vocab.build(str(i) for i in range(items)), torch.ones(items + 2))
        model.to(device)
        trt = None
        try:
            import tensorrt  # noqa: F401
            trt = str(tmp / "m.plan")
        except ImportError:
            report["errors"]["tensorrt"] = "not installed"
        export_model(tmp / "m.pt", tmp / "m.onnx", k=10, trt_engine=trt, trt_max_batch=max(sizes))
        import onnxruntime as ort

        backends = ["ort-cpu"] + (["ort-cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])
        backends += ["trt"] if trt else []
        for name in backends:
            be = load_backend(trt if name == "trt" else tmp / "m.onnx", name)
            rows = []
            for b in sizes:
                ids = rng.integers(1, items + 1, size=(b, cfg.max_len)).astype(np.int64)
                rows.append(_timer("cpu")(lambda be=be, ids=ids: be.infer({"item_ids": ids}), seconds, b))  # host trip
            report["variants"][name] = rows
            save()
    except Exception as e:  # noqa: BLE001
        report["errors"]["onnx"] = "".join(traceback.format_exception_only(type(e), e))[-800:]
    save()
    click.echo(json.dumps({k: v for k, v in report.items() if k != "parity"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
