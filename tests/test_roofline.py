"""The roofline: one peak measurement per device and precision, the precision a backend is held
against (from its graph's contract, never its name), and the FLOP split it divides by."""

from __future__ import annotations

import base64
import json

import pytest

from cddrec.benchmarks.latency import served_precision
from cddrec.benchmarks.roofline import (
    PEAK_GRAPHS,
    GraphPrecision,
    Peak,
    cpu_int8_features,
    cuda_matmul_peak,
    matmul_peak,
    precision_of,
    roofline_for,
    roofline_users_per_s,
)
from cddrec.config import ModelConfig
from cddrec.contract import GraphContract
from cddrec.flops import flops_by_operand, flops_per_user

PAPER = ModelConfig(num_items=12101)  # d=128, L=20, T=20


def contract(**kw) -> GraphContract:
    """A contract as serving reads it: through the graph's metadata strings."""
    extra = {"export_settings": kw.pop("settings")} if "settings" in kw else {}
    c = GraphContract(k=10, steps=4, hidden=16, max_len=8, num_items=50, extra=extra, **kw)
    return GraphContract.from_metadata(c.to_metadata())


class Peaks:
    """Distinct peaks per device and precision, recording which were asked for."""

    GFLOPS = {("cpu", "fp32"): 100.0, ("cpu", "int8"): 400.0, ("cpu", "fp16"): 50.0, ("cuda", "fp32"): 50_000.0,
              ("cuda", "tf32"): 400_000.0, ("cuda", "fp16"): 800_000.0}

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, device, precision, threads, **kw) -> Peak:
        self.calls.append((device, precision, threads))
        if (device, precision) not in self.GFLOPS:
            raise ValueError(f"no {device} {precision} peak")
        return Peak(device, precision, self.GFLOPS[device, precision], "fake", threads)


# ------------------------------------------------------------------------------ FLOPs
def test_flops_by_operand_splits_the_graph_count():
    for cfg in (PAPER, PAPER.replace(decoder=False), PAPER.replace(num_layers=2, steps=3)):
        parts = flops_by_operand(cfg)
        assert sum(parts.values()) == pytest.approx(flops_per_user(cfg)["total"])
    d, L, T = 128, 20, 20
    assert flops_by_operand(PAPER)["attention"] == L * 4 * L * d + T * 4 * L * d
    assert flops_by_operand(PAPER.replace(decoder=False))["weights"] == L * 24 * d * d


# ------------------------------------------------------------------------------ peaks
def test_cpu_fp32_peak_is_measured_with_numpy():
    p = matmul_peak("cpu", "fp32", 1, n=128, seconds=0.05)
    assert p.gflops > 0 and "numpy" in p.method and p.threads == 1


def test_cpu_int8_peak_is_measured_with_onnxruntime():
    p = matmul_peak("cpu", "int8", 1, n=128, seconds=0.05)
    assert p.gflops > 0 and "MatMulInteger" in p.method and "onnxruntime" in p.method


