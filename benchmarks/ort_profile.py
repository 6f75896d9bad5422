"""Where ONNX Runtime CPU spends its time: share of kernel time per op type in the exported graph.

    python -m cddrec.benchmarks.ort_profile [--items PAPER_ITEMS] [--batch 256] [--runs 20]

Random weights of the paper's size (d=128, L=20, T=20, 4 heads); the graph is exported with
validation and run with ORT's profiler on full-length random histories. The achieved GFLOP/s
against the machine's measured fp32 matmul peak (``roofline.matmul_peak``) say how far the graph
is from its roofline (its best case) and why.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import click
import numpy as np

from cddrec.checkpoint import load_checkpoint
from cddrec.contract import DEFAULT_K
from cddrec.export.onnx_export import ExportOptions, export_model
from cddrec.runtime.session import ort_session

from .record import RESULTS_DIR, record
from .roofline import matmul_peak
from .sizes import PAPER_ITEMS, random_model


def profile_graph(graph: Path, batch: int, runs: int, items: int, L: int, threads: int, workdir: Path) -> dict:
    sess = ort_session(graph, threads=threads, profile_prefix=str(workdir / "ort"))
    x = np.random.default_rng(0).integers(1, items + 1, size=(batch, L)).astype(np.int64)
    for _ in range(runs):
        sess.run(None, {"item_ids": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    return {"batch": batch, "runs": runs, "kernel_ms_per_run": total / runs / 1e3,
            "ops": [{"op": op, "share": us / total, "ms_per_run": us / runs / 1e3} for op, us in per_op.most_common()]}


@click.command()
@click.option("--items", default=PAPER_ITEMS, show_default=True)
@click.option("--batch", default=256, show_default=True)
@click.option("--runs", default=20, show_default=True)
@click.option("--threads", default=0, show_default=True, help="0 = all cores")
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(items, batch, runs, threads, out_dir):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, _ = load_checkpoint(random_model(tmp / "r.pt", items))
        cfg = model.cfg
        d, L, T = cfg.hidden_size, cfg.max_len, cfg.decoder_steps
        export_model(tmp / "r.pt", tmp / "m.onnx", ExportOptions(k=DEFAULT_K))
        res = profile_graph(tmp / "m.onnx", batch, runs, items, L, threads, tmp)
    flops = model.flops_per_user()["total"] * batch
    res.update({"items": items, "flops_per_run": flops, "matmul_peak_gflops": matmul_peak("cpu", "fp32", threads).gflops,
                "achieved_gflops": flops / (res["kernel_ms_per_run"] / 1e3) / 1e9})
    rows = ["| op type | share of kernel time | ms per run |", "|---|---|---|"]
    rows += [f"| {o['op']} | {o['share'] * 100:.1f}% | {o['ms_per_run']:.2f} |" for o in res["ops"][:12]]
    rows += ["", f"Batch {batch}, {items:,} items, d={d}, L={L}, T={T}: {res['kernel_ms_per_run']:.1f} ms of kernels per "
             f"run, {flops / 1e9:.2f} GFLOP -> {res['achieved_gflops']:.0f} GFLOP/s against a measured matmul peak of "
             f"{res['matmul_peak_gflops']:.0f} GFLOP/s."]
    record("ort_profile", res, "\n".join(rows), out_dir, title="ONNX Runtime CPU profile per op type")
    click.echo("\n".join(rows))


if __name__ == "__main__":
    main()
