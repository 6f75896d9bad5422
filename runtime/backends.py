"""Inference backends with one interface, ``infer(feed) -> outputs``, so any two compare.

``feed`` maps input names to numpy arrays (``item_ids`` (B, S) int64, optionally ``noise``
(T, B, d) float32); outputs map ``top_items`` (B, K) int64, ``top_scores`` (B, K) float32 and
``user_embedding`` (B, d) float32.

- ``ort-cpu`` / ``ort-cuda``: ONNX Runtime on an exported graph. Threads default to the
  cores, full graph optimization; on CUDA, inputs and outputs go through IO binding.
- ``trt``: a serialized TensorRT engine (TensorRT 10 name-based API, CUDA buffers from torch).
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
    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0, allow_spinning: bool | None = None):
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
        if allow_spinning is not None:  # intra-op threads busy-wait between ops (ONNX Runtime's default: on)
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
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


class TrtBackend:
    """A serialized TensorRT engine; buffers are torch CUDA tensors."""

    def __init__(self, path: str | Path):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendUnavailable("the trt backend needs TensorRT: pip install 'cddrec[gpu]' "
                                     "(tensorrt) on a machine with an NVIDIA GPU") from e
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("the trt backend needs a CUDA GPU (torch.cuda.is_available() is False)")
        t0 = time.perf_counter()
        self._trt, self._torch = trt, torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the engine (other TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_in[n]]
        self.output_names = [n for n in names if not is_in[n]]
        self.load_seconds = time.perf_counter() - t0
        self.name = "trt"

    def _dtype(self, name: str):
        return self._torch.from_numpy(np.zeros(0, dtype=self._trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep = []
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                t = torch.from_numpy(np.ascontiguousarray(feed[name])).to("cuda", non_blocking=True)
                t = t.to(self._dtype(name)).contiguous()  # e.g. int64 -> int32 where the engine wants it
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.output_names:
                o = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name), device="cuda")
                outs[name] = o
                self.context.set_tensor_address(name, o.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        res = {n: o.cpu().numpy() for n, o in outs.items()}
        res["top_items"] = res["top_items"].astype(np.int64, copy=False)
        return res


def load_backend(path: str | Path, backend: str = "ort-cpu", *, k: int = 10, threads: int = 0):
    """A backend for a graph (ort-*), an engine (trt) or a model file (torch)."""
    if backend == "ort-cpu":
        return OrtBackend(path, "cpu", threads)
    if backend == "ort-cuda":
        return OrtBackend(path, "cuda", threads)
    if backend == "trt":
        return TrtBackend(path)
    if backend == "torch":
        import torch

        return TorchBackend(path, k, "cuda" if torch.cuda.is_available() else "cpu", threads)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
