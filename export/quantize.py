"""The int8 graph: dynamic quantization of the MatMuls with ONNX Runtime's quantization tools.

``quantize_graph`` takes the validated fp32 graph (standard ops), runs ONNX Runtime's
pre-processing (basic graph optimization, which removes the Identity nodes that hide shared
weights from the quantizer), then ``quantize_dynamic``: every MatMul with a constant weight
gets int8 weights (per tensor, symmetric) and activations quantized to uint8 at run time
(DynamicQuantizeLinear + MatMulInteger, which ONNX Runtime's CPU provider fuses and runs with
VNNI where the CPU has it); the shapes the pre-processing inferred are dropped again (see
``quantize_graph``). MatMuls of two activations (the attention products) stay fp32. The
scoring MatMul against the item table stays fp32 unless ``quantize_scoring``: the ranking is
where int8 error shows first.

int8 is not exact, so the graph is checked against the fp32 reference in the same form as the
fp32 graph, with a declared looser tolerance: the mean top-k overlap with the reference on
fresh random histories must reach ``cddrec.contract.APPROX_MIN_OVERLAP`` (reported with the max score difference).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx


def scoring_matmuls(model: onnx.ModelProto, num_rows: int) -> list[str]:
    """Names of the scoring nodes: MatMul or Gemm whose constant weight has the item table's rows (V)
    as an axis (the exporter scores with Gemm(transB=1) on the table itself: one table per graph)."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and num_rows in shapes.get(n.input[1], ())]


def untie_scoring(model: onnx.ModelProto, names: list[str]) -> None:
    """In place: each scoring Gemm(x, W, transB=1) becomes MatMul(x, W^T) on its own copy of the
    table, which dynamic quantization can store in int8 (it quantizes MatMul, not Gemm)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name in names and node.op_type == "Gemm" and len(node.input) == 2:
            w = numpy_helper.to_array(inits[node.input[1]])
            copy = numpy_helper.from_array(np.ascontiguousarray(w.T), node.input[1] + "_scoring_t")  # (d, V)
            model.graph.initializer.append(copy)
            node.op_type, node.input[1] = "MatMul", copy.name
            del node.attribute[:]


def quantize_graph(src: str | Path, dst: str | Path, num_rows: int, quantize_scoring: bool = False) -> dict:
    """Write the dynamically quantized ``src`` to ``dst``; returns what was quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="cddrec-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        proto = onnx.load(str(pre))
        scoring = scoring_matmuls(proto, num_rows)
        exclude = [] if quantize_scoring else scoring
        if quantize_scoring:
            untie_scoring(proto, scoring)
            onnx.save(proto, str(pre))
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
    q = onnx.load(str(dst))
    # the inferred shapes the pre-processing stored let ONNX Runtime's CPU provider fuse Add +
    # LayerNorm into SkipLayerNormalization, which measured slower here (benchmarks/results/fusion.md)
    del q.graph.value_info[:]
    onnx.save(q, str(dst))
    quantized = sum(n.op_type == "MatMulInteger" for n in q.graph.node)
    return {"matmuls_int8": quantized, "matmuls_fp32": sum(n.op_type == "MatMul" for n in q.graph.node),
            "scoring_int8": quantize_scoring, "excluded": exclude}

