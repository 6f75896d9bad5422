"""The floor of a CUDA backend: the GPU's own dense matmul peak, not the CPU's.

``gpu_matmul_peak(dtype)`` measures n x n @ n x n matmuls on the GPU with torch, timed by CUDA
events (no host clock, no launch gaps in the window), at one of three precisions: ``fp32``
(TF32 off), ``tf32`` (fp32 tensors, TF32 tensor cores) and ``fp16`` (fp16 tensors, fp32
accumulation by cuBLAS). ``floor_for(backend, ...)`` picks the peak a backend is held against:
the CPU's fp32 peak for CPU backends; on CUDA, the fp16 peak for fp16 graphs or autocast, the
TF32 peak where TF32 is on, and the fp32 peak otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from cddrec.runtime.backends import backend_class

DTYPES = ("fp32", "tf32", "fp16")


@dataclass(frozen=True)
class Floor:
    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "tf32" | "fp16"
    gflops: float  # the measured matmul peak the floor is computed from

    def users_per_s(self, flops_per_user: float) -> float:
        return self.gflops * 1e9 / flops_per_user


@functools.lru_cache(maxsize=None)
def gpu_matmul_peak(dtype: str = "fp32", n: int = 8192, seconds: float = 0.5, device: str = "cuda") -> float:
    """Measured dense matmul GFLOP/s on the GPU at ``dtype`` (cached per arguments)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU matmul peak needs a CUDA GPU (torch.cuda.is_available() is False)")
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")  # torch >= 2.9; the old allow_tf32 must not be mixed with it
    saved = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "tf32" if dtype == "tf32" else "ieee"
    else:
        matmul.allow_tf32 = dtype == "tf32"
    try:
        tdtype = torch.float16 if dtype == "fp16" else torch.float32
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=tdtype, generator=g)  # (n, n)
        b = torch.randn(n, n, device=device, dtype=tdtype, generator=g)  # (n, n)
        c = torch.empty(n, n, device=device, dtype=tdtype)  # (n, n)
        for _ in range(3):  # cuBLAS handle, workspace, algorithm choice
            torch.matmul(a, b, out=c)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        runs = max(5, int(seconds / max(start.elapsed_time(end) / 1e3, 1e-6)))
        start.record()
        for _ in range(runs):
            torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        return 2.0 * n**3 * runs / (start.elapsed_time(end) / 1e3) / 1e9
    finally:
        if new_api:
            matmul.fp32_precision = saved
        else:
            matmul.allow_tf32 = saved


def precision_for(*, fp16: bool = False, tf32: bool = False) -> str:
    """The matmul precision of a CUDA backend's work: fp16 graph/autocast > TF32 on > fp32."""
    return "fp16" if fp16 else "tf32" if tf32 else "fp32"


def floor_for(backend: str, *, cpu_peak: Callable[[], float], gpu_peak: Callable[[str], float] = gpu_matmul_peak,
              device: str | None = None, fp16: bool = False, tf32: bool = False) -> Floor:
    """The floor ``backend`` is held against.

    ``device`` is where the backend runs (default: the backend class's ``device``; pass
    "cuda" for the torch backends when they run on the GPU). ``fp16``: an fp16 graph, engine or
    autocast; ``tf32``: TF32 is on for its fp32 matmuls. ``cpu_peak()`` and ``gpu_peak(dtype)``
    measure (GFLOP/s); only the one needed is called.
    """
    device = device or backend_class(backend).device
    if device.startswith("cuda"):
        precision = precision_for(fp16=fp16, tf32=tf32)
        return Floor("cuda", precision, float(gpu_peak(precision)))
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return Floor("cpu", "fp32", float(cpu_peak()))