def test_peak_graphs_are_what_they_say():
    """The embedded graphs (a serving install has no onnx package) are one MatMulInteger (uint8 x int8
    -> int32) and one fp16 MatMul, as onnx.helper builds them."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper

    for precision, op, (ta, tb, ty) in (("int8", "MatMulInteger", (T.UINT8, T.INT8, T.INT32)),
                                        ("fp16", "MatMul", (T.FLOAT16, T.FLOAT16, T.FLOAT16))):
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "peak",
                                  [helper.make_tensor_value_info("a", ta, ["m", "k"]),
                                   helper.make_tensor_value_info("b", tb, ["k", "n"])],
                                  [helper.make_tensor_value_info("y", ty, ["m", "n"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                                  producer_name="cddrec-roofline")
        embedded = onnx.load_from_string(base64.b64decode(PEAK_GRAPHS[precision]))
        onnx.checker.check_model(embedded)
        assert embedded == model


def test_cpu_int8_features_read_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert cpu_int8_features(info) == {"vnni": True, "int8_flags": ["avx512_vnni"], "source": str(info)}
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_int8_features(info)["vnni"] is False
    assert cpu_int8_features(tmp_path / "missing")["vnni"] is None


def test_peak_bad_input():
    with pytest.raises(ValueError, match="device must be"):
        matmul_peak("mps", "fp32")
    with pytest.raises(ValueError, match="measured at"):
        matmul_peak("cpu", "tf32")
    with pytest.raises(ValueError, match="measured at"):
        cuda_matmul_peak("bf16")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            cuda_matmul_peak("fp32", n=64)


# --------------------------------------------------------------------- precision
@pytest.mark.parametrize("kw, device, tf32, want", [
    ({}, "cpu", False, ("fp32", "fp32", "fp32")),
    ({"fp16": True}, "cuda", True, ("fp16", "fp16", "fp16")),  # an fp16 graph: fp16, TF32 or not
    ({}, "cuda", True, ("tf32", "tf32", "tf32")),
    ({}, "cpu", True, ("fp32", "fp32", "fp32")),  # TF32 means nothing on the CPU
    ({"settings": {"int8": True, "int8_scoring": False}, "min_overlap": 0.8}, "cpu", False, ("int8", "fp32", "fp32")),
    ({"settings": {"int8": True, "int8_scoring": True}, "min_overlap": 0.8}, "cpu", False, ("int8", "fp32", "int8")),
    ({"settings": {"int8": False, "rescore": 100}, "min_overlap": 0.8}, "cpu", False, ("fp32", "fp32", "int8")),
    ({"settings": {"int8": False, "optimize": True}}, "cpu", False, ("fp32", "fp32", "fp32")),
    ({"min_overlap": 0.8}, "cpu", False, ("int8", "fp32", "fp32")),  # approximate, no settings: the best case
])
def test_precision_comes_from_the_contract(kw, device, tf32, want):
    p = precision_of(contract(**kw), device, tf32=tf32)
    assert (p.weights, p.attention, p.scoring) == want


def test_a_backend_is_held_against_its_contract_not_its_name():
    class Loaded:  # what a loaded backend offers: a name, a device, a contract
        def __init__(self, name, device, c):
            self.name, self.device, self.contract = name, device, c

    assert served_precision(Loaded("ort-cuda-fp16", "cpu", contract()))[1].label == "fp32"
    assert served_precision(Loaded("ort-cpu", "cuda:0", contract(fp16=True))) == ("cuda", GraphPrecision("fp16", "fp16",
                                                                                                        "fp16"))
    tf32 = Loaded("ort-cuda", "cuda", contract())
    tf32.session_kwargs = {"tf32": True}  # ONNX Runtime's CUDA provider with TF32 on (OrtBackend's option)
    assert served_precision(tf32)[1].label == "tf32"
    int8 = contract(settings={"int8": True}, min_overlap=0.8)
    assert served_precision(Loaded("ort-cpu", "cpu", int8))[1].label == "int8+fp32"


def test_served_precision_of_a_real_graph(trained_tiny_onnx):
    from cddrec.runtime.backends import load_backend

    with load_backend(trained_tiny_onnx, "ort-cpu", threads=1) as be:
        assert served_precision(be) == ("cpu", GraphPrecision())
        assert json.loads(be.contract.extra["export_settings"])["int8"] is False


# ---------------------------------------------------------------------- roofline
def test_roofline_uses_the_peak_of_each_part():
    flops = flops_by_operand(PAPER)
    peaks = Peaks()
    fp32 = roofline_for(flops, GraphPrecision(), "cpu", 2, peak=peaks)
    assert fp32.users_per_s == pytest.approx(100e9 / flops_per_user(PAPER)["total"]) and peaks.calls == [("cpu", "fp32", 2)]
    mixed = roofline_for(flops, GraphPrecision(weights="int8"), "cpu", 2, peak=peaks)
    want = 1 / (flops["weights"] / 400e9 + (flops["attention"] + flops["scoring"]) / 100e9)
    assert mixed.users_per_s == pytest.approx(want) and mixed.users_per_s > fp32.users_per_s
    assert mixed.as_dict()["peaks_gflops"] == {"fp32": 100.0, "int8": 400.0}
    half = roofline_for(flops, GraphPrecision("fp16", "fp16", "fp16"), "cuda:0", 2, peak=peaks)
    assert half.device == "cuda" and half.threads == 0 and peaks.calls[-1] == ("cuda", "fp16", 0)
    assert half.users_per_s == pytest.approx(roofline_users_per_s(flops, half.precision, {"fp16": 800_000.0}))
    none = roofline_for(flops, GraphPrecision(weights="int8"), "cuda", peak=peaks)  # no int8 peak on CUDA
    assert none.users_per_s is None and "no cuda int8 peak" in none.unavailable


@pytest.mark.gpu
def test_gpu_matmul_peak_measured():
    import torch

    m = torch.backends.cuda.matmul
    setting = lambda: m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32
    before = setting()
    fp32, tf32, fp16 = (cuda_matmul_peak(d, n=4096, seconds=0.2) for d in ("fp32", "tf32", "fp16"))
    assert 0 < fp32 < tf32 and fp32 < fp16  # tensor cores beat plain fp32 on any TF32-capable GPU
    assert setting() == before  # the TF32 switch is put back
    assert matmul_peak("cuda", "fp16", n=2048, seconds=0.1).gflops > 0
