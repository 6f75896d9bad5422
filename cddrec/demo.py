"""``cddrec-demo``: the whole job on an embedded default, in about a minute.

A seeded synthetic dataset with planted sequential structure (``data.make_synthetic``) is
written to the demo folder, a small CDDRec is trained on it under a time budget, and the test
split is evaluated with full ranking beside a most-popular baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import CDDRecConfig
from .data import eval_split, make_synthetic, write_sequence_file
from .evaluation import evaluate, evaluate_popularity, format_table
from .training import train

DEMO_CONFIG = dict(hidden_size=64, num_heads=2, max_len=20, steps=10, beta_T=0.04, batch_size=128,
                   epochs=40, patience=5)


def run_demo(out_dir: str | Path, minutes: float = 1.0, seed: int = 0,
             echo: Callable[[str], None] = print) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = make_synthetic(num_users=3000, num_items=400, seed=seed)
    data_path = out_dir / "synthetic.txt"
    write_sequence_file(data, data_path)
    data.source = str(data_path)
    echo(f"synthetic data: {data.stats()} -> {data_path}")
    cfg = CDDRecConfig(**DEMO_CONFIG, seed=seed, time_budget=minutes)
    model_path = out_dir / "model.pt"
    summary = train(cfg, data, model_path, progress=False, log=echo)

    from .checkpoint import load_checkpoint

    model, _ = load_checkpoint(model_path)
    test = eval_split(data, "test", model.cfg.max_len)
    res = evaluate(model, test)
    pop = evaluate_popularity(data.popularity("train"), test, data.num_items)
    keys = ["model", "R@1", "R@5", "R@10", "N@10", "MRR", "AvgChange@40"]
    rows = [{"model": "CDDRec", **res.metrics}, {"model": "most popular", **pop}]
    echo(f"\ntest split, full ranking over {data.num_items} items, {res.metrics['users']} users "
         f"({summary['epochs_run']} epochs, {summary['train_seconds']:.0f}s of training):")
    echo(format_table(rows, keys))
    return {"model": str(model_path), "data": str(data_path), "test": res.metrics, "popularity": pop,
            "summary": summary}
