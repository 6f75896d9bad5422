"""The one ONNX Runtime session factory: export validation, serving and benchmarks all open
graphs here, so what validation checks is the configuration that serves.

Threads default to every core (``intra_op_num_threads``), one inter-op thread, full graph
optimization. ``device="cuda"`` selects the CUDA provider (TF32 off unless asked for: fp32
means fp32) with the CPU provider as fallback for the ops CUDA lacks.
"""

from __future__ import annotations

import os
from pathlib import Path

from cddrec.errors import BackendUnavailable


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it: a container's or
    a pinned server worker's share, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


LEVELS = ("disable", "basic", "extended", "all")


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailable("ONNX Runtime is not installed: pip install onnxruntime "
                                 "(or onnxruntime-gpu for ort-cuda)") from e
    return ort


def cuda_provider_available() -> bool:
    try:
        return "CUDAExecutionProvider" in import_ort().get_available_providers()
    except BackendUnavailable:
        return False


def session_options(threads: int = 0, level: str = "all", optimized_path: str | Path | None = None,
                    profile_prefix: str | None = None, dims: dict[str, int] | None = None,
                    allow_spinning: bool | None = None):
    ort = import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads if threads > 0 else available_cores()
    so.inter_op_num_threads = 1
    if allow_spinning is not None:  # intra-op threads busy-wait between ops (ONNX Runtime's default: on)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix:  # per-node timings, written by session.end_profiling()
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    for name, size in (dims or {}).items():  # fixed sizes of named dynamic axes (a static-shape session)
        so.add_free_dimension_override_by_name(name, int(size))
    return so


def providers_for(device: str, *, tf32: bool = False, cuda_options: dict | None = None) -> list:
    """The provider list of a device: CPU, or CUDA (TF32 off by default) then CPU."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not cuda_provider_available():
        raise BackendUnavailable("ort-cuda and ort-cuda-graph need onnxruntime-gpu with CUDA (pip install "
                                 "onnxruntime-gpu; available "
                                 f"providers here: {import_ort().get_available_providers()})")
    opts = {"use_tf32": "1" if tf32 else "0", **{k: str(v) for k, v in (cuda_options or {}).items()}}
    return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]


def ort_session(path: str | Path, device: str = "cpu", *, threads: int = 0, level: str = "all", tf32: bool = False,
                cuda_options: dict | None = None, optimized_path: str | Path | None = None,
                profile_prefix: str | None = None, dims: dict[str, int] | None = None,
                allow_spinning: bool | None = None):
    """An ``onnxruntime.InferenceSession`` on ``path`` for ``device`` ("cpu" | "cuda"); ``dims`` fixes
    named dynamic axes (e.g. ``{"batch": 64, "history": 20}``) so shape computations fold away, as a
    captured CUDA graph needs (``cuda_options={"enable_cuda_graph": 1}``)."""
    ort = import_ort()
    so = session_options(threads, level, optimized_path, profile_prefix, dims, allow_spinning)
    return ort.InferenceSession(str(path), so, providers=providers_for(device, tf32=tf32, cuda_options=cuda_options))


# ONNX Runtime's type strings -> numpy dtype names
_ORT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(bool)": "bool",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bfloat16)": "bfloat16"}


def session_io(session) -> tuple[list[tuple], list[tuple]]:
    """A session's inputs and outputs as ``[(name, numpy dtype name, shape)]`` (axes: int, or the
    name of a dynamic axis, or None), the form ``GraphContract.io_problems`` checks."""
    def specs(args):
        return [(a.name, _ORT_TYPES.get(a.type, a.type), list(a.shape) if a.shape is not None else None) for a in args]

    return specs(session.get_inputs()), specs(session.get_outputs())

