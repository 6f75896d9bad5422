"""What fuses in the exported graph and what it buys on ONNX Runtime CPU, in one run.

    python -m cddrec.benchmarks.fusion [--items 12101] [--threads 0] [--rounds 5]

Random weights of the paper's size (d=128, L=20, T=20, 4 heads). Graphs of the same model:
the standard graph (the default export); ONNX Runtime's offline-optimized graph (level
extended, what ``--optimize`` wrote before); ONNX Runtime's transformer optimizer
(``onnxruntime.transformers.optimizer.optimize_model``, model type bert, its own Python
fusions); the exporter's fused graph with each contrib-op fusion alone and the default set
(``export/fusion.py``, ``--optimize``); and the int8 graph (``--int8``). Per graph: op counts
in the file, the fused ops the transformer optimizer reports, and p50 latency at batch 1 and
256, measured round-robin (``--rounds`` rounds) so that all graphs share the machine's state;
ratios are against the standard graph. Then ONNX Runtime session options at batch 1: intra-op
threads and spinning.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
import onnx

from cddrec.checkpoint import load_checkpoint
from cddrec.export.fusion import DEFAULT_FUSIONS, FUSIONS
from cddrec.export.onnx_export import ExportOptions, build_graph, contract_for, export_model, op_counts
from cddrec.runtime.backends import OrtCpu
from cddrec.runtime.session import ort_session

from .record import RESULTS_DIR, record
from .sizes import random_model
from .timer import time_calls

SHOWN_OPS = ("MatMul", "Transpose", "Reshape", "Slice", "Add", "LayerNormalization", "Softmax", "Attention",
             "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "MatMulInteger")


def make_graphs(tmp: Path, items: int) -> tuple[dict[str, Path], dict]:
    pt = random_model(tmp / "r.pt", items)
    model, _ = load_checkpoint(pt)
    spec = contract_for(model, 10)
    graphs = {"standard": tmp / "standard.onnx"}
    export_model(pt, graphs["standard"], ExportOptions(k=10))
    graphs["ORT offline (extended)"] = tmp / "ort_offline.onnx"
    ort_session(graphs["standard"], level="extended", optimized_path=graphs["ORT offline (extended)"])
    fired = {}
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(str(graphs["standard"]), model_type="bert", num_heads=4, hidden_size=128,
                             optimization_options=FusionOptions("bert"), opt_level=0)
        fired = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        graphs["ORT transformer optimizer (bert)"] = tmp / "transformers.onnx"
        opt.save_model_to_file(str(graphs["ORT transformer optimizer (bert)"]))
    except Exception as e:  # noqa: BLE001 - recorded
        fired = {"error": f"{type(e).__name__}: {e}"}
    for f in FUSIONS:
        graphs[f"fused: {f} only"] = tmp / f"fused_{f}.onnx"
        build_graph(model, graphs[f"fused: {f} only"], spec, fusions=(f,))
    graphs["fused (default: " + ", ".join(DEFAULT_FUSIONS) + ")"] = tmp / "fused.onnx"
    export_model(pt, tmp / "fused.onnx", ExportOptions(k=10, optimize=True))  # validated
    graphs["int8"] = tmp / "int8.onnx"
    export_model(pt, graphs["int8"], ExportOptions(k=10, int8=True))
    return graphs, fired


def timed(backends: dict, x: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    """p50 ms per backend: the median of its per-round p50s, round-robin over ``rounds`` rounds of
    ``runs`` calls each (the one timer, ``benchmarks.timer.time_calls``)."""
    p50: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, be in backends.items():
            t = time_calls(lambda i, be=be: be.infer({"item_ids": x}), len(x), warmup=1, min_runs=runs,
                           min_seconds=0.0, max_runs=runs)
            p50[name].append(t.p50_ms)
    return {name: float(np.median(v)) for name, v in p50.items()}


def run(items: int, threads: int, rounds: int, echo=print) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="cddrec-fusion-") as tmp:
        graphs, fired = make_graphs(Path(tmp), items)
        ops = {name: op_counts(onnx.load(str(p))) for name, p in graphs.items()}
        backends = {name: OrtCpu(p, threads=threads) for name, p in graphs.items()}
        p50 = {}
        for batch, runs in ((1, 200), (256, 4)):
            echo(f"batch {batch} ...")
            p50[batch] = timed(backends, rng.integers(1, items + 1, size=(batch, 20)), rounds, runs)
        echo("session options at batch 1 ...")
        opts = {}
        for graph in ("standard", "fused (default: " + ", ".join(DEFAULT_FUSIONS) + ")", "int8"):
            for t in (1, 2):
                for spin in (None, False):
                    opts[f"{graph.split(' (')[0]}, {t} thread(s), spinning {'default (on)' if spin is None else 'off'}"] \
                        = OrtCpu(graphs[graph], threads=t, allow_spinning=spin)
        opt_p50 = timed(opts, rng.integers(1, items + 1, size=(1, 20)), rounds, 200)
    return {"items": items, "threads": threads, "rounds": rounds, "transformer_optimizer_fused": fired,
            "ops": ops, "p50_ms": {str(b): v for b, v in p50.items()}, "session_options_batch1_p50_ms": opt_p50}


def table(res: dict) -> str:
    p1, p256 = res["p50_ms"]["1"], res["p50_ms"]["256"]
    lines = ["| graph | ops | " + " | ".join(SHOWN_OPS) + " | batch 1 p50 ms | x standard | batch 256 p50 ms | "
             "x standard | batch 256 users/s |", "|---|---|" + "---|" * (len(SHOWN_OPS) + 5)]
    for name, ops in res["ops"].items():
        lines.append(f"| {name} | {sum(ops.values())} | " + " | ".join(str(ops.get(o, 0)) for o in SHOWN_OPS)
                     + f" | {p1[name]:.3f} | {p1['standard'] / p1[name]:.2f} | {p256[name]:.2f} | "
                     f"{p256['standard'] / p256[name]:.2f} | {256 / p256[name] * 1e3:,.0f} |")
    lines += ["", f"Op counts are of the graph file (ONNX Runtime fuses further at load: MatMul+scale, BiasGelu, "
              f"int8 DynamicQuantizeMatMul). The transformer optimizer's fusions that fired: "
              f"{res['transformer_optimizer_fused'] or 'none'}. Random weights, {res['items']:,} items, d=128, L=20, "
              f"T=20, threads {res['threads'] or 'all cores'}, {res['rounds']} round-robin rounds.", "",
              "Session options, batch 1:", "", "| session | p50 ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in res["session_options_batch1_p50_ms"].items()]
    return "\n".join(lines)


@click.command()
@click.option("--items", default=12101, show_default=True)
@click.option("--threads", default=0, show_default=True, help="0 = all cores")
@click.option("--rounds", default=5, show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(items, threads, rounds, out_dir):
    res = run(items, threads, rounds, echo=lambda m: click.echo(m, err=True))
    md = table(res)
    record("fusion", res, md, out_dir, title="Graph fusion on ONNX Runtime CPU: what fires, what it buys")
    click.echo(md)


if __name__ == "__main__":
    main()
