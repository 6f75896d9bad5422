"""Early exit: quality and speed of the graph that serves the state after S of the T reverse steps.

    python -m cddrec.benchmarks.early_exit [--model MODEL.pt|random] [--data DATA] [--steps 1,2,5,10,20]
        [--backends ort-cpu] [--batch-sizes 1,256] [--min-seconds 1] [--rounds 3] [--name early_exit_cpu]

For each S: the model exported with ``cddrec-export --steps S`` (validated against the S-step
PyTorch reference), timed by ``cddrec-bench`` (``run_bench``: one spawned process per backend, the
graph given alone, so its roofline counts the S steps it runs) and, with ``--data``, evaluated by
``cddrec-eval --steps S`` (``evaluate_file``: the paper's protocol on the test split). Without
``--model``, a random paper-size model (12,101 items, d=128, L=20, T=20): speed only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click

from .options import int_list
from .record import RESULTS_DIR, cell, record
from .sizes import PAPER_ITEMS, random_model

QUALITY_KEYS = ("R@10", "N@10", "MRR@40")


def run(model_pt: Path, steps: list[int], backends: list[str], batch_sizes: list[int], min_seconds: float,
        data: str | None, tmp: Path, echo=click.echo, rounds: int = 1) -> dict:
    """Export and (with ``data``) evaluate each S, then time the graphs round-robin ``rounds`` times (so
    a load that drifts on a shared machine falls on every S alike); each timing is the median over the
    rounds. Rows in the order of ``steps``."""
    from cddrec.checkpoint import load_checkpoint
    from cddrec.export.onnx_export import ExportOptions, export_model

    model, ckpt = load_checkpoint(model_pt)
    T = model.steps
    rows, graphs = [], {}
    for S in steps:
        echo(f"S={S}: export")
        graphs[S] = str(tmp / f"steps{S}.onnx")
        rep = export_model(model_pt, graphs[S], ExportOptions(k=10, steps=S))
        row = {"S": S, "T": T, "ops": sum(rep.ops.values()), "graph_mb": rep.graph_bytes / 1e6,
               "max_abs_diff": rep.max_abs_diff, "topk_mismatches": rep.topk_mismatches, "rounds": []}
        if data:
            echo(f"S={S}: cddrec-eval --steps {S}")
            row["quality"] = evaluate(model, ckpt, data, S)
        rows.append(row)
    for r in range(rounds):
        for row in rows:
            echo(f"round {r + 1}/{rounds}, S={row['S']}: cddrec-bench {','.join(backends)}")
            row["rounds"].append(bench(graphs[row["S"]], backends, batch_sizes, min_seconds,
                                       tmp / f"bench{row['S']}_{r}", echo))
    for row in rows:
        row["flops_per_user"] = row["rounds"][0]["flops_per_user"]
        row["bench"] = median_timings([x["results"] for x in row["rounds"]])
    return {"model": str(model_pt), "T": T, "items": model.cfg.num_items, "hidden": model.cfg.hidden_size,
            "data": data, "rounds": rounds, "rows": rows}


def bench(graph: str, backends: list[str], batch_sizes: list[int], min_seconds: float, workdir: Path, echo) -> dict:
    """One ``cddrec-bench --model GRAPH`` run (``run_bench``): FLOPs per user and the timings per backend."""
    from .latency import run_bench

    res = run_bench(graph, backends, batch_sizes, min_seconds=min_seconds, workdir=workdir,
                    echo=lambda m: echo("  " + m))
    return {"flops_per_user": res["flops_per_user"]["total"], "results": [
        {"backend": r["backend"], **({"error": r["error"]} if "error" in r else {
            "timings": [{k: t[k] for k in ("batch", "p50_ms", "p99_ms", "users_per_s", "share_of_roofline")}
                        for t in r["timings"]]})} for r in res["results"]]}


def median_timings(rounds: list[list[dict]]) -> list[dict]:
    """Per backend and batch size, the median p50/p99/users/s over the rounds (a backend that failed in
    any round keeps its first error)."""
    out = []
    for i, first in enumerate(rounds[0]):
        runs = [r[i] for r in rounds]
        failed = next((x for x in runs if "error" in x), None)
        if failed:
            out.append({"backend": first["backend"], "error": failed["error"]})
            continue
        timings = []
        for j, t in enumerate(first["timings"]):
            same = [x["timings"][j] for x in runs]
            timings.append({"batch": t["batch"], **{k: median([x.get(k) for x in same])
                                                   for k in ("p50_ms", "p99_ms", "users_per_s", "share_of_roofline")}})
        out.append({"backend": first["backend"], "timings": timings})
    return out


def median(values: list) -> float | None:
    import numpy as np

    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def evaluate(model, ckpt: dict, data: str, S: int) -> dict:
    """``cddrec-eval MODEL DATA --steps S`` (test split): R@10, N@10, MRR@40."""
    from cddrec.evaluation import evaluate_file
    from cddrec.vocab import Vocab

    res = evaluate_file(model, Vocab.from_dict(ckpt["vocab"]), data, "test", steps=S)
    return {k: res.metrics[k] for k in QUALITY_KEYS} | {"users": res.metrics["users"]}


def table(rep: dict, batch_sizes: list[int]) -> str:
    rows = rep["rows"]
    quality = any("quality" in r for r in rows)
    timed = [(r["backend"], b) for r in rows[0]["bench"] for b in batch_sizes] if rows else []
    head = ["S", "ops", "MFLOP/user"] + (list(QUALITY_KEYS) if quality else []) + [
        f"{be} batch {b} {'p50 ms' if b == 1 else 'users/s'}" for be, b in timed]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["S"]), str(r["ops"]), f"{r['flops_per_user'] / 1e6:.2f}"]
        if quality:
            cells += [cell(r.get("quality", {}).get(k), ".4f") for k in QUALITY_KEYS]
        by = {(x["backend"], t["batch"]): t for x in r["bench"] for t in x.get("timings", [])}
        for be, b in timed:
            t = by.get((be, b))
            cells.append("-" if t is None else f"{t['p50_ms']:.3f}" if b == 1 else f"{t['users_per_s']:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    src = (f"model {rep['model']}" if rep["data"] else "a random paper-size model") + \
        f" ({rep['items']:,} items, d={rep['hidden']}, T={rep['T']})"
    lines += ["", f"Graphs of {src} exported with `cddrec-export --steps S` (validated against the S-step PyTorch "
              "reference), timed by `cddrec-bench --model GRAPH` (full-length histories, one process per backend; "
              f"median of {rep['rounds']} round-robin rounds)."
              + (f" Quality: `cddrec-eval --steps S` on {rep['data']}, test split." if quality else "")]
    return "\n".join(lines)


def fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load)


TO_BE_RUN = """
Quality (to be run: it needs a trained Office model; same run, same machine gives the README's table):

```
cddrec-train ../shared/data/Office_Products.txt -o office.pt --time-budget 3
python -m cddrec.benchmarks.early_exit --model office.pt --data ../shared/data/Office_Products.txt \\
    --steps 1,2,5,10,20 --batch-sizes 1,256 --min-seconds 1 --name early_exit_office
# the quality column alone, per S:
for S in 1 2 5 10 20; do cddrec-eval office.pt ../shared/data/Office_Products.txt --steps $S --json; done
# and the --stages rows it must equal:
cddrec-eval office.pt ../shared/data/Office_Products.txt --stages
```
"""


@click.command()
@click.option("--model", "model_path", default="random", show_default=True,
              help="model file (model.pt), or random: a paper-size model with random weights (speed only)")
@click.option("--data", default=None, type=click.Path(exists=True, dir_okay=False),
              help="sequence file: also cddrec-eval --steps S on its test split")
@click.option("--steps", default="1,2,5,10,20", show_default=True, help="comma-separated S")
@click.option("--backends", default="ort-cpu", show_default=True)
@click.option("--batch-sizes", default="1,256", show_default=True)
@click.option("--min-seconds", default=1.0, show_default=True, type=float)
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="timing rounds over every S (round-robin); each figure is the median")
@click.option("--name", default="early_exit_cpu", show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True, type=click.Path(file_okay=False))
def main(model_path, data, steps, backends, batch_sizes, min_seconds, rounds, name, out_dir):
    tmp = Path(tempfile.mkdtemp(prefix="cddrec-early-exit-"))
    load_before = os.getloadavg()
    model_pt = random_model(tmp / "random.pt", PAPER_ITEMS) if model_path == "random" else Path(model_path)
    sizes = int_list(batch_sizes)
    rep = run(model_pt, int_list(steps), [b.strip() for b in backends.split(",")], sizes,
              min_seconds, data, tmp, echo=lambda m: click.echo(m, err=True), rounds=rounds)
    rep["load_average"] = {"before": load_before, "after": os.getloadavg()}  # (1, 5, 15 min): a shared machine
    text = table(rep, sizes) + (f"\n\nLoad average (1/5/15 min) before {fmt_load(load_before)}, after "
                                f"{fmt_load(rep['load_average']['after'])} on {os.cpu_count()} cores.")
    text += "" if data else "\n" + TO_BE_RUN
    shutil.rmtree(tmp, ignore_errors=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = record(name, rep, text, out_dir, title="Early exit: the state after S of the T reverse steps")
    click.echo(text)
    click.echo(f"\nwrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
