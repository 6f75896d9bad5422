"""Ranking metrics of a leave-one-out evaluation (numpy, torch-free): one relevant item per user.

R@K: the target is among the first K; N@K: 1 / log2(rank + 2) when it is; MRR and MRR@40 (the
paper truncates at 40). Ranks are 0-based, ties counted against the target.
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)
TOPK = 40  # the paper's truncation for MRR@40 and Avg.Change (and cddrec-eval --topk)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """R@K, N@K (one relevant item: 1/log2(rank+2) if rank < K), MRR and MRR@40."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"R@{k}"] = float(np.mean(ranks < k))
    for k in NDCG_KS:
        out[f"N@{k}"] = float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)))
    rr = 1.0 / (ranks + 1.0)
    out["MRR"] = float(np.mean(rr))
    out["MRR@40"] = float(np.mean(np.where(ranks < TOPK, rr, 0.0)))
    return out
