"""PyTorch backends from a model file, behind the runtime's ``Backend`` protocol.

- ``torch``: the plain reference (eager, Python loop over the T steps, every position decoded,
  keys/values projected at every step): what every fast path is checked against.
- ``torch-fast``: eager, on the model's hoisted last-position path.
- ``torch-compile``: ``torch.compile`` of the unrolled graph module (the exported graph's math).

They are found by name through ``cddrec.runtime.backends.load_backend`` (the runtime itself
never imports torch). Each reads its K from the caller (default ``DEFAULT_K``) and offers
``serving_info()`` from the model file, so ``Recommender`` serves a model.pt like a graph.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cddrec.checkpoint import load_checkpoint
from cddrec.contract import DEFAULT_K, POPULAR_TOPK, ServingInfo
from cddrec.inference import popular_topk, reference_topk
from cddrec.vocab import Vocab

from .graph import UnrolledRecommender
from .onnx_export import contract_for


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _TorchBackend:
    name = "torch"

    def __init__(self, path: str | Path, *, k: int | None = None, threads: int = 0, device: str | None = None):
        if threads > 0:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model, self.checkpoint = load_checkpoint(path)
        self.device = torch.device(device or default_device())
        self.model.to(self.device)
        self.contract = contract_for(self.model, min(k or DEFAULT_K, self.model.cfg.num_items))
        self.k = self.contract.k
        self.input_names = ["item_ids"]
        self.output_names = ["top_items", "top_scores", "user_embedding"]
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
            items, scores, user = self.run(ids, noise)
        return {"top_items": items.cpu().numpy(), "top_scores": scores.float().cpu().numpy(),
                "user_embedding": user.float().cpu().numpy()}


class TorchReference(_TorchBackend):
    """The plain eager reference."""

    name = "torch"


class TorchFast(_TorchBackend):
    """Eager PyTorch on the model's hoisted last-position path (no export)."""

    name = "torch-fast"

    def run(self, ids, noise):
        return reference_topk(self.model, ids, self.k, noise, plain=False)


class TorchCompiled(_TorchBackend):
    """``torch.compile`` of the unrolled graph module (hoisted, last position, masking, top-k)."""

    name = "torch-compile"

    def setup(self) -> None:
        module = UnrolledRecommender(self.model, self.k).eval().to(self.device)
        self.module = torch.compile(module, dynamic=False)

    def run(self, ids, noise):
        return self.module(ids)
