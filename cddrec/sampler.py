"""Negative sampling for the training objective (numpy)."""

from __future__ import annotations

import numpy as np


class NegativeSampler:
    """Uniform negatives from 1..N, never one of the user's own items (any split).

    Membership is tested for the whole batch at once with ``searchsorted`` over sorted
    ``user * (N + 2) + item`` keys; colliding draws are redrawn in rounds, not per item.
    """

    def __init__(self, sequences: list[np.ndarray], num_items: int):
        self.num_items = num_items
        self.stride = num_items + 2
        keys = [u * self.stride + np.unique(s) for u, s in enumerate(sequences)]
        self.keys = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)

    def owned(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users * self.stride + items
        pos = np.searchsorted(self.keys, q)
        pos = np.minimum(pos, len(self.keys) - 1)
        return self.keys[pos] == q

    def sample(self, users: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator,
               max_rounds: int = 50) -> np.ndarray:
        """(len(users), *shape[1:]) negatives; ``users`` broadcasts over the trailing axes."""
        u = np.broadcast_to(users.reshape(-1, *([1] * (len(shape) - 1))), shape)
        neg = rng.integers(1, self.num_items + 1, size=shape)
        for _ in range(max_rounds):
            bad = self.owned(u, neg)
            n_bad = int(bad.sum())
            if n_bad == 0:
                break
            neg[bad] = rng.integers(1, self.num_items + 1, size=n_bad)
        return neg


