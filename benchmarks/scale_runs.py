"""Long training runs for issue 22, one command each, for a quiet machine (they take tens of minutes).

    # 2 processes x 1 thread (torchrun, DDP) against 1 process x 2 threads, same seed and global batch:
    python -m cddrec.benchmarks.scale_runs processes --data ../shared/data/Office_Products.txt

    # the sampled softmax against the full softmax, the same time budget each:
    python -m cddrec.benchmarks.scale_runs objectives --data-dir ../shared/data \\
        --datasets Office_Products,Beauty --time-budget 30

Every run is the command a user types (``cddrec-train``, or ``torchrun ... -m cddrec.app.train``),
then ``cddrec-eval`` on the test split; the record (``benchmarks/results/NAME.{json,md}``) holds
each command, the training summary (epochs, seconds per epoch: training only, validation excluded)
and the test metrics. ``--train-args`` adds options to every training command (a smaller model, a
few epochs: how these commands are checked on tiny data).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from .record import RESULTS_DIR, record, user_command

METRICS = ("R@10", "N@10", "MRR", "R@20", "N@20")


def train_and_test(train_cmd: list[str], model: Path, data: Path, summary: Path, device: str) -> dict:
    """Run a training command, then ``cddrec-eval`` on the test split: the summary, metrics and commands."""
    t0 = time.perf_counter()
    r = subprocess.run(train_cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise click.ClickException(f"{shlex.join(train_cmd)} failed ({r.returncode}): "
                                   + " | ".join((r.stderr.strip().splitlines() or ["?"])[-3:]))
    s = json.loads(summary.read_text())
    eval_cmd = [*user_command("cddrec-eval"), str(model), str(data), "--json", "--device", device]
    e = subprocess.run(eval_cmd, capture_output=True, text=True)
    if e.returncode != 0:
        raise click.ClickException(f"{shlex.join(eval_cmd)} failed: {e.stderr.strip()[-300:]}")
    test = json.loads(e.stdout[e.stdout.index("{"):])
    start = next((x for x in r.stderr.splitlines() if x.startswith("training on")), "")
    return {"command": shlex.join(train_cmd), "eval_command": shlex.join(eval_cmd), "wall_seconds": round(wall, 1),
            "epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"], "stop_reason": s["stop_reason"],
            "seconds_per_epoch": s["seconds_per_epoch"], "train_seconds": s["train_seconds"],
            "global_batch": s.get("global_batch"), "processes": s.get("processes", 1), "threads": s.get("threads"),
            "valid": s["best_valid"], "test": {k: test[k] for k in METRICS}, "start_line": start}


def row(name: str, r: dict) -> str:
    return (f"| {name} | {r['processes']} x {r['threads']} | {r['global_batch']} | {r['seconds_per_epoch']} | "
            f"{r['epochs_run']} | {r['best_epoch']} | {r['train_seconds']:.0f} | "
            + " | ".join(f"{r['test'][k]:.4f}" for k in METRICS) + f" | {r['stop_reason']} |")


HEADER = ["| run | processes x threads | global batch | s/epoch (training) | epochs | best epoch | train s | "
          + " | ".join(f"test {k}" for k in METRICS) + " | stopped |", "|---" * (7 + len(METRICS) + 1) + "|"]


@click.group()
def main():
    """Long training runs of issue 22 (see the module docstring)."""


@main.command()
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--processes", default=2, show_default=True, help="torchrun processes (--nproc-per-node)")
@click.option("--threads-per-process", default=1, show_default=True)
@click.option("--single-threads", default=2, show_default=True, help="threads of the one-process run")
@click.option("--batch-size", default=128, show_default=True, help="the global batch of both runs")
@click.option("--seed", default=42, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda (one GPU per process)")
@click.option("--train-args", default="", help="more options for both training commands (quoted)")
@click.option("--name", default=None, help="record name [ddp_processes_DATASET]")
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def processes(data, processes, threads_per_process, single_threads, batch_size, seed, device, train_args, name,
              out_dir):
    """One process with --single-threads against torchrun with --processes x --threads-per-process: epoch time
    and test quality, the same seed and global batch (per-process batch = global / processes)."""
    if batch_size % processes:
        raise click.BadParameter(f"--batch-size {batch_size} is not a multiple of --processes {processes}")
    data = Path(data)
    extra = shlex.split(train_args)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = [str(data), "--seed", str(seed), "--device", device, "--quiet", *extra]
        plan = {
            f"1 process x {single_threads} threads": [
                *user_command("cddrec-train"), *common, "--threads", str(single_threads),
                "--batch-size", str(batch_size)],
            f"torchrun {processes} x {threads_per_process} thread{'s' if threads_per_process > 1 else ''}": [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                "-m", "cddrec.app.train", *common, "--threads", str(threads_per_process),
                "--batch-size", str(batch_size // processes)],
        }
        for i, (label, cmd) in enumerate(plan.items()):
            model, summary = tmp / f"m{i}.pt", tmp / f"s{i}.json"
            cmd = [*cmd, "-o", str(model), "--summary-json", str(summary)]
            click.echo(f"{label}: {shlex.join(cmd)}", err=True)
            runs[label] = train_and_test(cmd, model, data, summary, device)
            click.echo(f"  {runs[label]['seconds_per_epoch']} s/epoch, test N@10 {runs[label]['test']['N@10']:.4f}",
                       err=True)
    labels = list(runs)
    a, b = runs[labels[0]], runs[labels[1]]
    ratio = a["seconds_per_epoch"] / b["seconds_per_epoch"] if b["seconds_per_epoch"] else float("nan")
    text = "\n".join([*HEADER, *(row(k, v) for k, v in runs.items()), "",
                      f"{labels[1]} against {labels[0]}: {ratio:.2f}x the epochs per second; test N@10 "
                      f"{b['test']['N@10']:.4f} against {a['test']['N@10']:.4f} (one seed each: the two runs draw "
                      "their shuffles and negatives from different streams, so a small difference is noise).", "",
                      "Commands:", "", *(f"- `{v['command']}`" for v in runs.values())])
    record(name or f"ddp_processes_{data.stem}", {"dataset": data.stem, "runs": runs}, text, out_dir,
           title=f"Processes against threads, {data.stem}")
    click.echo(text)


@main.command()
@click.option("--data-dir", default="../shared/data", show_default=True, type=click.Path(file_okay=False))
@click.option("--datasets", default="Office_Products,Beauty", show_default=True)
@click.option("--variants", default="ce;sampled", show_default=True,
              help="';'-separated --loss values, each optionally with its own options ('sampled --negatives 512')")
@click.option("--time-budget", default=30.0, show_default=True, help="minutes of training per run")
@click.option("--seed", default=42, show_default=True)
@click.option("--threads", default=2, show_default=True, help="CPU threads of every run (fixed: the budgets compare)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--train-args", default="", help="more options for every training command (quoted)")
@click.option("--name", default="sampled_vs_ce", show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def objectives(data_dir, datasets, variants, time_budget, seed, threads, device, train_args, name, out_dir):
    """The sampled softmax against the full softmax (ce): the same data, seed and time budget; test quality."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for ds in [d.strip() for d in datasets.split(",")]:
            data = Path(data_dir) / f"{ds}.txt"
            if not data.exists():
                raise click.BadParameter(f"{data}: no such file", param_hint="--data-dir/--datasets")
            for v in [x.strip() for x in variants.split(";") if x.strip()]:
                i = len(runs)
                model, summary = tmp / f"m{i}.pt", tmp / f"s{i}.json"
                cmd = [*user_command("cddrec-train"), str(data), "-o", str(model), "--loss", *shlex.split(v),
                       "--time-budget", f"{time_budget:g}", "--seed", str(seed), "--threads", str(threads),
                       "--device", device, "--quiet", "--summary-json", str(summary), *shlex.split(train_args)]
                click.echo(f"{ds} {v}: {shlex.join(cmd)}", err=True)
                runs.append({"dataset": ds, "variant": v, **train_and_test(cmd, model, data, summary, device)})
                click.echo(f"  {runs[-1]['epochs_run']} epochs, test N@10 {runs[-1]['test']['N@10']:.4f}", err=True)
    table = ["| dataset | --loss | s/epoch (training) | epochs | best epoch | "
             + " | ".join(f"test {k}" for k in METRICS) + " | stopped |", "|---" * (5 + len(METRICS) + 1) + "|"]
    for r in runs:
        table.append(f"| {r['dataset']} | {r['variant']} | {r['seconds_per_epoch']} | {r['epochs_run']} | "
                     f"{r['best_epoch']} | " + " | ".join(f"{r['test'][k]:.4f}" for k in METRICS)
                     + f" | {r['stop_reason']} |")
    text = "\n".join([*table, "", f"Each run: --time-budget {time_budget:g} (minutes of wall time, validation "
                      f"included) or early stopping, whichever comes first; seed {seed}, {threads} threads, the "
                      "dataset's preset" + (f", and `{train_args}`" if train_args else "") + "; test split, full "
                      "ranking (exact evaluation for every objective). Seconds per epoch: training only.", "",
                      "Commands:", "",
                      *(f"- `{r['command']}`" for r in runs)])
    record(name, {"runs": runs, "time_budget": time_budget, "train_args": train_args}, text, out_dir,
           title="Sampled softmax against the full softmax, the same time budget")
    click.echo(text)


if __name__ == "__main__":
    main()
