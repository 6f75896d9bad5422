"""Evaluation as in the paper: leave-one-out, full ranking over the whole catalogue.

Every item is scored; the padding row, the mask token and every item the user has seen
before the target (for test: everything before the last item, the validation item too) are
set to -inf, never 0 (the released code sets 0, which leaves seen items in the ranking when
scores are negative). Ties count against the target: its rank is the number of items scoring
higher plus the number of other items scoring the same, so a collapsed model that scores
everything alike ranks the target last, not first.

Letters: B batch of users, V = N + 2 rows of the item table, K cut-offs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .data import MIN_SEQUENCE, EvalSplit, eval_split_from_keys, from_keys, read_keys
from .errors import DataError, NonFiniteError
from .inference import exclude_items
from .io import atomic_open
from .metrics import TOPK, metrics_from_ranks
from .model import CDDRec
from .vocab import Vocab, typed_key


def mask_scores(scores: torch.Tensor, num_items: int, seen: np.ndarray | None = None) -> torch.Tensor:
    """-inf for padding (0), the mask token (N+1) and the seen items (B, S) of each row."""
    excluded = torch.as_tensor(seen if seen is not None else np.zeros((len(scores), 1), np.int64),
                               device=scores.device)
    return exclude_items(scores, excluded, num_items, float("-inf"))


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target, ties counted against it: (B, V), (B,) -> (B,) float64.

    A target the ranking excludes (scored -inf: a seen item, padding, the mask token, an unknown id 0)
    is a miss, rank inf: in a catalogue of fewer than K rankable items it would otherwise count as a hit."""
    s = scores.gather(1, targets.view(-1, 1))  # (B, 1)
    higher = (scores > s).sum(1)
    ties = (scores == s).sum(1) - 1
    ranks = (higher + ties).double()  # (B,)
    return torch.where(torch.isfinite(s[:, 0]), ranks, torch.full_like(ranks, float("inf")))


def avg_change(top_scores: torch.Tensor) -> torch.Tensor:
    """Eq. 9 per user: mean over i of |s_{i+1} - s_i| / |s_i| * 100 for sorted top scores (B, K).

    Masked (-inf) entries, present when fewer than K items are left to rank, are skipped."""
    s = top_scores.double()
    ok = torch.isfinite(s[:, 1:]) & torch.isfinite(s[:, :-1])
    ratio = (s[:, 1:] - s[:, :-1]).abs() / s[:, :-1].abs().clamp_min(1e-12)
    ratio = torch.where(ok, ratio, torch.zeros_like(ratio))
    return ratio.sum(1) / ok.sum(1).clamp_min(1) * 100.0


@dataclass
class EvalResult:
    metrics: dict[str, float]
    stages: list[dict] = field(default_factory=list)  # per denoising stage (T - t), with ``stages``
    top_items: np.ndarray | None = None  # (U, topk) item ids, best first
    top_scores: np.ndarray | None = None  # -inf where fewer items than the list length were rankable
    users: np.ndarray | None = None  # rows of SequenceData (or of ``user_keys``)
    report: dict = field(default_factory=dict)  # what evaluate_file dropped or counted as misses
    user_keys: list[str] | None = None
    fingerprint: str | None = None


def reverse_timesteps(model: CDDRec, steps: int | None) -> list[int]:
    """The reverse steps an evaluation runs (the first ``steps`` S of T, or all); a ValueError for an S out
    of 1..T or for early exit on a model without a decoder (SASRec: one stage, [0])."""
    if steps is not None and model.decoder is None:
        raise ValueError("steps (early exit) needs a model with a decoder; this one is a SASRec baseline")
    return list(model.diffusion.timesteps(steps)) if model.decoder is not None else [0]  # checks 1 <= S <= T


@torch.no_grad()
def evaluate(model: CDDRec, split: EvalSplit, *, batch_size: int = 512, stages: bool = False,
             keep_topk: int = 0, progress: bool = False, steps: int | None = None) -> EvalResult:
    """Full-ranking metrics of ``model`` on ``split`` (deterministic reverse chain); with ``stages``, also
    of the state after every reverse step; with ``keep_topk``, each user's top items; with ``steps``
    S (early exit, as ``cddrec-export --steps S`` serves it), of the state after the first S steps
    (``stages`` then lists stages 1..S, the same states as without ``steps``).

    Non-finite scores (a diverged model: NaN ranks would count as hits) raise ``NonFiniteError``."""
    timesteps = reverse_timesteps(model, steps)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stage_ranks: list[list[np.ndarray]] = []  # [stage][batch] (B,): the last stage is the final state
    stage_changes: list[list[np.ndarray]] = []
    tops, top_s = [], []
    batches = range(0, len(split), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"eval {split.split}", unit="batch", leave=False)
    k_top = min(max(TOPK, keep_topk), model.cfg.num_items)
    for start in batches:
        rows = np.arange(start, min(start + batch_size, len(split)))
        hist = torch.as_tensor(split.histories[rows], device=device)
        tgt = torch.as_tensor(split.targets[rows], device=device)
        known, seen = split.targets[rows] > 0, split.seen(rows)  # (B,), (B, S)
        e_s, bias = model.encode(hist)  # (B, L, d), (B, 1, L, L)
        final, states = model.diffusion.reverse(model.decoder, e_s, bias, last_only=True,
                                                return_all=stages, steps=steps)  # (B, 1, d)
        for j, x in enumerate(states if stages else [final]):
            r, ch, top = rank_state(model, x[:, 0], tgt, known, seen, k_top)
            if j == len(stage_ranks):
                stage_ranks.append([])
                stage_changes.append([])
            stage_ranks[j].append(r)
            stage_changes[j].append(ch)
        if keep_topk:  # of the final state
            tops.append(top.indices[:, :keep_topk].cpu().numpy())
            top_s.append(top.values[:, :keep_topk].float().cpu().numpy())
    model.train(was_training)
    all_ranks = np.concatenate(stage_ranks[-1]) if stage_ranks else np.zeros(0)
    metrics = metrics_from_ranks(all_ranks)
    metrics["AvgChange@40"] = float(np.mean(np.concatenate(stage_changes[-1]))) if stage_changes else math.nan
    metrics["users"] = int(len(all_ranks))
    result = EvalResult(metrics, users=split.users)
    if stages:
        for j in range(len(stage_ranks)):
            m = metrics_from_ranks(np.concatenate(stage_ranks[j]))
            result.stages.append({"stage": j + 1, "step": timesteps[j], "R@10": m["R@10"], "N@10": m["N@10"],
                                  "MRR@40": m["MRR@40"],
                                  "AvgChange@40": float(np.mean(np.concatenate(stage_changes[j])))})
    if keep_topk:
        result.top_items = np.concatenate(tops)
        result.top_scores = np.concatenate(top_s)
    return result


