"""Throughput and peak memory of ``cddrec-infer --batch`` over a generated request file.

    python -m cddrec.benchmarks.infer_throughput [--lines 1000000] [--preset tiny|paper]
        [--formats jsonl,parquet] [--model model.onnx] [--name NAME]

    # the whole command against ONNX Runtime alone, both ways (Office's catalogue, paper size):
    python -m cddrec.benchmarks.infer_throughput --lines 300000 --preset paper --items 2420 \
        --threads 2 --engine-seconds 10 --outside-seconds 10 --repeat 3 --name infer_vs_engine_cpu

Presets: ``paper`` (d=128, L=20, T=20, 12,101 items as Beauty) and ``tiny`` (d=8, T=1, same
catalogue unless ``--items``). The JSONL file holds random histories of 1 to 50 known items (1% also
carry an unknown integer key); the Parquet file the same requests (``user`` int64, ``history``
list of strings).

Three tables; the ceilings are never compared with the whole command as equals:

- the whole command: ``cddrec-infer`` runs as a child process (start-up, loading, reading,
  serving, writing), so its wall time and peak resident memory (VmHWM) are what a user gets;
- the whole command against ONNX Runtime alone, measured from outside: an independent loop in a
  process of its own (``onnxruntime`` and numpy only: the graph at ONNX Runtime's default session
  options with ``--threads`` intra-op threads, all cores by default; batches of ``--batch-size``
  users with the history lengths of the request file's first lines, random known ids, left-padded)
  runs for ``--outside-seconds`` just before and just after each command; the ratio is the
  command's users/s over the mean of the two loops. ``--repeat`` alternates loop, command, loop,
  command, ... (each command between its two neighbouring loops);
- ceilings measured in process, after loading, on a warm page cache (the request file was just
  written): the engine alone (the backend on left-padded histories of the same length
  distribution, same batch size and threads) and the pipeline alone (``run_batch`` with
  ``NullEngine``, a backend that costs nothing and returns the same ten ids for every user: the
  best case of the non-engine stages: reading, mapping, padding, decoding, writing). The whole
  command's users/s is given as a share of the engine's ceiling.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .record import RESULTS_DIR, cell, record
from .sizes import PAPER_ITEMS, random_model
from .timer import time_calls

# cddrec-infer with its own peak resident memory printed at exit (VmHWM starts afresh at exec;
# ru_maxrss would include what the parent held when it forked)
CHILD = ("import atexit, sys\n"
         "from cddrec.benchmarks.latency import status_mb\n"
         "atexit.register(lambda: print(f'VmHWM_MB={status_mb(\"VmHWM\"):.1f}', file=sys.stderr))\n"
         "from cddrec.app.infer import main\n"
         "main()\n")


PRESETS = {"paper": {"hidden_size": 128, "steps": 20, "max_len": 20, "heads": 4},
           "tiny": {"hidden_size": 8, "steps": 1, "max_len": 20, "heads": 2}}


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
                if i % 100 == 0:  # an item the model does not know (newer than the model): dropped, counted
                    hist.append(10**9 + i)
                out.append(json.dumps({"user": start + i, "history": hist}))
            f.write("\n".join(out) + "\n")


# ONNX Runtime alone, for the ratio measured from outside: nothing of cddrec, its default session options
ORT_LOOP = """
import json, sys, time
import numpy as np
import onnxruntime as ort
graph, requests, n_items, batch, threads, seconds = sys.argv[1:7]
batch, threads, n_items, seconds = int(batch), int(threads), int(n_items), float(seconds)
lens = []
with open(requests) as f:
    for line in f:
        lens.append(max(1, len(json.loads(line)["history"])))
        if len(lens) == 8 * batch:
            break
rng = np.random.default_rng(0)
feeds = []
for a in range(0, len(lens), batch):
    n = np.array(lens[a:a + batch])
    x = np.zeros((len(n), int(n.max())), dtype=np.int64)  # (B, S), left-padded
    for b, m in enumerate(n):
        x[b, x.shape[1] - m:] = rng.integers(1, n_items + 1, size=m)
    feeds.append(x)
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
for x in feeds[:2]:
    sess.run(None, {"item_ids": x})
users, i, t0 = 0, 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    x = feeds[i % len(feeds)]
    sess.run(None, {"item_ids": x})
    users, i = users + len(x), i + 1
