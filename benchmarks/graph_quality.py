"""Quality of exported graphs on held-out targets: the fp32, fused and int8 graphs of one model.

    python -m cddrec.benchmarks.graph_quality MODEL.pt DATA [--split test] [--name graph_quality_Office]

Each graph is exported from the same model file (top-40, validated as ``cddrec-export`` does)
and served by ONNX Runtime CPU on the split's histories: every item before the target goes in
(the graph feeds the last L to the model and excludes all of them from the ranking, as the
evaluation does). The target's position in the graph's top-40 gives R@K, N@K and MRR@40
(a target outside the top 40 counts as a miss). Relative differences are against the fp32 graph.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from cddrec.checkpoint import load_checkpoint
from cddrec.data import EvalSplit, eval_split, left_pad, load_data
from cddrec.export.onnx_export import ExportOptions, export_model
from cddrec.metrics import metrics_from_ranks
from cddrec.runtime.backends import OrtCpu
from cddrec.vocab import Vocab

from .record import RESULTS_DIR, cell, record

TOPK = 40
GRAPHS = {"fp32": {}, "fused": {"optimize": True}, "int8": {"int8": True},
          "int8 (scoring int8 too)": {"int8": True, "int8_scoring": True},
          "fused + int8": {"optimize": True, "int8": True}, "two-stage top-k (rescore 50)": {"rescore": 50}}
KEYS = ("R@5", "R@10", "N@10", "MRR@40")


def full_histories(split: EvalSplit, rows: np.ndarray) -> np.ndarray:
    """(len(rows), S) every item before each target, left-padded with 0."""
    seqs = [split.seen_items[split.seen_indptr[r]:split.seen_indptr[r + 1]] for r in rows]
    return left_pad(seqs, max(1, max(len(s) for s in seqs)))


def graph_ranks(graph: str | Path, split: EvalSplit, batch_size: int = 256, threads: int = 0) -> np.ndarray:
    """0-based rank of each target in the graph's top-K (K when absent): (U,)."""
    be = OrtCpu(graph, threads=threads)
    ranks = []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        top = be.infer({"item_ids": full_histories(split, rows)})["top_items"]  # (B, K)
        hit = top == split.targets[rows, None]
        ranks.append(np.where(hit.any(1), hit.argmax(1), top.shape[1]))
    return np.concatenate(ranks)


def graph_quality(model_pt: str, data: str, split_name: str = "test", threads: int = 0, echo=print) -> dict:
    model, ckpt = load_checkpoint(model_pt)
    ds = load_data(data, kcore=ckpt["train_config"]["kcore"], vocab=Vocab.from_dict(ckpt["vocab"]))
    split = eval_split(ds, split_name, model.cfg.max_len)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="cddrec-gq-") as tmp:
        for name, opts in GRAPHS.items():
            path = Path(tmp) / f"{len(rows)}.onnx"
            rep = export_model(model_pt, path, ExportOptions(k=TOPK, **opts))
            metrics = metrics_from_ranks(graph_ranks(path, split, threads=threads))
            rows[name] = {"metrics": {k: metrics[k] for k in KEYS}, "max_abs_diff": rep.max_abs_diff,
                          "topk_overlap": rep.topk_overlap, "int8": rep.int8}
            echo(f"{name}: {rows[name]['metrics']}")
    base = rows["fp32"]["metrics"]
    for r in rows.values():
        r["relative"] = {k: (r["metrics"][k] - base[k]) / base[k] if base[k] else None for k in KEYS}
    return {"dataset": Path(data).stem, "split": split_name, "users": len(split), "model": str(model_pt),
            "items": model.cfg.num_items, "graphs": rows}


def rel(r: dict, key: str) -> str:
    """A relative change in percent, '-' where the fp32 graph's metric is 0."""
    value = r["relative"][key]
    return cell(None if value is None else value * 100, "+.2f") + ("%" if value is not None else "")


def table(res: dict) -> str:
    lines = ["| graph | " + " | ".join(KEYS) + " | R@10 rel. | MRR@40 rel. | max score diff vs reference "
             "(batch 1/7/64) | top-40 overlap (batch 1/7/64) |", "|---|" + "---|" * (len(KEYS) + 4)]
    for name, r in res["graphs"].items():
        diff = " / ".join(f"{v:.1e}" for v in r["max_abs_diff"].values())
        overlap = " / ".join(f"{v:.3f}" for v in r["topk_overlap"].values()) or "exact (ids identical beyond ties)"
        lines.append(f"| {name} | " + " | ".join(f"{r['metrics'][k]:.4f}" for k in KEYS)
                     + f" | {rel(r, 'R@10')} | {rel(r, 'MRR@40')} | {diff} | "
                     f"{overlap} |")
    lines += ["", f"{res['dataset']} {res['split']} split, {res['users']:,} users, {res['items']:,} items; graphs "
              "exported from the same model file with k=40 and served by ONNX Runtime CPU with every earlier item "
              "of each user as the history (all excluded from the ranking)."]
    return "\n".join(lines)


@click.command()
@click.argument("model_pt", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", "split_name", type=click.Choice(["test", "valid"]), default="test", show_default=True)
@click.option("--threads", default=0, show_default=True)
@click.option("--name", default=None, help="results file stem [default: graph_quality_DATASET]")
@click.option("--out", "out_dir", default=str(RESULTS_DIR), show_default=True)
def main(model_pt, data, split_name, threads, name, out_dir):
    res = graph_quality(model_pt, data, split_name, threads, echo=lambda m: click.echo(m, err=True))
    md = table(res)
    record(name or f"graph_quality_{res['dataset']}", res, md, out_dir, title="Quality of the exported graphs")
    click.echo(md)


if __name__ == "__main__":
    main()
