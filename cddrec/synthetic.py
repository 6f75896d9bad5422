"""Seeded synthetic data with planted sequential structure (for the demo and the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import SequenceData, from_keys
from .io import atomic_write_text


def make_synthetic(num_users: int = 2000, num_items: int = 300, num_clusters: int = 12,
                   min_len: int = 5, max_len: int = 30, p_follow: float = 0.75,
                   p_shift: float = 0.1, seed: int = 0, item_key_offset: int = 0) -> SequenceData:
    """Seeded synthetic logs with planted sequential structure.

    Items are split into clusters; each cluster is an ordered chain. A user starts in a random
    cluster and at each step follows the chain (``p_follow``), jumps to a random item of the
    same cluster, or with ``p_shift`` shifts intent to another cluster. A model that learns the
    chains predicts the next item well; a popularity model does not. Item keys start at
    ``item_key_offset`` (0 by default, so key 0 exists as in the Amazon files).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_items)
    clusters = np.array_split(perm, num_clusters)
    where = {int(it): (c, j) for c, members in enumerate(clusters) for j, it in enumerate(members)}
    users, seqs = [], []
    for u in range(num_users):
        n = int(rng.integers(min_len, max_len + 1))
        c = int(rng.integers(num_clusters))
        cur = int(rng.choice(clusters[c]))
        s = [cur]
        while len(s) < n:
            r = rng.random()
            c, j = where[cur]
            members = clusters[c]
            if r < p_shift:
                c = int(rng.integers(num_clusters))
                cur = int(rng.choice(clusters[c]))
            elif r < p_shift + p_follow:
                cur = int(members[(j + 1) % len(members)])
            else:
                cur = int(rng.choice(members))
            if cur in s[-3:]:  # avoid immediate repeats so seen-item masking is not trivial
                c, j = where[cur]  # the cluster of the item drawn (after a shift, not the old one)
                cur = int(clusters[c][(j + 2) % len(clusters[c])])
            s.append(cur)
        users.append(f"u{u}")
        seqs.append([str(it + item_key_offset) for it in s])
    return from_keys(users, seqs, source=f"synthetic(seed={seed})")


def write_sequence_file(data: SequenceData, path: str | Path) -> None:
    """Write ``user item item ...`` lines with the original keys (atomic)."""
    lines = [" ".join([u] + [data.items.keys[i - 1] for i in s]) for u, s in zip(data.users, data.sequences)]
    atomic_write_text(path, "\n".join(lines) + "\n")
