"""Graph file size per export mode: the item table must be stored once in every graph.

    flock /tmp/cddrec-bench.lock python -m cddrec.benchmarks.graph_sizes --items 210000 --hidden 16

A random model (``sizes.random_model``) is exported with the default TorchScript exporter,
``--optimize``, ``--fp16`` and the dynamo exporter (opset 18); each row gives the file size, the
size of one item table (V x d x 4 bytes) and how many initializers of that size the graph holds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
import onnx

import cddrec.export.onnx_export as onnx_export
from cddrec.export.onnx_export import ExportOptions, export_model
from cddrec.runtime.session import ort_session

from .record import RESULTS_DIR, record
from .sizes import random_model
from .timer import time_calls

MODES = {"torchscript": {}, "torchscript --optimize": {"optimize": True}, "torchscript --fp16": {"fp16": True},
         "dynamo (opset 18)": {"exporter": "dynamo", "opset": 18}}


@click.command()
@click.option("--items", default=210_000, show_default=True)
@click.option("--hidden", default=16, show_default=True)
@click.option("--steps", default=20, show_default=True)
@click.option("--name", default="graph_sizes", show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(items, hidden, steps, name, out_dir):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_model(Path(tmp) / "m.pt", items=items, hidden_size=hidden, steps=steps, heads=2)
        V = items + 2
        for mode, options in MODES.items():
            path = Path(tmp) / "g.onnx"
            rep = export_model(ckpt, path, ExportOptions(k=10, vocab_sidecar=True, **options))
            proto = onnx.load(str(path))
            copies = sum(int(np.prod(i.dims)) == V * hidden for i in proto.graph.initializer)
            rows.append({"mode": mode, "graph_mb": rep.graph_bytes / 1e6, "table_mb": V * hidden * 4 / 1e6,
                         "table_copies": copies, "max_abs_diff": max(rep.max_abs_diff.values())})
            click.echo(f"{mode}: {rows[-1]['graph_mb']:.2f} MB, {copies} table(s)", err=True)
        # serving speed of the one-table graph (Gemm transB) against the former two-table graph
        # (MatMul on a transposed copy), same weights, timed interleaved at batch 256 on ORT CPU
        one, two = Path(tmp) / "one.onnx", Path(tmp) / "two.onnx"
        export_model(ckpt, one, ExportOptions(k=10, vocab_sidecar=True))
        keep = onnx_export.one_item_table
        onnx_export.one_item_table = lambda proto: False
        try:
            export_model(ckpt, two, ExportOptions(k=10, vocab_sidecar=True))
        finally:
            onnx_export.one_item_table = keep
        rng = np.random.default_rng(0)
        feed = {"item_ids": rng.integers(1, items + 1, size=(256, 20))}
        sessions = {"one table (Gemm transB)": ort_session(one), "two tables (MatMul, former)": ort_session(two)}
        runs: dict[str, list[float]] = {graph: [] for graph in sessions}
        for _ in range(3):
            for graph, sess in sessions.items():
                t = time_calls(lambda i, sess=sess: sess.run(None, feed), 256, warmup=2, min_runs=5, min_seconds=1.0)
                runs[graph].append(t.users_per_s)
        speed = {graph: float(np.median(v)) for graph, v in runs.items()}
    table = ["| export | graph MB | one item table MB | item tables stored | max score diff |", "|---|---|---|---|---|"]
    table += [f"| {r['mode']} | {r['graph_mb']:.2f} | {r['table_mb']:.2f} | {r['table_copies']} | "
              f"{r['max_abs_diff']:.1e} |" for r in rows]
    table += ["", "| graph | users/s at batch 256 (ORT CPU, median of 3 interleaved rounds) |", "|---|---|"]
    table += [f"| {graph} | {v:,.0f} |" for graph, v in speed.items()]
    text = "\n".join(table) + (f"\n\nRandom model: {items:,} items, d={hidden}, T={steps}, L=20, 2 heads, K=10, "
                               "vocabulary in a sidecar file (not counted). Before the fix the default graph "
                               "stored the table twice (26.9 MB for the 210,000-item d=16 model, issue 15).")
    record(name, {"items": items, "hidden": hidden, "steps": steps, "rows": rows, "users_per_s_b256": speed}, text,
           out_dir,
           title="Exported graph size per export mode")
    click.echo(text)


if __name__ == "__main__":
    main()
