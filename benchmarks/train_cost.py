"""Training cost of the ranking loss: seconds per batch and per epoch with the full-catalogue
softmax at every step (``rank_steps=all``) or at the last step only (``last``), per dataset.

    flock /tmp/cddrec-bench.lock python -m cddrec.benchmarks.train_cost --data-dir ../shared/data \\
        --datasets Office_Products,Office_Products:40,Beauty:8,Beauty --batches 12 --threads 1

Both variants train the same first ``--batches`` batches of epoch 0 (after 2 warm-up batches),
interleaved batch by batch, with the dataset's preset (paper config: d=128, L=20, batch 128, T
from the preset) on ``--threads`` CPU threads; the epoch time is the mean batch time times the
batches of an epoch (an extrapolation, validation excluded). The ratio all/last is the cost of
ranking at every step; ``rank_steps: auto`` (cddrec.config.AUTO_RANK_MAX) is derived from these rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from cddrec.batches import TrainBatches
from cddrec.config import AUTO_RANK_MAX, ModelConfig, TrainConfig, from_flat, preset_for
from cddrec.data import load_data
from cddrec.losses import objective
from cddrec.model import CDDRec
from cddrec.training import set_seed

from .record import RESULTS_DIR, record


def time_variants(cfgs: dict[str, tuple[ModelConfig, TrainConfig]], data, batches: int,
                  warmup: int = 2) -> dict[str, dict]:
    """Seconds per training batch of each (model, train) config pair, the variants interleaved batch by batch
    (same batches, so load changes on a shared machine hit every variant alike)."""
    models, opts = {}, {}
    for name, (model_cfg, train_cfg) in cfgs.items():
        set_seed(train_cfg.seed)
        models[name] = CDDRec(model_cfg).train()
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=train_cfg.lr)
    first_model, first_train = next(iter(cfgs.values()))
    it = TrainBatches(data, first_model.max_len, first_train.batch_size, seed=first_train.seed)
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for i, batch in enumerate(it):
        if i >= warmup + batches:
            break
        for name in cfgs:
            t0 = time.perf_counter()
            loss, _ = objective(models[name], batch, cfgs[name][1])
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        per_batch = sum(ts) / len(ts)
        out[name] = {"batches_timed": len(ts), "seconds_per_batch": per_batch, "batches_per_epoch": len(it),
                     "targets_per_epoch": it.num_targets, "epoch_seconds_est": per_batch * len(it)}
    return out


@click.command()
@click.option("--data-dir", default="../shared/data", show_default=True, type=click.Path(file_okay=False))
@click.option("--datasets", default="Office_Products,Office_Products:40,Beauty:8,Beauty", show_default=True,
              help="DATASET or DATASET:T (another T on the same data)")
@click.option("--batches", default=30, show_default=True, help="timed batches per variant")
@click.option("--threads", default=1, show_default=True)
@click.option("--name", default="train_cost", show_default=True)
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(data_dir, datasets, batches, threads, name, out_dir):
    torch.set_num_threads(threads)
    rows = []
    loaded = {}
    for entry in [d.strip() for d in datasets.split(",") if d.strip()]:
        ds, _, steps = entry.partition(":")  # "Beauty:8": Beauty with T=8 (another N*T on the same data)
        path = Path(data_dir) / f"{ds}.txt"
        if ds not in loaded:
            loaded[ds] = load_data(path)
        data = loaded[ds]
        base = {**preset_for(path), **({"steps": int(steps)} if steps else {}), "num_items": data.num_items}
        cfgs = {v: from_flat({**base, "rank_steps": v})[:2] for v in ("last", "all")}  # (model, train) configs
        for variant, timing in time_variants(cfgs, data, batches).items():
            steps = cfgs[variant][0].steps
            r = {"dataset": ds, "rank_steps": variant, "N": data.num_items, "T": steps,
                 "NxT": data.num_items * steps, **timing}
            rows.append(r)
            click.echo(f"{ds} {variant}: {r['seconds_per_batch']:.3f} s/batch, ~{r['epoch_seconds_est']:.0f} s/epoch "
                       f"({r['batches_per_epoch']} batches)", err=True)
    by = {(r["dataset"], r["T"], r["rank_steps"]): r for r in rows}
    table = ["| dataset | N | T | N*T | rank_steps | s/batch | batches/epoch | s/epoch (est.) | all/last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["seconds_per_batch"] / by[(r["dataset"], r["T"], "last")]["seconds_per_batch"]
        table.append(f"| {r['dataset']} | {r['N']:,} | {r['T']} | {r['NxT']:,} | {r['rank_steps']} | "
                     f"{r['seconds_per_batch']:.3f} | {r['batches_per_epoch']} | {r['epoch_seconds_est']:.0f} | "
                     f"{ratio:.2f}x |")
    text = "\n".join(table) + (
        f"\n\n{threads} CPU thread(s); {batches} timed batches per row after 2 warm-up batches, the two variants "
        "interleaved batch by batch; epoch time = "
        "s/batch x batches/epoch (validation excluded). Paper config (d=128, L=20, batch 128) with each dataset's "
        f"preset. `rank_steps: auto` ranks at every step while N*T <= {AUTO_RANK_MAX:,}, else at the last step.")
    record(name, {"rows": rows, "threads": threads, "auto_rank_max": AUTO_RANK_MAX}, text, out_dir,
           title="Training cost of the ranking loss (all steps vs last step)")
    click.echo(text)


if __name__ == "__main__":
    main()
