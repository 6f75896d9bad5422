"""Throughput and peak memory of ``cddrec-infer --batch`` over a generated request file.

    python -m cddrec.benchmarks.infer_throughput [--lines 1000000] [--model model.onnx]

Without ``--model`` a random-weight model of the paper's size (d=128, L=20, T=20, 12,101 items
as Beauty) is exported first. The request file holds JSONL lines with random histories of 1 to
50 known items (1% also carry an unknown key). ``cddrec-infer`` runs as a child process, so
its peak resident memory (VmHWM) is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .record import RESULTS_DIR, record
from .sizes import PAPER_ITEMS, random_model

# cddrec-infer with its own peak resident memory printed at exit (VmHWM starts afresh at exec;
# ru_maxrss would include what the parent held when it forked)
CHILD = ("import atexit, sys\n"
         "from cddrec.benchmarks.latency import status_mb\n"
         "atexit.register(lambda: print(f'VmHWM_MB={status_mb(\"VmHWM\"):.1f}', file=sys.stderr))\n"
         "from cddrec.cli import infer_main\n"
         "infer_main()\n")


def write_requests(path: Path, keys: list[str], lines: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    chunk = 100_000
    with open(path, "w") as f:
        for start in range(0, lines, chunk):
            n = min(chunk, lines - start)
            lens = rng.integers(1, 51, size=n)
            items = rng.integers(0, len(keys), size=int(lens.sum()))
            pos = 0
            out = []
            for i, ln in enumerate(lens):
                hist = [int(keys[j]) for j in items[pos:pos + ln]]
                pos += ln
                if i % 100 == 0:
                    hist.append("unknown-key")
                out.append(json.dumps({"user": start + i, "history": hist}))
            f.write("\n".join(out) + "\n")


@click.command()
@click.option("--lines", default=1_000_000, show_default=True)
@click.option("--model", "graph", default=None, help="exported graph; default: a random paper-size model")
@click.option("--items", default=PAPER_ITEMS, show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--backend", default="ort-cpu", show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(lines, graph, items, batch_size, backend, out_dir):
    from cddrec.export.onnx_export import export_model
    from cddrec.runtime.recommender import read_serving_info

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if graph is None:
            export_model(random_model(tmp / "m.pt", items), tmp / "m.onnx", k=10)
            graph = str(tmp / "m.onnx")
        keys = read_serving_info(graph).vocab.keys
        req = tmp / "requests.jsonl"
        t0 = time.perf_counter()
        write_requests(req, keys, lines)
        gen_s = time.perf_counter() - t0
        out = tmp / "recs.jsonl"
        cmd = [sys.executable, "-c", CHILD, "--model", graph,
               "--batch", str(req), "-o", str(out), "--batch-size", str(batch_size), "--backend", backend, "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise click.ClickException(f"cddrec-infer failed: {proc.stderr[-2000:]}")
        peak_mb = float(proc.stderr.rsplit("VmHWM_MB=", 1)[1].split()[0])
        served = sum(1 for _ in open(out))
        row = {"lines": lines, "served": served, "wall_seconds": wall, "users_per_s": served / wall,
               "peak_rss_mb": peak_mb, "request_file_mb": req.stat().st_size / 1e6,
               "output_file_mb": out.stat().st_size / 1e6, "batch_size": batch_size, "backend": backend,
               "generate_seconds": gen_s, "summary": [ln for ln in proc.stderr.splitlines() if ln.startswith("served")][-1]}
    table = ("| lines | backend | batch | wall s | users/s | peak RSS MB | request MB |\n|---|---|---|---|---|---|---|\n"
             f"| {lines:,} | {backend} | {batch_size} | {wall:.1f} | {row['users_per_s']:,.0f} | {peak_mb:.0f} | "
             f"{row['request_file_mb']:.0f} |\n\n`{row['summary']}`")
    record("infer_throughput", row, table, out_dir, title="cddrec-infer --batch throughput")
    click.echo(table)


if __name__ == "__main__":
    main()
