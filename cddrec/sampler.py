"""Negative sampling for the training objectives (numpy): per-target negatives of the cross-divergence
(``NegativeSampler``) and the shared negatives of the sampled softmax (``ItemProposal``)."""

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


class ItemProposal:
    """The proposal Q of the sampled softmax: M items drawn with replacement per batch, shared by its
    targets, from the training popularity (count + 1, so every item can be drawn) or uniformly.

    ``log_q`` (N + 2,) holds log(M q_j), the log of item j's expected count in a draw of M (padding
    and mask rows: 0, never drawn); the loss subtracts it from the logits (the logQ correction).
    Drawing is a binary search of M uniforms in the cumulative distribution, O(M log N) per batch.
    """

    def __init__(self, popularity: np.ndarray, num_sampled: int, kind: str = "popularity"):
        num_items = len(popularity) - 2
        if kind == "uniform":
            weights = np.ones(num_items, dtype=np.float64)
        elif kind == "popularity":
            weights = popularity[1:num_items + 1].astype(np.float64) + 1.0
        else:
            raise ValueError(f"unknown proposal {kind!r}: expected popularity or uniform")
        q = weights / weights.sum()  # (N,)
        self.kind, self.num_sampled, self.num_items = kind, num_sampled, num_items
        self.cdf = np.cumsum(q)
        self.cdf[-1] = 1.0
        self.log_q = np.zeros(num_items + 2, dtype=np.float32)
        self.log_q[1:num_items + 1] = np.log(num_sampled * q)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """(M,) item ids in 1..N, drawn with replacement from Q."""
        if self.kind == "uniform":
            return rng.integers(1, self.num_items + 1, size=self.num_sampled)
        return np.searchsorted(self.cdf, rng.random(self.num_sampled), side="right") + 1
