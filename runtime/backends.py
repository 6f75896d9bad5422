"""Inference backends with one interface, ``infer(feed) -> outputs``, so any two compare.

``feed`` maps input names to numpy arrays (``item_ids`` (B, S) int64, optionally ``noise``
(T, B, d) float32); outputs map ``top_items`` (B, K) int64, ``top_scores`` (B, K) float32 and
``user_embedding`` (B, d) float32.

- ``ort-cpu`` / ``ort-cuda``: ONNX Runtime on an exported graph. Threads default to the
  cores, full graph optimization; on CUDA, inputs and outputs go through IO binding.
- ``trt``: a serialized TensorRT engine (``trt_backend``: TensorRT 10/11 name-based API, cuda-python buffers).
- ``torch``: the plain PyTorch reference from a model file (Python loop over the T steps).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

OUTPUT_NAMES = ("top_items", "top_scores", "user_embedding")
BACKENDS = ("ort-cpu", "ort-cuda", "trt", "torch")


class BackendUnavailable(RuntimeError):
    """The library a backend needs is missing; the message says what to install."""


class OrtBackend:
    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable("ONNX Runtime is not installed: pip install onnxruntime "
                                     "(or onnxruntime-gpu for ort-cuda)") from e
        self.name = f"ort-{device}"
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("ort-cuda needs onnxruntime-gpu with CUDA (pip install onnxruntime-gpu; "
                                         f"available providers here: {ort.get_available_providers()})")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.load_seconds = time.perf_counter() - t0
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = device
        self._ort = ort

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cuda":
            binding = self.session.io_binding()
            for name in self.input_names:
                binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(feed[name]), "cuda", 0))
            for name in self.output_names:
                binding.bind_output(name, "cuda", 0)
            self.session.run_with_iobinding(binding)
            return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
        outs = self.session.run(self.output_names, {n: feed[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))


class TorchBackend:
    """The PyTorch reference: eager model, Python loop over the steps, same outputs as the graph."""

    def __init__(self, path: str | Path, k: int, device: str = "cpu", threads: int = 0):
        import torch

        from cddrec.checkpoint import load_checkpoint

        if threads > 0:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model, self.checkpoint = load_checkpoint(path)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.load_seconds = time.perf_counter() - t0
        self.k = k
        self.name = "torch"
        self.input_names = ["item_ids"]
        self.output_names = list(OUTPUT_NAMES)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from cddrec.inference import reference_topk

        ids = torch.from_numpy(np.ascontiguousarray(feed["item_ids"])).to(self.device)
        noise = feed.get("noise")
        noise = None if noise is None else torch.from_numpy(noise).to(self.device)
        items, scores, user = reference_topk(self.model, ids, self.k, noise)
        return {"top_items": items.cpu().numpy(), "top_scores": scores.cpu().numpy(),
                "user_embedding": user.float().cpu().numpy()}


def load_backend(path: str | Path, backend: str = "ort-cpu", *, k: int = 10, threads: int = 0):
    """A backend for a graph (ort-*), an engine (trt) or a model file (torch)."""
    if backend == "ort-cpu":
        return OrtBackend(path, "cpu", threads)
    if backend == "ort-cuda":
        return OrtBackend(path, "cuda", threads)
    if backend == "trt":
        from .trt_backend import TrtBackend  # torch-free: cuda-python buffers

        return TrtBackend(path)
    if backend == "torch":
        import torch

        return TorchBackend(path, k, "cuda" if torch.cuda.is_available() else "cpu", threads)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
