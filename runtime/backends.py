"""Inference backends behind one protocol, so any two compare and any one serves.

A backend has a ``name``, the seconds it took to load (``load_seconds``), its ``input_names`` and
``output_names``, and ``infer(feed) -> outputs``: ``feed`` maps input names to numpy arrays
(``item_ids`` (B, S) int64, optionally ``noise`` (T, B, d) float32); outputs map ``top_items``
(B, K) int64, ``top_scores`` (B, K) float32 and ``user_embedding`` (B, d) float32. A backend may
also offer ``metadata()`` (the graph's metadata) or ``serving_info()`` (for model files).

Built in, torch-free: ``ort-cpu`` and ``ort-cuda`` (ONNX Runtime on an exported graph) and
``trt`` (a TensorRT engine). The PyTorch backends (``torch``, the plain reference, and the
faster ``torch-fast``, ``torch-compile``, ``torch-cuda``) live in ``cddrec.export.torch_backends``
and are found by name, like third-party backends registered under the entry-point group
``cddrec.backends``: this package never imports torch.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from cddrec.errors import BackendUnavailable, ModelFileError

from .session import import_ort, ort_session

OUTPUT_NAMES = ("top_items", "top_scores", "user_embedding")
ENTRY_POINT_GROUP = "cddrec.backends"
# name -> "module:factory"; a factory is called as factory(path, k=..., threads=..., **options)
BUILTIN = {
    "ort-cpu": "cddrec.runtime.backends:OrtBackend.cpu",
    "ort-cuda": "cddrec.runtime.backends:OrtBackend.cuda",
    "trt": "cddrec.runtime.trt_backend:TrtBackend.load",
    "torch": "cddrec.export.torch_backends:TorchReference",
    "torch-fast": "cddrec.export.torch_backends:TorchFast",
    "torch-compile": "cddrec.export.torch_backends:TorchCompiled",
}
GRAPH_BACKENDS = ("ort-cpu", "ort-cuda")  # read an exported graph (.onnx)
MODEL_BACKENDS = ("torch", "torch-fast", "torch-compile")  # read a model file (model.pt)


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
    """ONNX Runtime on an exported graph; on CUDA, inputs and outputs go through IO binding."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0, **session_kwargs):
        ort = import_ort()
        self.name = f"ort-{device}"
        t0 = time.perf_counter()
        errors = ort.capi.onnxruntime_pybind11_state
        try:
            self.session = ort_session(path, device, threads=threads, **session_kwargs)
        except (errors.Fail, errors.InvalidArgument, errors.InvalidProtobuf, errors.InvalidGraph,
                errors.NoSuchFile, errors.NotImplemented) as e:
            raise ModelFileError(f"{path}: ONNX Runtime cannot load it as a graph "
                                 f"({str(e).splitlines()[0][:200]})") from None
        self.load_seconds = time.perf_counter() - t0
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = device
        self._ort = ort

    @classmethod
    def cpu(cls, path, *, k=None, threads: int = 0, **kwargs) -> "OrtBackend":
        return cls(path, "cpu", threads, **kwargs)

    @classmethod
    def cuda(cls, path, *, k=None, threads: int = 0, **kwargs) -> "OrtBackend":
        return cls(path, "cuda", threads, **kwargs)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

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
