"""The one comparator of top-k outputs against a reference (numpy, torch-free), as Polygraphy's.

Export validation, the GPU checks, the benchmarks and the tests all compare a fast path's
``top_items``/``top_scores`` with the plain reference through ``compare_topk``:

- scores: max |score - reference| against ``atol + rtol * scale`` (scale = the largest
  |reference score| that is not masked);
- ids: a position whose id differs counts as a mismatch unless it is a tie: the reference gives
  the returned item (nearly) the score it ranks at that position;
- overlap: the mean share of the reference's top-k ids that the fast path also returns.

Letters: B batch, K top-k, V item rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .contract import MASK_SCORE


@dataclass
class Parity:
    max_abs_diff: float
    tolerance: float
    topk_mismatches: int  # positions whose id differs beyond a tie
    overlap: float  # mean |top-k ∩ reference top-k| / K
    ok: bool  # scores within tolerance and no mismatch beyond ties

    def as_dict(self) -> dict:
        return asdict(self)


def compare_topk(items: np.ndarray, scores: np.ndarray, ref_items: np.ndarray, ref_scores: np.ndarray,
                 ref_full: np.ndarray | None = None, *, rtol: float = 1e-5, atol: float = 1e-4) -> Parity:
    """Compare (B, K) ids and scores with the reference's; ``ref_full`` (B, V) reference scores of
    every item make the tie check exact (without it, a differing id is a tie when the two scores at
    that position agree within the tolerance)."""
    items, scores = np.asarray(items), np.asarray(scores, dtype=np.float64)
    ref_items, ref_scores = np.asarray(ref_items), np.asarray(ref_scores, dtype=np.float64)
    if items.shape != ref_items.shape or scores.shape != ref_scores.shape:
        raise ValueError(f"shapes differ: {items.shape}/{scores.shape} vs reference {ref_items.shape}/{ref_scores.shape}")
    live = ref_scores[ref_scores > MASK_SCORE / 2]
    scale = float(np.abs(live).max()) if live.size else 0.0
    tol = atol + rtol * scale
    diff = float(np.abs(scores - ref_scores).max()) if scores.size else 0.0
    rows, cols = np.nonzero(items != ref_items)
    if ref_full is not None:
        theirs = np.asarray(ref_full, dtype=np.float64)[rows, items[rows, cols]]
    else:
        theirs = scores[rows, cols]
    mismatches = int((np.abs(theirs - ref_scores[rows, cols]) > tol).sum())
    return Parity(diff, tol, mismatches, topk_overlap(items, ref_items), bool(diff <= tol and mismatches == 0))


def topk_overlap(items: np.ndarray, ref_items: np.ndarray) -> float:
    """Mean over rows of |top-k & reference top-k| / k: (B, K) x2 -> float (1.0 for no rows)."""
    items, ref_items = np.asarray(items), np.asarray(ref_items)
    if not len(items):
        return 1.0
    k = items.shape[1] if items.ndim == 2 and items.shape[1] else 1
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(items.tolist(), ref_items.tolist())]))
