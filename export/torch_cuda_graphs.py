"""CUDA-graph replay of the unrolled recommender, one captured graph per batch bucket (the torch-cuda backend).

A bucket owns a static input buffer (P, H) int64 on the device, allocated once. With
``capture=True`` the module is warmed up on a side stream, then captured with
``torch.cuda.graph`` (PyTorch's "whole-network capture" recipe); a request copies its padded ids
into the static buffer and replays the graph, whose outputs live in static buffers too. With
``capture=False`` the same bucket runs the module uncaptured on the same static buffer: how
``torch-compile`` serves (one compiled static shape per bucket) and how the bucket logic is
tested on a machine without a GPU. ``warmup()`` prepares every bucket: captured buckets are
captured, the others run their module ``WARMUP_RUNS`` times (compiling it, and recording
inductor's own CUDA graphs in the modes that make them). Each graph keeps its own memory pool,
because buckets replay in any order. Padding, chunking and the uncaptured path for long
histories are ``cddrec.runtime.buckets`` (pure numpy, shared with ``ort-cuda-graph``).

Letters: P bucket batch, H captured history length, K top-k, d hidden.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cddrec.runtime.buckets import DEFAULT_BUCKETS, check_buckets, run_bucketed

WARMUP_RUNS = 3  # runs before a capture, and of an uncaptured bucket at warm-up


def to_host(outs, names: list[str]) -> dict[str, np.ndarray]:
    """Output tensors (top_items, top_scores, user_embedding) -> host arrays of their own under the
    contract's ``names`` (int64 stays int64, everything else fp32)."""
    host = {}
    for name, t in zip(names, outs):
        t = t if t.dtype == torch.int64 else t.float()
        host[name] = t.cpu().numpy().copy() if t.device.type == "cpu" else t.cpu().numpy()
    return host


class StaticBucket:
    """One bucket of ``bucket`` rows by ``history`` columns on ``device``: captured or eager."""

    def __init__(self, fn: Callable, names: list[str], bucket: int, history: int, device: torch.device, capture: bool,
                 warmup: int = WARMUP_RUNS):
        self.fn, self.names, self.shape = fn, names, (bucket, history)
        self.input = torch.zeros((bucket, history), dtype=torch.int64, device=device)  # (P, H), allocated once
        self.graph = None
        self.outputs = None
        if capture:
            if device.type != "cuda":
                raise ValueError(f"CUDA-graph capture needs a CUDA device, got {device}")
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(warmup):  # kernels chosen, compiled, workspaces allocated before capture
                    fn(self.input)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.outputs = fn(self.input)  # (P, K), (P, K), (P, d): static, rewritten by each replay

    def warm(self, runs: int = WARMUP_RUNS) -> None:
        """Run an uncaptured bucket on its (padding-only) input: compiles happen here, not at the
        first request (a captured bucket was warmed before its capture)."""
        if self.graph is None:
            with torch.no_grad():
                for _ in range(runs):
                    self.fn(self.input)

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of ``ids`` (P, H) int64 as host arrays of their own."""
        if ids.shape != self.shape:
            raise ValueError(f"bucket input must be {self.shape}, got {ids.shape}")
        self.input.copy_(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
        if self.graph is not None:
            self.graph.replay()
            return to_host(self.outputs, self.names)
        with torch.no_grad():
            return to_host(self.fn(self.input), self.names)


class BucketedModule:
    """``ids`` (B, S) numpy -> outputs: rows padded into buckets run ``fn`` on static buffers (captured
    when ``capture``); rows longer than ``history`` run ``eager`` (the uncaptured path)."""

    def __init__(self, fn: Callable, eager: Callable, device: str | torch.device, names: list[str], *, buckets=None,
                 history: int, capture: bool = True):
        self.fn, self.eager, self.device, self.names, self.capture = fn, eager, torch.device(device), names, capture
        self.buckets = check_buckets(DEFAULT_BUCKETS if buckets is None else buckets)
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.history = int(history)
        self._static: dict[int, StaticBucket] = {}

    def bucket(self, size: int) -> StaticBucket:
        if size not in self._static:
            self._static[size] = StaticBucket(self.fn, self.names, size, self.history, self.device, self.capture)
        return self._static[size]

    def warmup(self) -> None:
        """Every bucket made (captured) and run before the first request."""
        for b in self.buckets:
            self.bucket(b).warm()

    def _uncaptured(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return to_host(self.eager(torch.from_numpy(np.ascontiguousarray(ids)).to(self.device)), self.names)

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return run_bucketed(np.asarray(ids, dtype=np.int64), self.buckets, self.history,
                            lambda b, x: self.bucket(b).run(x), self._uncaptured)
