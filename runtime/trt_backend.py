"""The ``trt`` backend: a serialized TensorRT engine, torch-free.

Device buffers and the stream come from cuda-python's runtime bindings, as in NVIDIA's
``samples/python/common_runtime.py``: ``from cuda.bindings import runtime as cudart``
(cuda-python >= 12.6 and 13), falling back to the older ``from cuda import cudart``. The engine is
driven through the name-based API common to TensorRT 10 and 11: ``num_io_tensors``,
``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``, ``set_input_shape``,
``get_tensor_shape``, ``set_tensor_address`` and ``execute_async_v3``. Device buffers are
allocated once per tensor and grown when a larger batch comes; inputs are cast to the dtypes the
engine declares (int64 ids stay int64 where the engine takes int64).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cddrec.contract import MAX_HISTORY, GraphContract
from cddrec.errors import BackendUnavailable, ModelFileError

from .backends import BackendBase

INSTALL = "pip install 'cddrec[gpu]' (tensorrt, cuda-python) on a machine with an NVIDIA GPU"


def import_cudart():
    """cuda-python's CUDA runtime module, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6, 13
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    return cudart


def import_trt_runtime():
    """(tensorrt, cudart); BackendUnavailable naming every missing package."""
    cudart = import_cudart()
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    missing = [name for name, mod in (("tensorrt", trt), ("cuda-python", cudart)) if mod is None]
    if missing:
        raise BackendUnavailable(f"the trt backend needs {' and '.join(missing)}: {INSTALL}")
    return trt, cudart


def cuda_call(cudart, result, what: str):
    """Unpack cuda-python's ``(error, *values)``; raise with the CUDA error's name."""
    err, *values = result
    if int(err.value if hasattr(err, "value") else err) != 0:
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise BackendUnavailable(f"{what} failed: {name}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def require_gpu(cudart) -> int:
    try:
        count = cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except RuntimeError as e:
        raise BackendUnavailable(f"the trt backend needs a CUDA GPU: {e}") from e
    if not count:
        raise BackendUnavailable("the trt backend needs a CUDA GPU: cudaGetDeviceCount found none")
    return count


def engine_metadata(path: str | Path) -> dict[str, str]:
    """The graph metadata an engine carries beside it (``ENGINE.meta.json``, written by cddrec-export --trt)."""
    path = Path(path)
    meta_json = path.with_name(path.name + ".meta.json")
    if not meta_json.exists():
        raise ModelFileError(f"{meta_json}: missing; an engine's metadata is written beside it by cddrec-export --trt")
    try:
        return json.loads(meta_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{meta_json}: not readable engine metadata ({e})") from None


def engine_io_problems(contract: GraphContract, tensors: list[tuple[str, bool, np.dtype, tuple]]) -> list[str]:
    """What differs between an engine's io tensors ``[(name, is_input, numpy dtype, shape)]`` and its
    contract, checked by the one contract check (``GraphContract.io_problems``: names, dtypes, ranks,
    static sizes). An engine lists its tensors in its own order (taken in the contract's), marks a
    dynamic axis -1 (a symbol to the check) and may run int64 tensors as int32 (TensorRT narrows
    them; ``infer`` casts ids in and items out), so int32 stands for the contract's int64."""
    declared = {t.name: t.dtype for t in contract.inputs + contract.outputs}

    def io(want_input: bool, order: list[str]) -> list[tuple]:
        rank = {name: i for i, name in enumerate(order)}
        picked = sorted((t for t in tensors if t[1] == want_input), key=lambda t: rank.get(t[0], len(rank)))
        return [(name, declared.get(name) if dtype == np.int32 and declared.get(name) == "int64" else dtype.name,
                 tuple(None if d == -1 else int(d) for d in shape)) for name, _, dtype, shape in picked]

    return contract.io_problems(io(True, contract.input_names), io(False, contract.output_names),
                                axis_names=False, exact_sizes=False)


class TrtBackend(BackendBase):
    """A serialized TensorRT engine (``.plan``); its metadata is ``ENGINE.meta.json``."""

    name, device, reads = "trt", "cuda", "engine"
    max_history = MAX_HISTORY  # the engine's profile stops there (export/tensorrt.py)

    def __init__(self, path: str | Path, *, k: int | None = None, threads: int = 0):
        self._cudart = None
        trt, cudart = import_trt_runtime()
        require_gpu(cudart)
        self.contract = GraphContract.from_metadata(engine_metadata(path), path)
        t0 = time.perf_counter()
        self._trt, self._cudart = trt, cudart
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ModelFileError(f"{path}: TensorRT could not deserialize the engine (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        tensors = [(n, self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT, self.dtypes[n],
                    tuple(self.engine.get_tensor_shape(n))) for n in names]
        problems = engine_io_problems(self.contract, tensors)
        if problems:
            raise ModelFileError(f"{path}: the engine does not match its cddrec metadata: {'; '.join(problems[:3])}; "
                                 "rebuild it with cddrec-export --trt")
        self.stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.load_seconds = time.perf_counter() - t0
        self.path = Path(path)

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import_trt_runtime()
        except BackendUnavailable as e:
            return str(e)
        return None

    def metadata(self) -> dict[str, str]:
        return engine_metadata(self.path)

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_call(self._cudart, self._cudart.cudaFree(ptr), "cudaFree")
            ptr = cuda_call(self._cudart, self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc")
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, stream = self._cudart, self.stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_in = []  # alive until the stream is synchronized
        for name in self.input_names:
            arr = np.ascontiguousarray(feed[name], dtype=self.dtypes[name])  # e.g. item_ids (B, S)
            host_in.append(arr)
            ptr = self._device(name, arr.nbytes)
            cuda_call(cudart, cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream), "cudaMemcpyAsync")
            if not self.context.set_input_shape(name, arr.shape):
                raise ValueError(f"{name} of shape {arr.shape} is outside the engine's optimization profile "
                                 f"{self.engine.get_tensor_profile_shape(name, 0)} (min, opt, max)")
            self.context.set_tensor_address(name, ptr)
        outs = {}
        for name in self.output_names:
            out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])  # e.g. (B, K)
            outs[name] = out
            self.context.set_tensor_address(name, self._device(name, out.nbytes))
        if not self.context.execute_async_v3(int(stream)):
            raise BackendUnavailable("TensorRT execution failed")
        for name, out in outs.items():
            cuda_call(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, stream),
                      "cudaMemcpyAsync")
        cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        outs["top_items"] = outs["top_items"].astype(np.int64, copy=False)
        return outs

    def close(self) -> None:
        """Free the device buffers and the stream (also on garbage collection)."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
