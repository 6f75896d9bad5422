"""The one comparator of top-k outputs against a reference (numpy, torch-free), as Polygraphy's.

``compare_runners`` is the loop, after Polygraphy's ``Comparator``: every runner (a backend's
``infer``, an ONNX Runtime session, a captured module) on every feed, each result compared with
the reference's full scores of that feed, in one ``ParityReport``. Export validation
(``validate_graph``), the GPU check (``benchmarks/gpu_bench.check_parity``) and the tests use it;
the verdict rule of a graph comes from its contract (``GraphContract.parity_rule(device)``).
Each comparison is ``compare_topk``:

- scores: max |score - reference| against ``atol + rtol * scale`` (scale = the largest
  |reference score| that is not masked);
- ids: a position whose id differs counts as a mismatch unless it is a tie: the reference gives
  the returned item (nearly) the score it ranks at that position;
- overlap: the mean share of the reference's top-k ids that the fast path also returns.

Letters: B batch, K top-k, V item rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

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
    if ref_full is not None:  # index first: a (B, V) copy in float64 would be large
        theirs = np.asarray(ref_full)[rows, items[rows, cols]].astype(np.float64)
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


Feed = dict  # input name -> numpy array: {"item_ids": (B, S) int64[, "noise": (T, B, d) float32]}
Runner = Callable[[Feed], Mapping[str, np.ndarray]]  # a feed -> {"top_items": (B, K), "top_scores": (B, K), ...}


@dataclass
class ParityReport:
    """Every runner on every feed against the reference: ``results[runner][feed label]``."""

    rtol: float
    atol: float
    min_overlap: float | None  # approximate graphs: the verdict is this mean top-k overlap
    exact_ids: bool  # ids must match beyond ties (False for fp16: scores within tolerance suffice)
    results: dict[str, dict[str, Parity]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # runner -> why it did not run (``keep_going``)

    @property
    def ok(self) -> bool:
        return not self.errors and all(p.ok for rows in self.results.values() for p in rows.values())

    @property
    def topk_mismatches(self) -> int:
        return sum(p.topk_mismatches for rows in self.results.values() for p in rows.values())

    def failures(self) -> list[str]:
        """One line per failed comparison (runner, feed, what failed), then the runners that raised."""
        out = []
        for name, rows in self.results.items():
            for label, p in rows.items():
                if p.ok:
                    continue
                if self.min_overlap is not None:
                    out.append(f"{name}, batch {label}: top-k overlap with the fp32 reference {p.overlap:.3f} is "
                               f"below {self.min_overlap} (max |score difference| {p.max_abs_diff:.3g})")
                elif not p.max_abs_diff <= p.tolerance:
                    out.append(f"{name}, batch {label}: max |score difference| {p.max_abs_diff:.3g} exceeds "
                               f"{p.tolerance:.3g}")
                else:
                    out.append(f"{name}, batch {label}: {p.topk_mismatches} top-k ids differ from the reference "
                               "beyond exact ties")
        return out + [f"{name}: {err}" for name, err in self.errors.items()]

    def as_dict(self) -> dict:
        return {"rtol": self.rtol, "atol": self.atol, "min_overlap": self.min_overlap, "exact_ids": self.exact_ids,
                "ok": self.ok, "results": {n: {b: p.as_dict() for b, p in rows.items()}
                                           for n, rows in self.results.items()},
                "errors": dict(self.errors)}


def compare_runners(runners: Mapping[str, Runner], reference: Callable[[Feed], np.ndarray] | Mapping[str, np.ndarray],
                    feeds: Mapping[str, Feed], rtol: float, atol: float, min_overlap: float | None = None, *,
                    exact_ids: bool = True, runs: int = 1, keep_going: bool = False) -> ParityReport:
    """Run every runner on every feed and compare its top-k with the reference's.

    ``reference``: a feed -> the reference's masked scores of every item (B, V) (e.g.
    ``cddrec.inference.reference_runner(model)``), or those scores already computed, by feed
    label (computed once and shared by every runner either way). ``feeds``: label (the batch
    size, usually) -> feed. The verdict of one comparison: with ``min_overlap`` (an approximate
    graph), the mean top-k overlap reaches it; otherwise the scores are within ``atol + rtol *
    scale`` and, with ``exact_ids``, no id differs beyond a tie. ``runs`` > 1 runs each feed that
    many times and compares the last result (a captured graph's replay). ``keep_going``: a runner
    that raises is recorded in ``errors`` and the others go on; otherwise its error propagates.
    """
    report = ParityReport(rtol, atol, min_overlap, exact_ids)
    refs = {}
    for label, feed in feeds.items():
        refs[label] = np.asarray(reference[label] if isinstance(reference, Mapping) else reference(feed))  # (B, V)
    for name, run in runners.items():
        rows: dict[str, Parity] = {}
        try:
            for label, feed in feeds.items():
                for _ in range(runs):
                    got = run(feed)
                items, scores = np.asarray(got["top_items"]), np.asarray(got["top_scores"])
                full = refs[label]
                ref_items, ref_scores = topk_of(full, items.shape[1])
                p = compare_topk(items, scores, ref_items, ref_scores, full, rtol=rtol, atol=atol)
                if min_overlap is not None:
                    p.ok = p.overlap >= min_overlap
                elif not exact_ids:
                    p.ok = p.max_abs_diff <= p.tolerance
                rows[label] = p
        except Exception as e:  # noqa: BLE001 - recorded when keep_going, else raised
            if not keep_going:
                raise
            report.errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500] if str(e) else ''}"
        report.results[name] = rows
    return report


def topk_of(full: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (B, K) int64, scores (B, K)) of the k best of ``full`` (B, V), best first (which of
    several equal scores comes first is left open: ``compare_topk`` treats them as ties)."""
    full = np.asarray(full)
    k = min(k, full.shape[1])
    part = np.argpartition(-full, k - 1, axis=1)[:, :k] if k < full.shape[1] else np.tile(np.arange(full.shape[1]),
                                                                                          (full.shape[0], 1))
    order = np.argsort(-np.take_along_axis(full, part, axis=1), axis=1, kind="stable")  # (B, K)
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return ids, np.take_along_axis(full, ids, axis=1)
