"""The roofline: the best case a backend could reach here, users/s = measured matmul peak / FLOPs per user.

A ceiling, not a floor: it assumes every FLOP of the graph runs at the machine's dense matmul
peak, with nothing else costing time (memory traffic, small matrices, top-k, Python). A
measured share above 1 means the peak measurement fell short of what the backend's own
kernels reach (another BLAS, another blocking), not that the backend beat its hardware.

One measurement per device and precision (``matmul_peak``), cached per arguments:

- cpu ``fp32``: numpy's matmul (the BLAS numpy links), n x n by n x n, in a child process whose
  BLAS runs ``threads`` threads (the thread count is read at BLAS start-up); torch-free;
- cpu ``int8``: ONNX Runtime's ``MatMulInteger`` (uint8 x int8 -> int32), the kernel of the
  dynamically quantized MatMuls of ``cddrec-export --int8``; it uses VNNI (AVX512-VNNI,
  AVX-VNNI) where the CPU has it (``cpu_int8_features`` reads /proc/cpuinfo); int8 operations
  are counted as FLOPs;
- cpu ``fp16``: ONNX Runtime's fp16 ``MatMul`` (what an fp16 graph gets on the CPU);
- cuda ``fp32`` (TF32 off), ``tf32``, ``fp16``: torch matmuls timed by CUDA events.

A backend is held against the peak at its graph's precision, read from its contract
(``precision_of``), never from its name: fp16 from ``GraphContract.fp16``; int8 from the export
settings in the graph's metadata (``int8``: the weight MatMuls, ``int8_scoring``: the scoring
MatMul too, ``rescore``: the candidate scoring pass); TF32 from the backend's own option. A graph
of mixed precision is held against the sum of its parts: seconds per user = sum over operand
kinds (``cddrec.flops.flops_by_operand``) of FLOPs / peak at that kind's precision.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .timer import time_calls

PRECISIONS = {"cpu": ("fp32", "int8", "fp16"), "cuda": ("fp32", "tf32", "fp16")}
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 int8 dot-product instructions MLAS uses
INT8_DOT_FLAGS = VNNI_FLAGS + ("asimddp", "i8mm")  # and Arm's
# Two one-node ONNX graphs (a: (m, k), b: (k, n) -> y: (m, n), opset 13, IR 8), serialized by
# onnx.helper (tests/test_roofline.py rebuilds and checks them) so that a serving install, which
# has ONNX Runtime but not the onnx package, measures its peaks too.
PEAK_GRAPHS = {
    "int8": "CAgSD2NkZHJlYy1yb29mbGluZTplChgKAWEKAWISAXkiDU1hdE11bEludGVnZXISBHBlYWtaFQoBYRIQCg4IAhIKCgMSAW0KAxIBa1oVC"
            "gFiEhAKDggDEgoKAxIBawoDEgFuYhUKAXkSEAoOCAYSCgoDEgFtCgMSAW5CBAoAEA0=",  # MatMulInteger uint8 x int8
    "fp16": "CAgSD2NkZHJlYy1yb29mbGluZTpeChEKAWEKAWISAXkiBk1hdE11bBIEcGVha1oVCgFhEhAKDggKEgoKAxIBbQoDEgFrWhUKAWISEAo"
            "OCAoSCgoDEgFrCgMSAW5iFQoBeRIQCg4IChIKCgMSAW0KAxIBbkIECgAQDQ==",  # MatMul fp16
}


@dataclass(frozen=True)
class Peak:
    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "int8" | "fp16" | "tf32"
    gflops: float  # measured dense matmul GFLOP/s (int8: GOP/s)
    method: str  # what was timed
    threads: int = 0  # CPU threads (0 on CUDA)

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ peaks
def matmul_peak(device: str = "cpu", precision: str = "fp32", threads: int = 0, *, n: int = 0,
                seconds: float = 1.0) -> Peak:
    """The measured dense matmul peak of ``device`` at ``precision`` (n x n by n x n; ``threads``
    0 = every core). Cached per arguments: a bench measures each peak once."""
    if device not in PRECISIONS:
        raise ValueError(f"device must be one of {sorted(PRECISIONS)}, got {device!r}")
    if precision not in PRECISIONS[device]:
        raise ValueError(f"the {device} peak is measured at {', '.join(PRECISIONS[device])}, not {precision!r}")
    threads = 0 if device == "cuda" else (threads or os.cpu_count() or 1)
    return _measured(device, precision, threads, n or default_size(device, threads), seconds)


def default_size(device: str, threads: int) -> int:
    """n of the n x n matmuls: large enough that the kernels reach their peak (measured: 1024 and 2048
    give the same GFLOP/s on 2 cores), small enough to time in a fraction of a second."""
    return 8192 if device == "cuda" else 2048 if threads > 8 else 1024


@functools.lru_cache(maxsize=None)
def _measured(device: str, precision: str, threads: int, n: int, seconds: float) -> Peak:
    if device == "cuda":
        return Peak(device, precision, cuda_matmul_peak(precision, n, seconds), f"torch {n}x{n} matmul, CUDA events")
    if precision == "fp32":
        return Peak(device, precision, numpy_matmul_peak(threads, n, seconds), f"numpy {n}x{n} matmul", threads)
    op = "MatMulInteger uint8 x int8" if precision == "int8" else "MatMul fp16"
    return Peak(device, precision, ort_matmul_peak(precision, threads, n, seconds),
                f"onnxruntime {op}, {n}x{n}", threads)


def _gflops(fn: Callable[[int], object], n: int, seconds: float) -> float:
    t = time_calls(fn, 1, warmup=1, min_runs=2, min_seconds=seconds)  # the one timer
    return 2.0 * n**3 / (t.mean_ms / 1e3) / 1e9


def numpy_matmul_peak(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of numpy's matmul on ``threads`` BLAS threads (measured in a child process:
    BLAS libraries read their thread count when they start)."""
    env = {**os.environ, **{v: str(threads) for v in BLAS_THREAD_VARS}}
    code = f"from cddrec.benchmarks.roofline import _numpy_here; print(_numpy_here({n}, {seconds}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120 + 10 * seconds)
    if proc.returncode != 0:
        raise RuntimeError(f"the numpy matmul peak failed: {proc.stderr.strip()[-300:]}")
    return float(proc.stdout.split()[-1])


