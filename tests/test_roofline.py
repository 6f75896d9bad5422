"""Which matmul peak a backend's floor comes from, and the GPU peak itself (gpu-marked)."""

from __future__ import annotations

import pytest
import torch

from cddrec.benchmarks.gpu_floor import Floor, floor_for, gpu_matmul_peak


class Peaks:
    """Distinct peaks per device and precision, recording which were measured."""

    def __init__(self):
        self.calls: list[str] = []

    def cpu(self) -> float:
        self.calls.append("cpu")
        return 100.0

    def gpu(self, dtype: str) -> float:
        self.calls.append(dtype)
        return {"fp32": 50_000.0, "tf32": 400_000.0, "fp16": 800_000.0}[dtype]


@pytest.mark.parametrize("backend, kwargs, want", [
    ("ort-cpu", {}, ("cpu", "fp32", 100.0)),
    ("torch", {}, ("cpu", "fp32", 100.0)),
    ("torch-compile", {"fp16": True}, ("cpu", "fp32", 100.0)),  # fp16 means nothing for the CPU floor
    ("ort-cuda", {}, ("cuda", "fp32", 50_000.0)),
    ("ort-cuda", {"tf32": True}, ("cuda", "tf32", 400_000.0)),
    ("ort-cuda", {"fp16": True, "tf32": True}, ("cuda", "fp16", 800_000.0)),  # fp16 graph: fp16 peak
    ("trt", {}, ("cuda", "fp32", 50_000.0)),
    ("trt", {"fp16": True}, ("cuda", "fp16", 800_000.0)),
    ("torch-cuda", {"tf32": True}, ("cuda", "tf32", 400_000.0)),
    ("torch", {"device": "cuda"}, ("cuda", "fp32", 50_000.0)),
    ("torch-compile", {"device": "cuda:0", "fp16": True}, ("cuda", "fp16", 800_000.0)),
])
def test_floor_selection(backend, kwargs, want):
    peaks = Peaks()
    floor = floor_for(backend, cpu_peak=peaks.cpu, gpu_peak=peaks.gpu, **kwargs)
    assert (floor.device, floor.precision, floor.gflops) == want
    assert peaks.calls == (["cpu"] if want[0] == "cpu" else [want[1]])  # only the needed peak is measured


def test_floor_users_and_bad_input():
    assert Floor("cuda", "fp32", 2_000.0).users_per_s(4e6) == pytest.approx(500_000.0)
    peaks = Peaks()
    with pytest.raises(ValueError, match="device must be"):
        floor_for("torch", cpu_peak=peaks.cpu, gpu_peak=peaks.gpu, device="mps")
    with pytest.raises(ValueError, match="dtype must be one of"):
        gpu_matmul_peak("bf16")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            gpu_matmul_peak("fp32", n=64)


@pytest.mark.gpu
def test_gpu_matmul_peak_measured():
    m = torch.backends.cuda.matmul
    setting = lambda: m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32
    before = setting()
    fp32, tf32, fp16 = (gpu_matmul_peak(d, n=4096, seconds=0.2) for d in ("fp32", "tf32", "fp16"))
    assert 0 < fp32 < tf32 and fp32 < fp16  # tensor cores beat plain fp32 on any TF32-capable GPU
    assert setting() == before  # the TF32 switch is put back
