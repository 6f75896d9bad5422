"""Engine instances on the CPU: one ONNX Runtime run on every core's thread, against one-thread runs
side by side on the same session (what ``cddrec-serve --instances`` does), interleaved.

Per round, for each layout and batch size: ``--seconds`` of back-to-back runs on fresh random
histories, the users/s of all its runs together. Layouts:

- ``one run, N threads``: one caller, the session's intra-op pool of N threads spinning (ONNX
  Runtime's defaults, the denominator of the serving targets);
- ``N runs, 1 thread each``: N callers at once on one single-thread session.

    python -m cddrec.benchmarks.instances --graph m.onnx --batch-sizes 16,32,64,128,256 --rounds 3
"""

from __future__ import annotations

import threading
import time

import click
import numpy as np

from cddrec.runtime.session import ort_session

from .record import RESULTS_DIR, record


def users_per_s(session, batch: int, seconds: float, callers: int, items: int, length: int, seed: int) -> float:
    """Users per second of ``callers`` threads running ``session`` back to back on (batch, length) histories."""
    rng = np.random.default_rng(seed)
    feeds = [{"item_ids": rng.integers(1, items + 1, size=(batch, length), dtype=np.int64)} for _ in range(callers)]
    for f in feeds:
        session.run(None, f)  # warm
    counts = [0] * callers
    stop = time.perf_counter() + seconds

    def caller(i: int) -> None:
        while time.perf_counter() < stop:
            session.run(None, feeds[i])
            counts[i] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) * batch / (time.perf_counter() - t0)


def table(rep: dict) -> str:
    lines = ["| layout | batch | users/s per round | median users/s | / one run at batch 256 |", "|---|---|---|---|---|"]
    base = rep["baseline_users_per_s"]
    for r in rep["rows"]:
        lines.append(f"| {r['layout']} | {r['batch']} | {', '.join(f'{x:,.0f}' for x in r['rounds'])} | "
                     f"{r['median']:,.0f} | {r['median'] / base:.2f} |")
    return "\n".join(lines)


@click.command()
@click.option("--graph", required=True, type=click.Path(exists=True, dir_okay=False), help="an exported graph")
@click.option("--cores", default=0, show_default=True, help="N (0: os.cpu_count())")
@click.option("--batch-sizes", default="16,32,64,128,256", show_default=True)
@click.option("--seconds", default=2.0, show_default=True, help="timed seconds per layout, batch and round")
@click.option("--rounds", default=3, show_default=True, help="rounds, each over every layout and batch in turn")
@click.option("--history", default=20, show_default=True)
@click.option("-o", "--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
@click.option("--name", default="serve_instances_cpu", show_default=True)
def main(graph, cores, batch_sizes, seconds, rounds, history, out_dir, name):
    import os

    from cddrec.contract import GraphContract

    n = cores or os.cpu_count() or 1
    sizes = [int(b) for b in batch_sizes.split(",")]
    items = GraphContract.from_metadata(ort_session(graph).get_modelmeta().custom_metadata_map).num_items
    layouts = {f"one run, {n} threads": (ort_session(graph, threads=n, allow_spinning=True), 1),
               f"{n} runs, 1 thread each": (ort_session(graph, threads=1, allow_spinning=False), n)}
    got: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for b in sizes:
            for label, (sess, callers) in layouts.items():
                got.setdefault((label, b), []).append(users_per_s(sess, b, seconds, callers, items, history, seed=r))
                click.echo(f"round {r + 1}, batch {b}, {label}: {got[(label, b)][-1]:,.0f} users/s", err=True)
    rows = [{"layout": label, "batch": b, "rounds": v, "median": float(np.median(v))} for (label, b), v in got.items()]
    base = float(np.median(got[(f"one run, {n} threads", max(sizes))]))
    rep = {"graph": str(graph), "cores": n, "seconds": seconds, "history": history, "rows": rows,
           "baseline_users_per_s": base, "baseline": f"one run, {n} threads, batch {max(sizes)}"}
    record(name, rep, table(rep), out_dir, title="Engine instances: one multi-threaded run against one-thread runs "
                                                 "side by side (ONNX Runtime, CPU)")
    click.echo(table(rep))


if __name__ == "__main__":
    main()