def _numpy_here(n: int, seconds: float) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)  # (n, n)
    b = rng.standard_normal((n, n), dtype=np.float32)  # (n, n)
    c = np.empty((n, n), dtype=np.float32)  # (n, n)
    return _gflops(lambda i: np.matmul(a, b, out=c), n, seconds)


def ort_matmul_peak(precision: str, threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """GFLOP/s (int8: GOP/s) of ONNX Runtime's CPU matmul at ``precision`` ("int8" | "fp16"), opened
    by the one session factory with ``threads`` intra-op threads."""
    from cddrec.runtime.session import ort_session

    rng = np.random.default_rng(0)
    if precision == "int8":
        a = rng.integers(0, 256, size=(n, n), dtype=np.uint8)  # (n, n) activations, as DynamicQuantizeLinear makes
        b = rng.integers(-127, 128, size=(n, n), dtype=np.int8)  # (n, n) weights, symmetric int8
    else:
        a = rng.standard_normal((n, n)).astype(np.float16)  # (n, n)
        b = rng.standard_normal((n, n)).astype(np.float16)  # (n, n)
    with tempfile.TemporaryDirectory(prefix="cddrec-peak-") as tmp:
        path = Path(tmp) / f"matmul_{precision}.onnx"
        path.write_bytes(base64.b64decode(PEAK_GRAPHS[precision]))
        sess = ort_session(path, threads=threads)
    feed = {"a": a, "b": b}
    return _gflops(lambda i: sess.run(None, feed), n, seconds)


def cuda_matmul_peak(precision: str = "fp32", n: int = 8192, seconds: float = 0.5, device: str = "cuda") -> float:
    """Dense matmul GFLOP/s on the GPU at ``precision`` ("fp32" with TF32 off, "tf32", "fp16"), timed by
    CUDA events (no host clock, no launch gaps in the window); the TF32 switch is put back."""
    import torch

    if precision not in PRECISIONS["cuda"]:
        raise ValueError(f"the cuda peak is measured at {', '.join(PRECISIONS['cuda'])}, not {precision!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU matmul peak needs a CUDA GPU (torch.cuda.is_available() is False)")
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")  # torch >= 2.9; the old allow_tf32 must not be mixed with it
    saved = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    else:
        matmul.allow_tf32 = precision == "tf32"
    try:
        dtype = torch.float16 if precision == "fp16" else torch.float32
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)  # (n, n)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)  # (n, n)
        c = torch.empty(n, n, device=device, dtype=dtype)  # (n, n)
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


