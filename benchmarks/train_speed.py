"""Training speed: seconds per epoch on Office_Products with the paper's configuration.

    python -m cddrec.benchmarks.train_speed --data-dir ../shared/data [--epochs 2]

Each variant trains ``--epochs`` full epochs (d=128, 1 layer, 4 heads, L=20, T=20, batch 128,
Office beta_T=0.04); the figure is the mean training time of an epoch, validation excluded
(reported separately). The published code took ``PUBLISHED_EPOCH_SECONDS`` (510 s) for one epoch on this kind of machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from cddrec.config import from_flat, preset_for
from cddrec.data import eval_split, load_data
from cddrec.evaluation import evaluate
from cddrec.model import CDDRec
from cddrec.training import train

from .record import RESULTS_DIR, record
from .sizes import PUBLISHED_EPOCH_SECONDS

VARIANTS = {
    "default": {},
    "paper-objective": {"loss": "cd", "cd_divergence": "kl", "lam": 0.3, "denoising": True},
    "default+infonce": {"lam": 0.3},
    "sasrec": {"decoder": False, "lam": 0.0},
}


@click.command()
@click.option("--data-dir", default="../shared/data", show_default=True, type=click.Path(file_okay=False))
@click.option("--dataset", default="Office_Products", show_default=True)
@click.option("--epochs", default=2, show_default=True)
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(data_dir, dataset, epochs, variants, out_dir):
    path = Path(data_dir) / f"{dataset}.txt"
    data = load_data(path)
    rows = []
    for name in [v.strip() for v in variants.split(",")]:
        model_cfg, train_cfg, run_cfg = from_flat({**preset_for(path), **VARIANTS[name], "epochs": epochs,
                                                   "patience": epochs + 1})
        with tempfile.TemporaryDirectory() as tmp:
            s = train(model_cfg, train_cfg, run_cfg, data, Path(tmp) / "m.pt", progress=False, log=lambda m: None)
        model = CDDRec(model_cfg.replace(num_items=data.num_items)).eval()
        t0 = time.perf_counter()
        evaluate(model, eval_split(data, "valid", model_cfg.max_len))
        secs = [h["seconds"] for h in s["history"]]
        rows.append({"variant": name, "overrides": VARIANTS[name], "seconds_per_epoch": sum(secs) / len(secs),
                     "epoch_seconds": secs, "validation_seconds": time.perf_counter() - t0,
                     "batches_per_epoch": s["history"][0]["batches"]})
        click.echo(f"{name}: {rows[-1]['seconds_per_epoch']:.1f} s/epoch", err=True)
    table = ["| variant | overrides | s/epoch (training) | epochs timed | validation s | "
             f"vs published code ({PUBLISHED_EPOCH_SECONDS} s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['variant']} | `{r['overrides']}` | {r['seconds_per_epoch']:.1f} | {len(r['epoch_seconds'])} | "
                     f"{r['validation_seconds']:.1f} | {PUBLISHED_EPOCH_SECONDS / r['seconds_per_epoch']:.1f}x faster |")
    text = "\n".join(table) + (f"\n\n{dataset}: {data.stats()}; d=128, 1 layer, 4 heads, L=20, T=20, batch 128, "
                               f"beta_T={preset_for(path).get('beta_T', 0.002)}; target <= 25 s/epoch.")
    record(f"train_speed_{dataset}", {"dataset": dataset, "split": "train", "rows": rows,
                                      "seconds": sum(sum(r["epoch_seconds"]) for r in rows)},
           text, out_dir, title=f"Training speed, {dataset}")
    click.echo(text)


if __name__ == "__main__":
    main()