print(users / (time.perf_counter() - t0))
"""


def ort_alone(graph: str, requests: Path, n_items: int, batch_size: int, threads: int, seconds: float) -> float:
    """users/s of ONNX Runtime alone on ``graph`` in a process of its own (``ORT_LOOP``): the engine
    measured from outside, beside the whole command."""
    threads = threads if threads > 0 else (os.cpu_count() or 1)
    proc = subprocess.run([sys.executable, "-c", ORT_LOOP, graph, str(requests), str(n_items), str(batch_size),
                           str(threads), str(seconds)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"the ONNX Runtime loop failed: {proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


def jsonl_to_parquet(src: Path, dst: Path) -> None:
    """The same requests as Parquet: user int64, history list<string>."""
    import polars as pl
    import pyarrow.parquet as pq

    df = pl.read_ndjson(src, schema={"user": pl.Int64, "history": pl.List(pl.String)})
    pq.write_table(df.to_arrow(), dst, row_group_size=65536)


def engine_alone(graph: str, backend: str, batch_size: int, threads: int, seconds: float = 5.0) -> float:
    """users/s of the backend alone on left-padded random histories (1-50 items) at this batch size, with
    the options cddrec-infer serves with (``engine_options``)."""
    from cddrec.runtime.backends import engine_options
    from cddrec.runtime.recommender import Recommender

    rec = Recommender.load(graph, backend=backend, threads=threads, **engine_options(backend))  # as cddrec-infer
    rng = np.random.default_rng(1)
    n_items = rec.contract.num_items
    feeds = []
    for _ in range(8):
        lens = rng.integers(1, 51, size=batch_size)
        x = np.zeros((batch_size, int(lens.max())), dtype=np.int64)  # (B, S), left-padded
        for b, n in enumerate(lens):
            x[b, x.shape[1] - n:] = rng.integers(1, n_items + 1, size=n)
        feeds.append(x)
    return time_calls(lambda i: rec.backend.infer({"item_ids": feeds[i % len(feeds)]}), batch_size, warmup=1,
                      min_runs=1, min_seconds=seconds).users_per_s


class NullEngine:
    """A backend that costs nothing: the same K item ids (the first K) for every user, so the
    pipeline's ceiling is timed without an engine."""

    def __init__(self, k: int):
        self.k = k

    def infer(self, feed):
        B = len(feed["item_ids"])
        return {"top_items": np.broadcast_to(np.arange(1, self.k + 1, dtype=np.int64), (B, self.k)).copy(),
                "top_scores": np.ones((B, self.k), dtype=np.float32)}


def pipeline_alone(graph: str, src: Path, out: Path, batch_size: int) -> float:
    """Ceiling users/s of cddrec-infer's non-engine stages (read, map, pad, decode, write), in process,
    after loading, on a warm page cache, with ``NullEngine``: not comparable with the whole command."""
    from cddrec.runtime.pipeline import run_batch
    from cddrec.runtime.recommender import Recommender

    rec = Recommender.load(graph, threads=1)
    rec.backend = NullEngine(rec.contract.k)
    t0 = time.perf_counter()
    stats = run_batch(rec, src, out, batch_size=batch_size)
    return stats.served / (time.perf_counter() - t0)


def run_infer(graph: str, req: Path, out: Path, batch_size: int, backend: str, threads: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, "--model", graph, "--batch", str(req), "-o", str(out),
           "--batch-size", str(batch_size), "--backend", backend, "--threads", str(threads), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise click.ClickException(f"cddrec-infer failed: {proc.stderr[-2000:]}")
    peak_mb = float(proc.stderr.rsplit("VmHWM_MB=", 1)[1].split()[0])
    served = int(proc.stderr.split("served ", 1)[1].split()[0])
    return {"served": served, "wall_seconds": wall, "users_per_s": served / wall, "peak_rss_mb": peak_mb,
            "request_file_mb": req.stat().st_size / 1e6, "output_file_mb": out.stat().st_size / 1e6,
            "summary": "served " + [ln for ln in proc.stderr.splitlines() if "served " in ln][-1].split("served ", 1)[1]}


def tables(rows: list[dict]) -> str:
    """The whole command's figures, the in-process ceilings in a table of their own, then the whole
    command against ONNX Runtime alone measured from outside (where it was)."""
    whole = ["cddrec-infer, the whole command (a child process: start-up, loading, reading, serving, writing):", "",
             "| preset | format (in and out) | lines | backend | batch | wall s | users/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    whole += [f"| {r['preset']} | {r['format']} | {r['lines']:,} | {r['backend']} | {r['batch_size']} | "
              f"{r['wall_seconds']:.1f} | {r['users_per_s']:,.0f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    ceil = ["Ceilings measured in process, after loading, on a warm page cache: not comparable with the whole "
            "command above. Engine alone: the backend on left-padded histories of the same lengths. Pipeline "
            "alone: reading, mapping, padding, decoding and writing, with an engine that costs nothing and "
            "returns the same ten ids for every user.", "",
            "| preset | format | backend | batch | engine alone users/s (ceiling) | pipeline alone users/s (ceiling) | "
            "whole command / engine ceiling |", "|---|---|---|---|---|---|---|"]
    ceil += [f"| {r['preset']} | {r['format']} | {r['backend']} | {r['batch_size']} | "
             f"{cell(r.get('ceiling_engine_users_per_s'), ',.0f')} | "
             f"{cell(r.get('ceiling_pipeline_users_per_s'), ',.0f')} | "
             f"{cell(r.get('whole_command_over_engine_ceiling'), '.0%')} |" for r in rows]
    out = whole + [""] + ceil
    outside = [r for r in rows if r.get("outside_before_users_per_s")]
    if outside:
        out += ["", "The whole command against ONNX Runtime alone, measured from outside: an independent loop (its own "
                "process, ONNX Runtime's default session options, the same graph, threads, batch size and history "
                "lengths) timed just before and just after the command; ratio = the command's users/s / the mean of "
                "the two loops. Beside it, the in-process ratio (against the engine ceiling above, an upper bound "
                "that leaves out start-up and loading).", "",
                "| format | lines | threads | ONNX Runtime alone before, users/s | whole command users/s | "
                "ONNX Runtime alone after, users/s | whole command / engine alone (from outside) | "
                "whole command / engine ceiling (in process) |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['format']} | {r['lines']:,} | {r['outside_threads']} | "
                f"{r['outside_before_users_per_s']:,.0f} | {r['users_per_s']:,.0f} | "
                f"{r['outside_after_users_per_s']:,.0f} | {r['whole_command_over_engine_outside']:.1%} | "
                f"{cell(r.get('whole_command_over_engine_ceiling'), '.0%')} |" for r in outside]
        ratios = sorted(r["whole_command_over_engine_outside"] for r in outside)
        if len(ratios) > 1:
            out += ["", f"From outside over {len(ratios)} commands: median {statistics.median(ratios):.1%}, "
                    f"range {ratios[0]:.1%} to {ratios[-1]:.1%}."]
    return "\n".join(out + [""] + [f"`{r['summary']}`" for r in rows])


@click.command()
@click.option("--lines", default=1_000_000, show_default=True)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="paper", show_default=True)
@click.option("--formats", default="jsonl", show_default=True, help="comma-separated: jsonl, parquet")
@click.option("--model", "graph", default=None, help="exported graph; default: a random model of --preset")
@click.option("--items", default=PAPER_ITEMS, show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--backend", default="ort-cpu", show_default=True)
@click.option("--threads", default=0, show_default=True)
@click.option("--engine-seconds", default=5.0, show_default=True, help="0 skips timing the engine alone in process")
@click.option("--outside-seconds", default=0.0, show_default=True,
              help="seconds of ONNX Runtime alone (its own process) just before and after each command; 0 skips it")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="commands per format, each between two ONNX Runtime loops")