def cpu_int8_features(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """Whether this CPU has VNNI (the int8 dot products ONNX Runtime's int8 kernels use), from the
    flags in ``cpuinfo``: ``{"vnni": bool | None, "int8_flags": [...]}`` (None: flags unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {"vnni": None, "int8_flags": [], "source": str(cpuinfo)}
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    present = sorted(f for f in INT8_DOT_FLAGS if f in flags)
    return {"vnni": any(f in flags for f in VNNI_FLAGS), "int8_flags": present, "source": str(cpuinfo)}


# ------------------------------------------------------------------------ precision
@dataclass(frozen=True)
class GraphPrecision:
    """The precision of each kind of MatMul in a graph (``cddrec.flops.flops_by_operand``)."""

    weights: str = "fp32"
    attention: str = "fp32"
    scoring: str = "fp32"

    def parts(self) -> dict[str, str]:
        return {"weights": self.weights, "attention": self.attention, "scoring": self.scoring}

    @property
    def label(self) -> str:
        """"fp32", "fp16", or the mix, lowest precision first: "int8+fp32"."""
        order = ("int8", "fp16", "tf32", "fp32")
        return "+".join(sorted(set(self.parts().values()), key=lambda p: order.index(p) if p in order else 9))

    @property
    def detail(self) -> str:
        """"fp32", or which MatMuls run at which precision: "int8 weights, fp32 attention and scoring"."""
        kinds = set(self.parts().values())
        if len(kinds) == 1:
            return kinds.pop()
        by: dict[str, list[str]] = {}
        for part, precision in self.parts().items():
            by.setdefault(precision, []).append(part)
        return ", ".join(f"{p} {' and '.join(parts)}" for p, parts in by.items())


def export_settings(contract) -> dict:
    """The export settings a graph's metadata records ({} for graphs without them)."""
    raw = contract.extra.get("export_settings")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return {}
    return raw if isinstance(raw, dict) else {}


def precision_of(contract, device: str = "cpu", tf32: bool = False) -> GraphPrecision:
    """The precision of a graph's MatMuls from its contract (``cddrec.contract.GraphContract``):
    fp16 from ``contract.fp16``; int8 from the export settings in its metadata (``int8``: weight
    MatMuls; ``int8_scoring`` or ``rescore``: the scoring pass). An approximate graph
    (``min_overlap``) without export settings is taken as int8 weights, the best case. ``tf32``:
    the backend runs fp32 MatMuls on TF32 tensor cores (CUDA only)."""
    if contract.fp16:
        float_precision = "fp16"
    else:
        float_precision = "tf32" if tf32 and device == "cuda" else "fp32"
    settings = export_settings(contract)
    if settings:
        int8_weights = bool(settings.get("int8"))
        int8_scoring = bool(settings.get("int8_scoring") or settings.get("rescore"))
    else:
        int8_weights, int8_scoring = contract.min_overlap is not None, False
    return GraphPrecision(weights="int8" if int8_weights else float_precision, attention=float_precision,
                          scoring="int8" if int8_scoring else float_precision)


# ------------------------------------------------------------------------- roofline
@dataclass
class Roofline:
    """A backend's best case: its device, its graph's precision, the peaks it is held against."""

    device: str
    precision: GraphPrecision
    threads: int
    peaks: dict  # precision -> the measured ``Peak``
    users_per_s: float | None  # None when a peak it needs cannot be measured here (``unavailable``)
    unavailable: str | None = None

    def as_dict(self) -> dict:
        return {"device": self.device, "precision": self.precision.label, "precisions": self.precision.parts(),
                "threads": self.threads,
                "peaks_gflops": {p: peak.gflops for p, peak in self.peaks.items()}, "users_per_s": self.users_per_s,
                **({"unavailable": self.unavailable} if self.unavailable else {})}


def roofline_users_per_s(flops: dict[str, float], precision: GraphPrecision, peaks: dict[str, float]) -> float:
    """Best-case users/s: 1 / sum over operand kinds of FLOPs / peak at that kind's precision
    (``flops``: ``flops_by_operand``; ``peaks``: precision -> GFLOP/s). One precision: peak / total FLOPs."""
    seconds = sum(flops[part] / (peaks[p] * 1e9) for part, p in precision.parts().items() if flops[part])
    return 1.0 / seconds


def roofline_for(flops: dict[str, float], precision: GraphPrecision, device: str, threads: int = 0,
                 peak: Callable[..., Peak] = matmul_peak, **peak_options) -> Roofline:
    """The roofline of a graph of ``precision`` on ``device``: measures (or reuses) the peaks it needs."""
    device = "cuda" if device.startswith("cuda") else device
    threads = 0 if device == "cuda" else (threads or os.cpu_count() or 1)
    peaks: dict[str, Peak] = {}
    try:
        for p in sorted(set(precision.parts().values())):
            peaks[p] = peak(device, p, threads, **peak_options)
    except (ValueError, RuntimeError, ImportError) as e:  # e.g. int8 on CUDA, or no torch for the GPU peak
        return Roofline(device, precision, threads, peaks, None, f"{type(e).__name__}: {e}")
    gflops = {p: float(v.gflops) for p, v in peaks.items()}
    return Roofline(device, precision, threads, peaks, roofline_users_per_s(flops, precision, gflops))
