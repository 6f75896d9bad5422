"""PyTorch backends from a model file, behind the runtime's backend interface (the torch side of serving).

- ``torch``: the plain reference (eager, Python loop over the T steps, every position decoded,
  keys/values projected at every step): what every fast path is checked against.
- ``torch-fast``: eager, on the model's hoisted last-position path.
- ``torch-compile``: ``torch.compile`` of the unrolled graph module (the exported graph's math),
  on the model's device (CUDA when present), one static shape per batch bucket, compiled at
  warm-up (options ``buckets``, ``history``, ``mode``, ``compile_backend``).
- ``torch-cuda`` / ``torch-cuda-fp16``: CUDA-graph replay of the unrolled module, one captured
  graph per batch bucket (``cddrec.export.torch_cuda_graphs``); options ``fp16`` (Linear weights stored
  in fp16, as the ``--fp16`` graph), ``compile`` (a ``torch.compile`` mode), ``cuda_graph``,
  ``buckets``, ``history``. CUDA only: elsewhere ``BackendUnavailable``.

They are registered under the entry-point group ``cddrec.backends`` by ``setup.py`` and found by
name through ``cddrec.runtime.backends.load_backend`` (the runtime itself never imports torch or
names these classes). Each reads its K from the caller (default ``DEFAULT_K``) and offers
``serving_info()`` from the model file, so ``Recommender`` serves a model.pt like a graph.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from cddrec.checkpoint import load_checkpoint
from cddrec.contract import DEFAULT_K, POPULAR_TOPK, ServingInfo
from cddrec.errors import BackendUnavailable
from cddrec.inference import popular_topk, reference_topk
from cddrec.runtime.backends import BackendBase
from cddrec.runtime.buckets import DEFAULT_BUCKETS, check_buckets
from cddrec.vocab import Vocab

from .graph import UnrolledRecommender
from .onnx_export import contract_for
from .torch_cuda_graphs import BucketedModule, to_host


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _TorchBackend(BackendBase):
    name, reads = "torch", "model"

    def __init__(self, path: str | Path, *, k: int | None = None, threads: int = 0, device: str | None = None):
        if threads > 0:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model, self.checkpoint = load_checkpoint(path)
        self.device = torch.device(device or default_device())
        self.model.to(self.device)
        self.contract = contract_for(self.model, min(k or DEFAULT_K, self.model.cfg.num_items))
        self.k = self.contract.k
        self.setup()
        self.load_seconds = time.perf_counter() - t0

    def setup(self) -> None:
        pass

    def serving_info(self) -> ServingInfo:
        vocab = Vocab.from_dict(self.checkpoint["vocab"])
        pop = popular_topk(self.checkpoint.get("popularity"), vocab, max(self.k, POPULAR_TOPK))
        return ServingInfo(self.contract, vocab, pop)

    def run(self, ids: torch.Tensor, noise: torch.Tensor | None):
        return reference_topk(self.model, ids, self.k, noise, plain=True)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(np.ascontiguousarray(feed["item_ids"])).to(self.device)
        noise = feed.get("noise")
        noise = None if noise is None else torch.from_numpy(np.ascontiguousarray(noise)).to(self.device)
        with torch.no_grad():
            outs = self.run(ids, noise)
        return to_host(outs, self.contract.output_names)


class _BucketedTorch(_TorchBackend):
    """A torch backend serving through ``BucketedModule``: requests padded into batch buckets of
    (P, ``history``) ids (``cddrec.runtime.buckets``, as ``ort-cuda-graph``), so the served module
    sees the bucket shapes only; rows with a longer history run the plain module (uncaptured,
    uncompiled). ``warmup()`` prepares every bucket (compiles, captures) before the first request."""

    runner: BucketedModule

    def warmup(self) -> float:
        t0 = time.perf_counter()
        self.runner.warmup()
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feed.get("noise") is not None:
            raise ValueError(f"{self.name} serves the deterministic chain; the noise input is not supported")
        return self.runner(feed["item_ids"])


class TorchReference(_TorchBackend):
    """The plain eager reference."""

    name = "torch"


class TorchFast(_TorchBackend):
    """Eager PyTorch on the model's hoisted last-position path (no export)."""

    name = "torch-fast"

    def run(self, ids, noise):
        return reference_topk(self.model, ids, self.k, noise, plain=False)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | None) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"the torch.compile mode must be one of {COMPILE_MODES}, got {mode!r}")


def inductor_captures(mode: str | None) -> bool:
    """Whether ``torch.compile(mode=mode)`` captures CUDA graphs itself (inductor's
    ``triton.cudagraphs``: on for "reduce-overhead" and "max-autotune"), so nobody may capture it
    again: a capture inside a capture fails."""
    if mode is None:
        return False
    import torch._inductor

    default = bool(torch._inductor.config.triton.cudagraphs)
    return bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs", default))