@click.option("--no-ceilings", is_flag=True, help="skip the in-process pipeline ceiling")
@click.option("--name", default=None, help="results file stem [default: infer_throughput_PRESET]")
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(lines, preset, formats, graph, items, batch_size, backend, threads, engine_seconds, outside_seconds, repeat,
         no_ceilings, name, out_dir):
    from cddrec.export.onnx_export import ExportOptions, export_model
    from cddrec.runtime.recommender import read_serving_info

    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    if outside_seconds and backend != "ort-cpu":
        raise click.UsageError("--outside-seconds times ONNX Runtime on the CPU: use it with --backend ort-cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if graph is None:
            export_model(random_model(tmp / "m.pt", items, **PRESETS[preset]), tmp / "m.onnx", ExportOptions(k=10))
            graph = str(tmp / "m.onnx")
        info = read_serving_info(graph)
        req = tmp / "requests.jsonl"
        t0 = time.perf_counter()
        write_requests(req, info.vocab.keys, lines)
        gen_s = time.perf_counter() - t0
        engine = engine_alone(graph, backend, batch_size, threads, engine_seconds) if engine_seconds else None
        for fmt in fmts:
            src = req
            if fmt == "parquet":
                src = tmp / "requests.parquet"
                jsonl_to_parquet(req, src)
            ceiling = None if no_ceilings else pipeline_alone(graph, src, tmp / f"null.{fmt}", batch_size)
            before = None
            for _ in range(repeat):
                if outside_seconds and before is None:
                    before = ort_alone(graph, req, info.contract.num_items, batch_size, threads, outside_seconds)
                row = {"format": fmt, "lines": lines, "preset": preset, "batch_size": batch_size, "backend": backend,
                       "threads": threads, "generate_seconds": gen_s,
                       **run_infer(graph, src, tmp / f"recs.{fmt}", batch_size, backend, threads)}
                row.update(ceiling_engine_users_per_s=engine, ceiling_pipeline_users_per_s=ceiling,
                           whole_command_over_engine_ceiling=row["users_per_s"] / engine if engine else None)
                if outside_seconds:
                    after = ort_alone(graph, req, info.contract.num_items, batch_size, threads, outside_seconds)
                    row.update(outside_threads=threads if threads > 0 else os.cpu_count(),
                               outside_before_users_per_s=before, outside_after_users_per_s=after,
                               whole_command_over_engine_outside=row["users_per_s"] / ((before + after) / 2))
                    before = after
                rows.append(row)
                click.echo(json.dumps(row), err=True)
    table = tables(rows)
    record(name or f"infer_throughput_{preset}", {"rows": rows}, table, out_dir,
           title="cddrec-infer --batch throughput: the whole command, in-process ceilings, the engine from outside")
    click.echo(table)


if __name__ == "__main__":
    main()
