"""``cddrec-demo``: the whole job on an embedded default, in about a minute.

A seeded synthetic dataset with planted sequential structure (``cddrec.synthetic``) is written
to the demo folder, a small CDDRec is trained on it under a time budget, the test split is
evaluated with full ranking beside a most-popular baseline, and the model is exported, served
with the batch pipeline and timed. It lives in the app layer because it drives every wing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import click

from cddrec.config import from_flat
from cddrec.data import eval_split
from cddrec.errors import ConfigError
from cddrec.evaluation import evaluate, evaluate_popularity, format_table
from cddrec.io import atomic_folder
from cddrec.synthetic import make_synthetic, write_sequence_file
from cddrec.training import train

from .options import CONTEXT, Finite, friendly_errors, option

DEMO_CONFIG = dict(hidden_size=64, num_heads=2, max_len=20, steps=10, beta_T=0.04, batch_size=128,
                   epochs=40, patience=5)


def run_demo(out_dir: str | Path, minutes: float = 1.0, seed: int = 0,
             echo: Callable[[str], None] = print, force: bool = False) -> dict:
    """Run the demo into ``out_dir``. An earlier run there is refused unless ``force``; the run is
    written to a temporary folder beside it and renamed into place only when complete, so an
    interrupted run leaves the earlier one untouched (never a mix of old and new files)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise ConfigError(f"{out_dir} already exists and is not empty (an earlier demo run?); "
                          "use --force to replace it or --output another folder")
    with atomic_folder(out_dir) as work:
        result = _run_demo(work, out_dir, minutes, seed, echo)
    echo(f"\nwrote the demo run to {out_dir}/")
    return {k: (str(out_dir / Path(v).name) if k in ("model", "data") else v) for k, v in result.items()}


def _run_demo(out_dir: Path, final_dir: Path, minutes: float, seed: int, echo: Callable[[str], None]) -> dict:
    data = make_synthetic(num_users=3000, num_items=400, seed=seed)
    data_path = out_dir / "synthetic.txt"
    write_sequence_file(data, data_path)
    data.source = str(final_dir / data_path.name)
    echo(f"synthetic data: {data.stats()} -> {final_dir / data_path.name}")
    configs = from_flat({**DEMO_CONFIG, "seed": seed, "time_budget": minutes})  # model, train, run
    model_path = out_dir / "model.pt"
    summary = train(*configs, data, model_path, progress=False, log=echo)

    from cddrec.checkpoint import load_checkpoint

    model, _ = load_checkpoint(model_path)
    test = eval_split(data, "test", model.cfg.max_len)
    res = evaluate(model, test)
    pop = evaluate_popularity(data.popularity("train"), test, data.num_items)
    keys = ["model", "R@1", "R@5", "R@10", "N@10", "MRR", "AvgChange@40"]
    rows = [{"model": "CDDRec", **res.metrics}, {"model": "most popular", **pop}]
    echo(f"\ntest split, full ranking over {data.num_items} items, {res.metrics['users']} users "
         f"({summary['epochs_run']} epochs, {summary['train_seconds']:.0f}s of training):")
    echo(format_table(rows, keys))

    # export -> serve the test histories -> a short speed table
    from cddrec.export.onnx_export import ExportOptions, export_model
    from cddrec.runtime.pipeline import run_batch
    from cddrec.runtime.recommender import Recommender

    graph = out_dir / "model.onnx"
    rep = export_model(model_path, graph, ExportOptions(k=10))
    echo(f"\nexported {final_dir / graph.name}: {sum(rep.ops.values())} ops, validated against PyTorch "
         f"(max |score diff| {max(rep.max_abs_diff.values()):.1e})")
    requests = out_dir / "requests.jsonl"
    with open(requests, "w") as f:
        for u, seq in zip(data.users, data.sequences):
            f.write(json.dumps({"user": u, "history": data.items.decode(seq[:-1].tolist())}) + "\n")
    rec = Recommender.load(graph)
    stats = run_batch(rec, requests, out_dir / "recommendations.jsonl", k=10)
    echo(f"cddrec-infer: {stats.summary()} -> {final_dir / 'recommendations.jsonl'}")
    speed = quick_speed(model_path, graph, rec.info.L, data.num_items)
    echo("\n" + format_table(speed, ["backend", "batch", "p50 ms", "users/s"]))
    return {"model": str(model_path), "data": str(data_path), "test": res.metrics, "popularity": pop,
            "summary": summary, "speed": speed}


def quick_speed(model_path: Path, graph: Path, L: int, num_items: int, seconds: float = 0.5) -> list[dict]:
    """p50 latency and throughput of the eager PyTorch reference and ONNX Runtime (a quick look;
    ``cddrec-bench`` measures properly)."""
    import numpy as np

    from cddrec.benchmarks.latency import time_backend
    from cddrec.runtime.backends import load_backend

    rng = np.random.default_rng(0)
    rows = []
    for name, path in (("torch (eager reference)", model_path), ("ort-cpu", graph)):
        be = load_backend(path, "torch" if name.startswith("torch") else "ort-cpu", k=10)
        for b in (1, 256):
            pool = [rng.integers(1, num_items + 1, size=(b, L)) for _ in range(2)]
            t = time_backend(be, pool, warmup=2, min_runs=5, min_seconds=seconds)
            rows.append({"backend": name, "batch": b, "p50 ms": round(t.p50_ms, 2), "users/s": round(t.users_per_s)})
    return rows


@click.command(context_settings=CONTEXT)
@option("--output", "-o", "out_dir", default="cddrec-demo", show_default=True, type=click.Path(file_okay=False),
        hidden_aliases=("--out",), help="folder for the demo's data, model, graph and recommendations")
@option("--minutes", default=1.0, show_default=True, type=Finite(min=0, min_open=True),
        help="training time budget")
@option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="seed of the data and the training")
@option("--force", is_flag=True, help="replace an earlier demo run in the folder")
@friendly_errors
def main(out_dir, minutes, seed, force):
    """Train, evaluate, export and serve CDDRec on a seeded synthetic dataset with planted sequential structure."""
    run_demo(out_dir, minutes=minutes, seed=seed, echo=click.echo, force=force)


if __name__ == "__main__":
    main()