def compiled(module: torch.nn.Module, mode: str | None, backend: str, shapes: int):
    """``torch.compile`` with static shapes (``dynamic=False``): one graph per bucket shape, and a
    recompile limit that holds all ``shapes`` of them (dynamo's default, 8, would otherwise make
    the ninth bucket fall back to eager without a word)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # its name before 2.6
    setattr(cfg, limit, max(getattr(cfg, limit), shapes))
    return torch.compile(module, mode=None if mode == "default" else mode, backend=backend, dynamic=False)


class TorchCompiled(_BucketedTorch):
    """``torch.compile`` of the unrolled graph module (hoisted, last position, masking, top-k), one
    static shape per batch bucket, compiled at warm-up (``warmup()``, which ``Recommender.load``
    calls): a request of any width is padded to (bucket, ``history``) ids, so serving never
    recompiles (``dynamic=False`` on raw requests recompiled for every new width until dynamo's
    limit, then ran eagerly). Options: ``buckets`` (default ``DEFAULT_BUCKETS``), ``history``
    (default L), ``mode`` (a ``torch.compile`` mode), ``compile_backend`` (default "inductor")."""

    name = "torch-compile"

    def __init__(self, path: str | Path, *, k: int | None = None, threads: int = 0, device: str | None = None,
                 buckets=None, history: int | None = None, mode: str | None = None,
                 compile_backend: str = "inductor"):
        check_compile_mode(mode)
        self.buckets, self.history, self.mode, self.compile_backend = buckets, history, mode, compile_backend
        super().__init__(path, k=k, threads=threads, device=device)

    def setup(self) -> None:
        self.module = UnrolledRecommender(self.model, self.k).eval().to(self.device)
        self.buckets = check_buckets(DEFAULT_BUCKETS if self.buckets is None else self.buckets)
        fn = compiled(self.module, self.mode, self.compile_backend, len(self.buckets))
        self.runner = BucketedModule(fn, self.module, self.device, self.contract.output_names, buckets=self.buckets,
                                     history=self.history or self.contract.max_len,
                                     capture=False)


class TorchCuda(_BucketedTorch):
    """CUDA-graph replay of the unrolled module per batch bucket; optionally fp16 weights and torch.compile.

    A ``compile`` mode that captures CUDA graphs itself ("reduce-overhead", "max-autotune":
    ``inductor_captures``) is not captured again by ``BucketedModule``; any other mode is
    compiled, then captured per bucket.
    """

    name, device = "torch-cuda", "cuda"

    @classmethod
    def unavailable(cls) -> str | None:
        return None if torch.cuda.is_available() else "PyTorch sees no CUDA GPU"

    def __init__(self, path: str | Path, *, k: int | None = None, threads: int = 0, device: str | None = None,
                 fp16: bool = False, compile: str | None = None, cuda_graph: bool = True, buckets=None,
                 history: int | None = None):
        device = device or "cuda"
        if not torch.cuda.is_available() or torch.device(device).type != "cuda":
            raise BackendUnavailable(f"{self.name} needs a CUDA GPU (torch.cuda.is_available() is "
                                     f"{torch.cuda.is_available()}, device {device!r}); on the CPU use torch-fast "
                                     "or torch-compile, or ort-cpu on an exported graph")
        check_compile_mode(compile)
        self.fp16, self.compile_mode, self.cuda_graph = fp16, compile, cuda_graph
        self.buckets, self.history = buckets, history
        super().__init__(path, k=k, threads=threads, device=device)

    def setup(self) -> None:
        self.contract = dataclasses.replace(self.contract, fp16=self.fp16)
        self.module = UnrolledRecommender(self.model, self.k, fp16=self.fp16).eval().to(self.device)
        self.buckets = check_buckets(DEFAULT_BUCKETS if self.buckets is None else self.buckets)
        fn = self.module
        if self.compile_mode is not None:
            fn = compiled(self.module, self.compile_mode, "inductor", len(self.buckets))
        self.runner = BucketedModule(fn, self.module, self.device, self.contract.output_names, buckets=self.buckets,
                                     history=self.history or self.contract.max_len,
                                     capture=manual_capture(self.cuda_graph, self.compile_mode))


def manual_capture(cuda_graph: bool, compile_mode: str | None) -> bool:
    """Whether ``BucketedModule`` captures each bucket itself: asked for, and torch.compile does not
    capture already (``inductor_captures``)."""
    return cuda_graph and not inductor_captures(compile_mode)


class TorchCudaHalf(TorchCuda):
    """``torch-cuda`` with Linear weights stored in fp16 (as the ``--fp16`` graph)."""

    name = "torch-cuda-fp16"

    def __init__(self, path: str | Path, **kwargs):
        super().__init__(path, **{"fp16": True, **kwargs})

