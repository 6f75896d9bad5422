"""Batch-size buckets for captured graphs (CUDA graphs replay one fixed shape): pure numpy, torch-free.

A captured graph has one input shape (bucket batch, history). A request batch is split into the
rows that fit the captured history length (their left padding covers every column before the
last ``history``) and the rows that do not (they go to the uncaptured path); the rows that fit
are cut into chunks of at most the largest bucket, each padded up to the smallest bucket that
holds it with padding-only histories (all 0: the graph gives them finite scores, no NaN), and
the padding rows are dropped from the outputs.

Letters: B rows given, S history given, H captured history length, P bucket batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BUCKETS = (1, 8, 64, 256, 1024, 4096)


def check_buckets(buckets) -> tuple[int, ...]:
    """Sorted distinct positive bucket sizes; ValueError otherwise."""
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ValueError(f"batch buckets must be positive integers, got {list(buckets)}")
    return out


def choose_bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding ``n`` rows, or None when ``n`` exceeds the largest."""
    for b in buckets:
        if n <= b:
            return b
    return None


def fits_history(ids: np.ndarray, history: int) -> np.ndarray:
    """(B,) bool: the row's items all lie in its last ``history`` columns (the rest is padding 0)."""
    S = ids.shape[1]
    if S <= history:
        return np.ones(ids.shape[0], dtype=bool)
    return ~ids[:, : S - history].any(axis=1)


def fit_columns(ids: np.ndarray, history: int) -> np.ndarray:
    """(B, H): rows that fit ``history`` cut or left-padded with 0 to exactly ``history`` columns."""
    B, S = ids.shape
    if S >= history:
        return ids[:, S - history:]
    out = np.zeros((B, history), dtype=ids.dtype)
    out[:, history - S:] = ids
    return out


def pad_rows(ids: np.ndarray, bucket: int) -> np.ndarray:
    """(P, H): ``ids`` (B, H), B <= P, followed by P - B padding-only rows."""
    B = ids.shape[0]
    if B > bucket:
        raise ValueError(f"{B} rows do not fit a bucket of {bucket}")
    if B == bucket:
        return ids
    out = np.zeros((bucket,) + ids.shape[1:], dtype=ids.dtype)
    out[:B] = ids
    return out


@dataclass(frozen=True)
class Chunk:
    rows: np.ndarray  # indices into the request batch
    bucket: int | None  # the bucket batch; None: the uncaptured path


def plan(ids: np.ndarray, buckets: tuple[int, ...], history: int) -> list[Chunk]:
    """Where each row of ``ids`` (B, S) runs: chunks of rows per bucket, then the rows too long for
    ``history`` (bucket None). Every row appears in exactly one chunk."""
    fits = fits_history(ids, history)
    ok = np.flatnonzero(fits)
    chunks = []
    top = buckets[-1]
    for start in range(0, len(ok), top):
        rows = ok[start:start + top]
        chunks.append(Chunk(rows, choose_bucket(len(rows), buckets)))
    long_rows = np.flatnonzero(~fits)
    if len(long_rows):
        chunks.append(Chunk(long_rows, None))
    return chunks


def run_bucketed(ids: np.ndarray, buckets: tuple[int, ...], history: int, captured, uncaptured) -> dict[str, np.ndarray]:
    """Outputs for ``ids`` (B, S): ``captured(bucket, (P, H) ids) -> outputs`` with P rows,
    ``uncaptured((b, S) ids) -> outputs``; every output's first axis is the batch."""
    if ids.shape[0] == 0:
        return uncaptured(ids)
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    for chunk in plan(ids, buckets, history):
        sub = ids[chunk.rows]
        if chunk.bucket is None:
            parts.append((chunk.rows, uncaptured(sub)))
        else:
            out = captured(chunk.bucket, pad_rows(fit_columns(sub, history), chunk.bucket))
            parts.append((chunk.rows, {k: v[: len(chunk.rows)] for k, v in out.items()}))
    if len(parts) == 1 and len(parts[0][0]) == ids.shape[0]:
        rows, out = parts[0]
        return {k: np.ascontiguousarray(v) for k, v in out.items()}  # one chunk, rows in order
    result: dict[str, np.ndarray] = {}
    for rows, out in parts:
        for k, v in out.items():
            if k not in result:
                result[k] = np.empty((ids.shape[0],) + v.shape[1:], dtype=v.dtype)
            result[k][rows] = v
    return result
