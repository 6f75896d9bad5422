"""Shuffled training batches as torch tensors: windows, targets, negatives, augmented views.

Two ways to draw them:

- One process, as ever (``shard=None``): one random stream for the whole run (``rng``, seeded once)
  draws each epoch's permutation, then every batch's negatives and augmentations in turn; a resume
  restores its state.
- Shards of global batches (``shard``: one process of a torchrun job, or a run resumed from one): the
  epoch's permutation is the one torch's ``DistributedSampler`` draws for (seed, epoch), the same on
  every rank; global batch j is ``global_batch`` consecutive windows of it, and rank r takes every
  world-th of them from the r-th (interleaved, as ``DistributedSampler`` shards), so N ranks with B/N
  windows each see the windows one process with B sees. Each rank draws its negatives, augmentations,
  sampled-softmax negatives, dropout masks and Eq. 4 noise from streams seeded by (seed, epoch, rank,
  batch): a resume needs no saved random state, and starts any batch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .data import SequenceData, training_windows
from .sampler import ItemProposal, NegativeSampler
from .transforms import augment


@dataclass(frozen=True)
class Shard:
    """Which share of every global batch this process trains on: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1


def stream_seed(*keys: int) -> int:
    """A 64-bit seed from integer keys (seed, epoch, rank, batch, ...), independent across keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


class TrainBatches:
    """Shuffled training batches: inputs, targets, negatives and an augmented view (B, L); for the sampled
    softmax (``proposal``) also the batch's shared samples and the log Q of samples and targets.

    ``batch_size`` is per process; ``global_batch`` is it times the shard's world size."""

    def __init__(self, data: SequenceData, max_len: int, batch_size: int, seed: int = 0, *,
                 shard: Shard | None = None, proposal: ItemProposal | None = None):
        self.windows, self.owners = training_windows(data, max_len)
        self.sampler = NegativeSampler(data.sequences, data.num_items)
        self.mask_id = data.num_items + 1
        self.batch_size, self.seed, self.shard, self.proposal = batch_size, seed, shard, proposal
        self.rng = np.random.default_rng(seed)  # the one stream of an unsharded run
        has_target = (self.windows[:, :-1] > 0) & (self.windows[:, 1:] > 0)  # (W, L)
        self.window_targets = has_target.sum(1)  # (W,) targets per window
        self.window_last = has_target[:, -1].astype(np.int64)  # (W,) 1 where the last position has a target

    @property
    def world(self) -> int:
        return self.shard.world if self.shard else 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        """Optimiser steps per epoch: a last global batch of fewer than 2 windows per process is dropped
        (InfoNCE needs in-batch negatives)."""
        full, rest = divmod(len(self.windows), self.global_batch)
        return full + (rest >= 2 * self.world)

    @property
    def num_targets(self) -> int:
        return int(self.window_targets.sum())

    def __iter__(self) -> Iterator[dict]:
        return self.epoch()

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of the windows: the next draw of ``rng`` (unsharded), or torch's
        ``DistributedSampler`` permutation for (seed, epoch) (sharded: the same on every rank)."""
        if self.shard is None:
            return self.rng.permutation(len(self.windows))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.windows), generator=g).numpy()

    def epoch(self, order: np.ndarray | None = None, start: int = 0, index: int = 0) -> Iterator[dict]:
        """The batches of epoch ``index``: a fresh permutation (kept in ``self.order``), or a saved
        ``order`` resumed at step ``start`` (unsharded, with ``self.rng`` restored to its state after
        step ``start - 1``, the rest of the epoch is drawn exactly as without the interruption).

        Sharded, a batch also holds ``shares`` (``losses.objective``'s) and ``torch_seed``, the seed of
        the dropout and noise of its step (plain Python values, not tensors)."""
        if order is None:
            order = self.permutation(index)
        self.order = order
        G, shard = self.global_batch, self.shard
        for j in range(start, len(self)):
            window = order[j * G:(j + 1) * G]  # the global batch
            if shard is None:
                yield self.make(window, self.rng)
                continue
            idx = window[shard.rank::shard.world]  # this rank's share, interleaved
            batch = self.make(idx, np.random.default_rng(stream_seed(self.seed, index, shard.rank, j)))
            batch["shares"] = self.shares(window, idx)
            batch["torch_seed"] = stream_seed(self.seed, index, shard.rank, j, 1)
            yield batch

    def shares(self, window: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
        """This rank's rows over the mean rows per rank of the global batch: targets (n) and last-position
        targets (m, the rows of L_cross)."""
        w = self.world
        n_all, m_all = int(self.window_targets[window].sum()), int(self.window_last[window].sum())
        n, m = int(self.window_targets[idx].sum()), int(self.window_last[idx].sum())
        return n * w / max(n_all, 1), m * w / max(m_all, 1)

    def make(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The tensors of windows ``idx``, their random parts drawn from ``rng``."""
        w = self.windows[idx]
        inputs = w[:, :-1]
        targets = np.where(inputs > 0, w[:, 1:], 0)  # a window's first item has no history
        negatives = self.sampler.sample(self.owners[idx], targets.shape, rng)
        negatives[targets == 0] = 0
        batch = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
            "targets": torch.from_numpy(np.ascontiguousarray(targets)),
            "negatives": torch.from_numpy(negatives),
            "aug_ids": torch.from_numpy(augment(inputs, self.mask_id, rng)),
        }
        if self.proposal is not None:
            ids = self.proposal.sample(rng)  # (M,)
            batch["sampled"] = torch.from_numpy(ids)
            batch["sampled_log_q"] = torch.from_numpy(self.proposal.log_q[ids])  # (M,)
            batch["target_log_q"] = torch.from_numpy(self.proposal.log_q[targets])  # (B, L)
        return batch
