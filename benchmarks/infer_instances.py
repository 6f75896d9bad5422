"""``cddrec-infer`` with one multi-threaded engine against engine instances side by side, interleaved.

Each round runs the whole command (a child process) once per layout on the same request file:
``--instances 1 --threads N`` (one ONNX Runtime run at a time on N threads, the layout before
instances existed) and ``--instances N --threads 1`` (the ort-cpu default on N cores). The figures
are wall-clock users/s of the command and the served users/s of its own summary.

    python -m cddrec.benchmarks.infer_instances --graph m.onnx --requests 100000 --rounds 3
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .gpu_bench import write_requests
from .record import RESULTS_DIR, record, user_command


def table(rep: dict) -> str:
    lines = ["| layout | wall users/s per round | median | served users/s per round (its summary) | median |",
             "|---|---|---|---|---|"]
    for label, r in rep["layouts"].items():
        lines.append(f"| `{label}` | {', '.join(f'{x:,.0f}' for x in r['wall'])} | {np.median(r['wall']):,.0f} | "
                     f"{', '.join(f'{x:,.0f}' for x in r['served'])} | {np.median(r['served']):,.0f} |")
    lines.append(f"\nRatio of medians (instances / one multi-threaded engine): wall {rep['ratio_wall']:.2f}, "
                 f"served {rep['ratio_served']:.2f}")
    return "\n".join(lines)


@click.command()
@click.option("--graph", required=True, type=click.Path(exists=True, dir_okay=False), help="an exported graph")
@click.option("--requests", "n", default=100_000, show_default=True, help="JSONL requests (random histories)")
@click.option("--cores", default=0, show_default=True, help="N (0: os.cpu_count())")
@click.option("--rounds", default=3, show_default=True)
@click.option("-o", "--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
@click.option("--name", default="infer_instances_cpu", show_default=True)
def main(graph, n, cores, rounds, out_dir, name):
    from cddrec.contract import GraphContract
    from cddrec.runtime.session import ort_session

    cores = cores or os.cpu_count() or 1
    items = GraphContract.from_metadata(ort_session(graph).get_modelmeta().custom_metadata_map).num_items
    layouts = {f"--instances 1 --threads {cores}": ["--instances", "1", "--threads", str(cores)],
               f"--instances {cores} --threads 1": ["--instances", str(cores), "--threads", "1"]}
    got = {label: {"wall": [], "served": []} for label in layouts}
    infer = user_command("cddrec-infer")
    with tempfile.TemporaryDirectory(prefix="cddrec-instances-") as tmp:
        req, out = Path(tmp) / "requests.jsonl", Path(tmp) / "recs.jsonl"
        write_requests(req, n, items)
        for r in range(rounds):
            for label, args in layouts.items():
                out.unlink(missing_ok=True)
                t0 = time.perf_counter()
                p = subprocess.run([*infer, "--model", str(graph), "--batch", str(req), "-o", str(out), "--quiet",
                                    *args], capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if p.returncode != 0:
                    raise click.ClickException(f"cddrec-infer {' '.join(args)} failed: {p.stderr.strip()[-300:]}")
                served = float(re.search(r"\(([\d,]+) users/s\)", p.stderr).group(1).replace(",", ""))
                got[label]["wall"].append(n / wall)
                got[label]["served"].append(served)
                click.echo(f"round {r + 1}, {label}: {n / wall:,.0f} users/s wall, {served:,.0f} served", err=True)
    one, many = (got[label] for label in layouts)
    rep = {"graph": str(graph), "requests": n, "cores": cores, "layouts": got,
           "ratio_wall": float(np.median(many["wall"]) / np.median(one["wall"])),
           "ratio_served": float(np.median(many["served"]) / np.median(one["served"]))}
    record(name, rep, table(rep), out_dir, title="cddrec-infer: one multi-threaded engine against engine instances")
    click.echo(table(rep))


if __name__ == "__main__":
    main()
