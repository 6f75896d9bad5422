"""Inference backends behind one protocol, so any two compare and any one serves.

A backend has a ``name``, the seconds it took to load (``load_seconds``), its ``input_names`` and
``output_names``, and ``infer(feed) -> outputs``: ``feed`` maps input names to numpy arrays
(``item_ids`` (B, S) int64, optionally ``noise`` (T, B, d) float32); outputs map ``top_items``
(B, K) int64, ``top_scores`` (B, K) float32 and ``user_embedding`` (B, d) float32. A backend may
also offer ``metadata()`` (the graph's metadata) or ``serving_info()`` (for model files).

Built in, torch-free: ``ort-cpu``, ``ort-cuda`` and ``ort-cuda-graph`` (ONNX Runtime on an
exported graph; the last replays captured CUDA graphs per batch bucket) and ``trt`` (a TensorRT
engine). The PyTorch backends (``torch``, the plain reference, and the
faster ``torch-fast``, ``torch-compile``, ``torch-cuda``, ``torch-cuda-fp16``) live in ``cddrec.export.torch_backends``
and are found by name, like third-party backends registered under the entry-point group
``cddrec.backends``: this package never imports torch.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from cddrec.contract import GraphContract
from cddrec.errors import BackendUnavailable, ModelFileError

from .buckets import DEFAULT_BUCKETS, check_buckets, run_bucketed
from .session import import_ort, ort_session

OUTPUT_NAMES = ("top_items", "top_scores", "user_embedding")
ENTRY_POINT_GROUP = "cddrec.backends"
# name -> "module:factory"; a factory is called as factory(path, k=..., threads=..., **options)
BUILTIN = {
    "ort-cpu": "cddrec.runtime.backends:OrtBackend.cpu",
    "ort-cuda": "cddrec.runtime.backends:OrtBackend.cuda",
    "ort-cuda-graph": "cddrec.runtime.backends:OrtBackend.cuda_graphs",
    "trt": "cddrec.runtime.trt_backend:TrtBackend.load",
    "torch": "cddrec.export.torch_backends:TorchReference",
    "torch-fast": "cddrec.export.torch_backends:TorchFast",
    "torch-compile": "cddrec.export.torch_backends:TorchCompiled",
    "torch-cuda": "cddrec.export.torch_backends:TorchCuda",
    "torch-cuda-fp16": "cddrec.export.torch_backends:TorchCuda.half",
}
GRAPH_BACKENDS = ("ort-cpu", "ort-cuda", "ort-cuda-graph")  # read an exported graph (.onnx)
MODEL_BACKENDS = ("torch", "torch-fast", "torch-compile", "torch-cuda", "torch-cuda-fp16")  # read a model file
CUDA_BACKENDS = ("ort-cuda", "ort-cuda-graph", "torch-cuda", "torch-cuda-fp16", "trt")  # always run on the GPU


@runtime_checkable
class Backend(Protocol):
    name: str
    load_seconds: float
    input_names: list[str]
    output_names: list[str]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def available_backends() -> dict[str, str]:
    """Every backend name this installation knows: the built-in ones and the entry points."""
    names = dict(BUILTIN)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            names.setdefault(ep.name, ep.value)
    except Exception:  # noqa: BLE001 - a broken third-party distribution must not break serving
        pass
    return names


def _factory(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def load_backend(path: str | Path, backend: str = "ort-cpu", *, k: int | None = None, threads: int = 0,
                 **options) -> Backend:
    """Open ``path`` with the backend called ``backend``; ``k`` is used by backends that build their
    graph from a model file (the exported graph's K is fixed)."""
    names = available_backends()
    if backend not in names:
        raise ValueError(f"backend must be one of {', '.join(names)}, got {backend!r}")
    try:
        factory = _factory(names[backend])
    except ImportError as e:
        raise BackendUnavailable(f"backend {backend!r} needs {e.name or 'a missing module'} "
                                 f"({'pip install torch' if (e.name or '').startswith('torch') else e})") from e
    return factory(path, k=k, threads=threads, **options)


class OrtBackend:
    """ONNX Runtime on an exported graph; on CUDA, inputs and outputs go through IO binding.

    Options: ``tf32`` (CUDA only; off by default: fp32 means fp32); ``cuda_graph=True`` (CUDA
    only) serves through captured CUDA graphs: one static-shape session per batch bucket
    (``buckets``, default ``DEFAULT_BUCKETS``; history length ``history``, default the graph's L),
    the CUDA provider's ``enable_cuda_graph``, input and output buffers allocated once on the
    device and bound with IO binding, inputs updated in place (``OrtValue.update_inplace``).
    Requests are padded up to the bucket (``cddrec.runtime.buckets``); rows with a longer history
    and graphs with a noise input run on the uncaptured session. ``buckets=`` without
    ``cuda_graph`` runs the same static-shape sessions uncaptured (on the CPU too: how the bucket
    path is tested without a GPU).
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0, *, cuda_graph: bool = False,
                 buckets=None, history: int | None = None, **session_kwargs):
        ort = import_ort()
        if cuda_graph and device != "cuda":
            raise ValueError("cuda_graph=True needs device 'cuda' (ort-cuda)")
        self.name = f"ort-{device}" + ("-graph" if cuda_graph else "")
        t0 = time.perf_counter()
        self._errors = ort.capi.onnxruntime_pybind11_state
        self.path, self.threads, self.session_kwargs = path, threads, session_kwargs
        self.session = self._open(device)
        self.load_seconds = time.perf_counter() - t0
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = device
        self._ort = ort
        self.cuda_graph = cuda_graph
        self.buckets: tuple[int, ...] | None = None
        self._static: dict[int, _StaticBucket] = {}
        if cuda_graph or buckets is not None:
            contract = GraphContract.from_metadata(self.metadata(), path)
            if contract.stochastic:
                raise ValueError("captured/bucketed sessions serve deterministic graphs (this one takes noise)")
            self.contract = contract
            self.buckets = check_buckets(DEFAULT_BUCKETS if buckets is None else buckets)
            self.history = int(history or contract.max_len)
            if self.history < 1:
                raise ValueError(f"history must be >= 1, got {history}")

    def _open(self, device: str, **extra):
        try:
            return ort_session(self.path, device, threads=self.threads, **self.session_kwargs, **extra)
        except tuple(getattr(self._errors, n) for n in ("Fail", "InvalidArgument", "InvalidProtobuf", "InvalidGraph",
                                                         "NoSuchFile", "NotImplemented", "RuntimeException", "EPFail")
                     if hasattr(self._errors, n)) as e:
            if extra.get("cuda_options", {}).get("enable_cuda_graph"):
                raise BackendUnavailable(f"{self.path}: ONNX Runtime cannot capture this graph as a CUDA graph "
                                         f"({str(e).splitlines()[0][:300]})") from None
            hint = ("; it looks like a model file (model.pt): export it with cddrec-export, or serve it with "
                    "--backend torch") if Path(self.path).suffix.lower() in (".pt", ".pth") else ""
            raise ModelFileError(f"{self.path}: ONNX Runtime cannot load it as a graph "
                                 f"({str(e).splitlines()[0][:200]}){hint}") from None

    @classmethod
    def cpu(cls, path, *, k=None, threads: int = 0, **kwargs) -> "OrtBackend":
        return cls(path, "cpu", threads, **kwargs)

    @classmethod
    def cuda(cls, path, *, k=None, threads: int = 0, **kwargs) -> "OrtBackend":
        return cls(path, "cuda", threads, **kwargs)

    @classmethod
    def cuda_graphs(cls, path, *, k=None, threads: int = 0, **kwargs) -> "OrtBackend":
        return cls(path, "cuda", threads, **{"cuda_graph": True, **kwargs})

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def static_bucket(self, bucket: int) -> "_StaticBucket":
        """The static-shape session of ``bucket`` rows (created, and on CUDA captured, on first use)."""
        if bucket not in self._static:
            cuda_options = dict(self.session_kwargs.get("cuda_options") or {})
            if self.cuda_graph:
                cuda_options["enable_cuda_graph"] = "1"
            kwargs = {"cuda_options": cuda_options} if self.device == "cuda" else {}
            sess = self._open(self.device, dims={"batch": bucket, "history": self.history}, **kwargs)
            self._static[bucket] = _StaticBucket(self._ort, sess, self.device, bucket, self.history, self.contract)
        return self._static[bucket]

    def warmup(self) -> None:
        """Create (and capture) every bucket now instead of at its first request."""
        for b in self.buckets or ():
            self.static_bucket(b).run(np.zeros((b, self.history), dtype=np.int64))

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.buckets is not None:
            return run_bucketed(np.asarray(feed["item_ids"], dtype=np.int64), self.buckets, self.history,
                                lambda b, ids: self.static_bucket(b).run(ids),
                                lambda ids: self._infer_dynamic({"item_ids": ids}))
        return self._infer_dynamic(feed)

    def _infer_dynamic(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


class _StaticBucket:
    """One static-shape session (P, H) with its input and outputs allocated once on the device and
    bound once; a run updates the input in place, so a captured CUDA graph replays on the same
    addresses (ONNX Runtime's "Using CUDA Graphs" recipe)."""

    def __init__(self, ort, session, device: str, bucket: int, history: int, contract: GraphContract):
        self.session, self.device, self.shape = session, device, (bucket, history)
        self.input = ort.OrtValue.ortvalue_from_shape_and_type([bucket, history], np.int64, device, 0)
        self.outputs = {t.name: ort.OrtValue.ortvalue_from_shape_and_type(
            [bucket if s == "batch" else int(s) for s in t.shape], np.dtype(t.dtype).type, device, 0)
            for t in contract.outputs}
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input("item_ids", self.input)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of ``ids`` (P, H) int64, as host arrays of their own."""
        if ids.shape != self.shape:
            raise ValueError(f"bucket input must be {self.shape}, got {ids.shape}")
        self.input.update_inplace(np.ascontiguousarray(ids, dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        # a CPU OrtValue's numpy() is a view of the bound buffer (the next run overwrites it): copy;
        # a CUDA one is copied to the host by numpy() itself
        return {name: (v.numpy().copy() if self.device == "cpu" else v.numpy()) for name, v in self.outputs.items()}
