"""Quality against the paper's Table 2: train with a recorded recipe, evaluate the test split.

    python -m cddrec.benchmarks.quality --dataset Office_Products --data-dir ../shared/data \\
        [--recipes cddrec,sasrec-ce,sasrec-bce] [--seeds 0,1,2] [--time-budget 60]

Every run trains on the training prefixes with early stopping on the validation split, then
evaluates the held-out test split with full ranking (seen items excluded). Results are
appended to ``quality_DATASET.json`` as runs finish (a rerun skips recipes and seeds already
there), and ``quality_DATASET.md`` puts mean and spread beside the paper's numbers. The paper
truncates its ranking lists at 40, so its MRR is compared with our MRR@40 (full MRR is shown
too).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from cddrec.checkpoint import load_checkpoint
from cddrec.config import from_flat, preset_for, to_flat
from cddrec.data import eval_split, load_data
from cddrec.evaluation import evaluate
from cddrec.training import train

from .record import RESULTS_DIR, command_line, git_commit, record

# Table 2 of the paper, CDDRec column (test split, full ranking).
PAPER = {
    "Office_Products": {"R@1": 0.0271, "R@5": 0.0765, "R@10": 0.1091, "N@5": 0.0521, "N@10": 0.0627, "MRR": 0.0548},
    "Beauty": {"R@1": 0.0203, "R@5": 0.0542, "R@10": 0.0770, "N@5": 0.0376, "N@10": 0.0447, "MRR": 0.0387},
    "Tools_and_Home_Improvement": {"R@1": 0.0127, "R@5": 0.0359, "R@10": 0.0522, "N@5": 0.0244, "N@10": 0.0297,
                                   "MRR": 0.0253},
    "Toys_and_Games": {"R@1": 0.0270, "R@5": 0.0665, "R@10": 0.0935, "N@5": 0.0472, "N@10": 0.0559, "MRR": 0.0479},
}
# Table 2's SASRec column, for the baselines.
PAPER_SASREC = {
    "Office_Products": {"R@1": 0.0198, "R@5": 0.0656, "R@10": 0.0989, "N@5": 0.0428, "N@10": 0.0534, "MRR": 0.0457},
    "Beauty": {"R@1": 0.0129, "R@5": 0.0416, "R@10": 0.0633, "N@5": 0.0274, "N@10": 0.0343, "MRR": 0.0291},
    "Tools_and_Home_Improvement": {"R@1": 0.0103, "R@5": 0.0284, "R@10": 0.0427, "N@5": 0.0194, "N@10": 0.0240,
                                   "MRR": 0.0207},
    "Toys_and_Games": {"R@1": 0.0193, "R@5": 0.0551, "R@10": 0.0797, "N@5": 0.0377, "N@10": 0.0456, "MRR": 0.0385},
}
KEYS = ("R@1", "R@5", "R@10", "N@5", "N@10", "MRR")

# Recipes: overrides of the config defaults (after the dataset preset).
RECIPES: dict[str, dict] = {
    "cddrec": {},  # the default recipe (the configs' defaults; rank_steps auto)
    # The ranking loss at the last step only / at every step: on 12k-item catalogues the
    # full-catalogue CE at all T steps costs 7-12x the epoch time (train_cost.md); ``auto`` picks by N*T.
    "cddrec-last": {"rank_steps": "last"},
    "cddrec-all": {"rank_steps": "all"},
    "cddrec-paper-objective": {"loss": "cd", "cd_divergence": "kl", "lam": 0.3, "denoising": True},
    # Table 3 ablations, on the objective that uses diffusion and sampling (InfoNCE on noisy targets)
    "cddrec-infonce-sampling": {"lam": 0.3, "denoising": True},
    "cddrec-no-diffusion": {"lam": 0.3, "denoising": True, "diffusion": False},
    "cddrec-no-denoising": {"lam": 0.3, "denoising": False},
    "sasrec-ce": {"decoder": False, "lam": 0.0, "loss": "ce"},
    "sasrec-bce": {"decoder": False, "lam": 0.0, "loss": "cd", "cd_divergence": "dot"},
}


def run_one(data, path: Path, recipe: str, seed: int, time_budget: float, extra: dict) -> dict:
    configs = from_flat({**preset_for(path), **RECIPES[recipe], **extra, "seed": seed, "time_budget": time_budget})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.pt"
        summary = train(*configs, data, model_path, progress=False, log=lambda m: click.echo(f"  {m}", err=True))
        model, _ = load_checkpoint(model_path)
    res = evaluate(model, eval_split(data, "test", model.cfg.max_len), stages=model.decoder is not None)
    return {"recipe": recipe, "seed": seed, "command": command_line(), "commit": git_commit(),
            "config": {k: v for k, v in to_flat(*configs).items() if k != "extra"},
            "test": res.metrics, "valid": summary["best_valid"], "stages": res.stages,
            "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
            "train_seconds": summary["train_seconds"], "seconds": time.perf_counter() - t0,
            "stop_reason": summary["stop_reason"], "seconds_per_epoch": summary["seconds_per_epoch"]}


def summarize(dataset: str, runs: list[dict]) -> str:
    lines = ["| model | seeds | " + " | ".join(KEYS) + " | MRR (full) | Avg.Change@40 | train min |",
             "|---|---|" + "---|" * (len(KEYS) + 3)]
    for name, ref in (("paper CDDRec", PAPER.get(dataset)), ("paper SASRec", PAPER_SASREC.get(dataset))):
        if ref:
            lines.append(f"| {name} | - | " + " | ".join(f"{ref[k]:.4f}" for k in KEYS) + " | - | - | - |")
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["recipe"], []).append(r)
    for recipe, rs in by.items():
        def cell(key: str, rs: list = rs) -> str:
            src = "MRR@40" if key == "MRR" else key
            v = np.array([r["test"][src] for r in rs])
            return f"{v.mean():.4f}" + (f" ± {v.std(ddof=1):.4f}" if len(v) > 1 else "")
        full = np.mean([r["test"]["MRR"] for r in rs])
        ch = np.mean([r["test"]["AvgChange@40"] for r in rs])
        mins = np.mean([r["train_seconds"] for r in rs]) / 60
        lines.append(f"| {recipe} | {len(rs)} | " + " | ".join(cell(k) for k in KEYS)
                     + f" | {full:.4f} | {ch:.2f} | {mins:.1f} |")
    paper = PAPER.get(dataset)
    for recipe in ("cddrec", "cddrec-last"):
        if paper and recipe in by:
            got = {k: np.mean([r["test"]["MRR@40" if k == "MRR" else k] for r in by[recipe]]) for k in KEYS}
            miss = [k for k in KEYS if got[k] < paper[k]]
            lines.append("")
            lines.append(f"{recipe} vs the paper's CDDRec: " + ("at or above on every metric." if not miss else
                                                                 f"below the paper on {', '.join(miss)}."))
    staged = {recipe: rs for recipe, rs in by.items() if rs[0].get("stages")}
    if staged:
        lines += ["", "Denoising stages (paper Sect. 4.1, Fig. 2): the ranking from the state after each reverse step "
                  "(stage T - t), test split, mean over seeds.", "",
                  "| model | stage | R@10 | N@10 | MRR | Avg.Change@40 |", "|---|---|---|---|---|---|"]
        for recipe, rs in staged.items():
            n = len(rs[0]["stages"])
            for j in sorted({0, 1, n // 4, n // 2, n - 1}):
                row = [np.mean([r["stages"][j][k] for r in rs]) for k in ("R@10", "N@10", "MRR@40", "AvgChange@40")]
                lines.append(f"| {recipe} | {rs[0]['stages'][j]['stage']} | " + " | ".join(f"{v:.4f}" for v in row[:3])
                             + f" | {row[3]:.2f} |")
    commands = sorted({r["command"] for r in runs if r.get("command")})
    if commands:
        lines += ["", "Commands of the runs (each run also records its commit in the JSON):", ""]
        lines += [f"- `{c}`" for c in commands]
    lines.append("")
    lines.append("Test split, full ranking over all items, the user's earlier items excluded. MRR column: MRR@40 "
                 "(the paper truncates at 40); mean ± sample std over seeds.")
    return "\n".join(lines)


@click.command()
@click.option("--dataset", required=True, type=click.Choice(sorted(PAPER)))
@click.option("--data-dir", default="../shared/data", show_default=True, type=click.Path(file_okay=False))
@click.option("--recipes", default="cddrec,sasrec-ce,sasrec-bce", show_default=True)
@click.option("--seeds", default="0", show_default=True)
@click.option("--time-budget", default=60.0, show_default=True, help="training minutes per run")
@click.option("--set", "sets", multiple=True, help="extra config override KEY=VALUE (JSON value), all recipes")
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
@click.option("--tag", default="", help="suffix of the result files")
@click.option("--report-only", is_flag=True, help="rewrite the markdown table from the recorded runs, train nothing")
def main(dataset, data_dir, recipes, seeds, time_budget, sets, out_dir, tag, report_only):
    name = f"quality_{dataset}" + (f"_{tag}" if tag else "")
    jpath = Path(out_dir) / f"{name}.json"
    title = f"Quality on {dataset} (test split)"
    if report_only:
        if not jpath.exists():
            raise click.ClickException(f"{jpath}: no recorded runs to report")
        doc = json.loads(jpath.read_text())
        meta = {k: doc.pop(k) for k in ("command", "commit", "machine", "date")}
        table = summarize(dataset, doc["runs"])
        record(name, doc, table, out_dir, title=title, meta=meta)
        click.echo(table)
        return
    path = Path(data_dir) / f"{dataset}.txt"
    data = load_data(path)
    extra = {}
    for s in sets:
        k, _, v = s.partition("=")
        try:
            extra[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            extra[k.replace("-", "_")] = v
    runs = json.loads(jpath.read_text())["runs"] if jpath.exists() else []
    done = {(r["recipe"], r["seed"]) for r in runs}
    for recipe in [r.strip() for r in recipes.split(",")]:
        if recipe not in RECIPES:
            raise click.BadParameter(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        for seed in [int(s) for s in seeds.split(",")]:
            if (recipe, seed) in done:
                continue
            click.echo(f"{dataset}: {recipe}, seed {seed}", err=True)
            runs.append(run_one(data, path, recipe, seed, time_budget, extra))
            table = summarize(dataset, runs)
            record(name, {"dataset": dataset, "split": "test", "time_budget_min": time_budget, "overrides": extra,
                          "seconds": sum(r["seconds"] for r in runs), "paper": PAPER[dataset], "runs": runs},
                   table, out_dir, title=title)
    click.echo(summarize(dataset, runs))


if __name__ == "__main__":
    main()
