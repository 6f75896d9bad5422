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

from cddrec.export.onnx_export import export_model

from .record import RESULTS_DIR, record
from .sizes import random_model

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
            rep = export_model(ckpt, path, k=10, vocab_sidecar=True, **options)
            proto = onnx.load(str(path))
            copies = sum(int(np.prod(i.dims)) == V * hidden for i in proto.graph.initializer)
            rows.append({"mode": mode, "graph_mb": rep.graph_bytes / 1e6, "table_mb": V * hidden * 4 / 1e6,
                         "table_copies": copies, "max_abs_diff": max(rep.max_abs_diff.values())})
            click.echo(f"{mode}: {rows[-1]['graph_mb']:.2f} MB, {copies} table(s)", err=True)
    table = ["| export | graph MB | one item table MB | item tables stored | max score diff |", "|---|---|---|---|---|"]
    table += [f"| {r['mode']} | {r['graph_mb']:.2f} | {r['table_mb']:.2f} | {r['table_copies']} | "
              f"{r['max_abs_diff']:.1e} |" for r in rows]
    text = "\n".join(table) + (f"\n\nRandom model: {items:,} items, d={hidden}, T={steps}, L=20, 2 heads, K=10, "
                               "vocabulary in a sidecar file (not counted). Before the fix the default graph "
                               "stored the table twice (26.9 MB for this model, issue 15).")
    record(name, {"items": items, "hidden": hidden, "steps": steps, "rows": rows}, text, out_dir,
           title="Exported graph size per export mode")
    click.echo(text)


if __name__ == "__main__":
    main()
