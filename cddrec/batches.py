"""Shuffled training batches as torch tensors: windows, targets, negatives, augmented views."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .data import SequenceData, training_windows
from .sampler import NegativeSampler
from .transforms import augment


class TrainBatches:
    """Shuffled training batches: inputs, targets, negatives and an augmented view (B, L)."""

    def __init__(self, data: SequenceData, max_len: int, batch_size: int, seed: int = 0):
        self.windows, self.owners = training_windows(data, max_len)
        self.sampler = NegativeSampler(data.sequences, data.num_items)
        self.mask_id = data.num_items + 1
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    @property
    def num_targets(self) -> int:
        return int((self.windows[:, 1:] > 0).sum())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.epoch()

    def epoch(self, order: np.ndarray | None = None, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch: a fresh permutation (kept in ``self.order``), or a saved ``order``
        resumed at batch ``start`` (with ``self.rng`` restored to its state after batch ``start - 1``,
        the rest of the epoch is drawn exactly as without the interruption)."""
        if order is None:
            order = self.rng.permutation(len(self.windows))
        self.order = order
        for begin in range(start * self.batch_size, len(order), self.batch_size):
            idx = order[begin:begin + self.batch_size]
            if len(idx) < 2:  # InfoNCE needs in-batch negatives
                continue
            w = self.windows[idx]
            inputs = w[:, :-1]
            targets = np.where(inputs > 0, w[:, 1:], 0)  # a window's first item has no history
            negatives = self.sampler.sample(self.owners[idx], targets.shape, self.rng)
            negatives[targets == 0] = 0
            yield {
                "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
                "targets": torch.from_numpy(np.ascontiguousarray(targets)),
                "negatives": torch.from_numpy(negatives),
                "aug_ids": torch.from_numpy(augment(inputs, self.mask_id, self.rng)),
            }


