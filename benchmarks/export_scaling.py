"""Graph size, export time and ONNX Runtime session-creation time as T grows.

    python -m cddrec.benchmarks.export_scaling [--steps 5,20,50] [--items PAPER_ITEMS]

Random weights of the paper's size (d=128, L=20, 4 heads) with T denoising steps; each graph is
exported with validation, then opened five times to time session creation.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click

from cddrec.export.onnx_export import ExportOptions, export_model
from cddrec.runtime.session import ort_session

from .options import int_list
from .record import RESULTS_DIR, record
from .sizes import PAPER_ITEMS, random_model


def measure(steps: list[int], items: int, optimize: bool, workdir: Path) -> list[dict]:
    rows = []
    for T in steps:
        pt = random_model(workdir / f"T{T}.pt", items, steps=T)
        out = workdir / f"T{T}.onnx"
        rep = export_model(pt, out, ExportOptions(k=10, optimize=optimize))
        sessions = []
        for _ in range(5):
            t0 = time.perf_counter()
            ort_session(out)
            sessions.append(time.perf_counter() - t0)
        rows.append({"T": T, "graph_mb": rep.graph_bytes / 1e6, "ops": sum(rep.ops.values()),
                     "ops_optimized": sum(rep.ops_optimized.values()) if rep.ops_optimized else None,
                     "export_seconds": rep.export_seconds, "session_seconds_median": statistics.median(sessions),
                     "max_abs_diff": max(rep.max_abs_diff.values())})
    return rows


@click.command()
@click.option("--steps", default="5,20,50", show_default=True)
@click.option("--items", default=PAPER_ITEMS, show_default=True)
@click.option("--optimize", is_flag=True, help="also write ORT's offline-optimized graph")
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(steps, items, optimize, out_dir):
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(int_list(steps), items, optimize, Path(tmp))
    table = ["| T | graph MB | ops | ops after ORT optimization | export s | ORT session s (median of 5) | "
             "max abs diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['T']} | {r['graph_mb']:.2f} | {r['ops']} | {r['ops_optimized'] or '-'} | "
                     f"{r['export_seconds']:.2f} | {r['session_seconds_median']:.3f} | {r['max_abs_diff']:.1e} |")
    text = "\n".join(table)
    record("export_scaling", {"items": items, "rows": rows}, text, out_dir, title="Export scaling with T")
    click.echo(text)


if __name__ == "__main__":
    main()