def rank_state(model: CDDRec, user: torch.Tensor, targets: torch.Tensor, known: np.ndarray, seen: np.ndarray,
               k_top: int) -> tuple[np.ndarray, np.ndarray, torch.return_types.topk]:
    """Rank the targets (B,) by the scores of the user embeddings (B, d), seen items (B, S) excluded:
    0-based ranks (B,) float64 (inf where the target is unknown to the model: ``known`` False), Eq. 9's
    change (B,) and the top ``k_top`` items. Non-finite scores raise ``NonFiniteError``."""
    raw = model.scores(user)  # (B, V)
    if not bool(torch.isfinite(raw).all()):
        bad = int((~torch.isfinite(raw)).any(1).sum())
        raise NonFiniteError(f"the model's scores are not finite (NaN or inf) for {bad} of {len(raw)} users; "
                             "its weights are not finite (a diverged training run?): no metrics computed")
    scores = mask_scores(raw, model.cfg.num_items, seen)  # (B, V)
    r = target_ranks(scores, targets).cpu().numpy().astype(np.float64)
    r[~known] = np.inf  # a target unknown to the model (id 0) is a miss
    top = scores.topk(k_top, dim=1)
    return r, avg_change(top.values[:, :TOPK]).cpu().numpy(), top


def write_topk(path: str, users: list[str], result: EvalResult, vocab: Vocab) -> int:
    """JSONL lines ``{"user": key, "items": [item keys], "scores": [...]}`` (atomic). Each list is cut
    where the rankable items end: masked entries (padding, mask token, seen items, -inf) are never items."""
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        for u, items, scores in zip(result.users, result.top_items, result.top_scores):
            keep = np.isfinite(scores)  # (K,) masked entries sort last
            line = {"user": typed_key(users[u]), "items": vocab.decode(items[keep].tolist()),
                    "scores": [round(float(s), 6) for s in scores[keep]]}
            f.write(json.dumps(line) + "\n")
            n += 1
    return n


def evaluate_file(model: CDDRec, vocab: Vocab, path: str | Path, split: str = "test", *, read_options: dict | None = None,
                  **kwargs) -> EvalResult:
    """Evaluate ``model`` on a data file as it is: no k-core filter, every user with 3 or more items;
    unknown history items are dropped and unknown targets count as misses, all counted in ``report``."""
    reverse_timesteps(model, kwargs.get("steps"))  # a bad --steps fails before the file is read
    users, seqs = read_keys(path, **(read_options or {}))
    split_, report = eval_split_from_keys(users, seqs, vocab, split, model.cfg.max_len)
    if not len(split_):
        raise DataError(f"{path}: no user has {MIN_SEQUENCE} or more items; nothing to evaluate")
    result = evaluate(model, split_, **kwargs)
    result.report, result.user_keys = report, users
    result.fingerprint = from_keys(users, seqs, vocab=vocab, min_len=MIN_SEQUENCE).fingerprint()
    return result


def format_table(rows: Iterable[dict], keys: Iterable[str]) -> str:
    """A markdown table of ``rows`` with columns ``keys`` (floats to 4 decimals)."""
    keys = list(keys)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_popularity(popularity: np.ndarray, split: EvalSplit, num_items: int,
                        batch_size: int = 2048) -> dict[str, float]:
    """Metrics of the most-popular baseline (training counts, seen items excluded)."""
    pop = torch.as_tensor(popularity, dtype=torch.float64)
    pop = pop - torch.arange(len(pop), dtype=torch.float64) / (len(pop) + 1)  # ties: lower id first
    ranks = []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        scores = mask_scores(pop.expand(len(rows), -1), num_items, split.seen(rows))
        ranks.append(target_ranks(scores, torch.as_tensor(split.targets[rows])).numpy())
    out = metrics_from_ranks(np.concatenate(ranks))
    out["users"] = int(len(split))
    return out
