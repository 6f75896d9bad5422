"""Declared specs of the exported graphs: names, dtypes, dynamic axes, opset, tolerance.

One spec per graph kind, as optimum's OnnxConfig: the builder exports to the spec and the
validator checks the file against the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GRAPH_FORMAT_VERSION = 1
DEFAULT_OPSET = 17
TRT_MAX_K = 3840  # TensorRT's TopK limit
MAX_HISTORY = 512  # longest history a request passes (most recent items); TensorRT profiles cover it


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints, or axis names for dynamic axes


@dataclass(frozen=True)
class GraphSpec:
    kind: str  # "deterministic" | "stochastic"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = DEFAULT_OPSET
    atol: float = 1e-4  # max |score - reference score| accepted by validation (fp32)
    fp16: bool = False
    validate_batches: tuple[int, ...] = (1, 7, 64)
    forbidden_ops: tuple[str, ...] = field(default=("Loop", "Scan", "If"))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)}
                for t in self.inputs + self.outputs}


def graph_spec(*, k: int, d: int, steps: int, stochastic: bool = False, fp16: bool = False,
               opset: int = DEFAULT_OPSET) -> GraphSpec:
    """The spec of a recommender graph.

    item_ids (batch, history) int64: left-padded histories, history >= 1; the last L items feed
    the model, all of them are excluded from the ranking. noise (T, batch, d) float32 for the
    stochastic graph. Outputs top_items (batch, K) int64 and top_scores (batch, K) float32, best
    first, and user_embedding (batch, d) float32.
    """
    inputs = [TensorSpec("item_ids", "int64", ("batch", "history"))]
    if stochastic:
        inputs.append(TensorSpec("noise", "float32", (steps, "batch", d)))
    outputs = (TensorSpec("top_items", "int64", ("batch", k)),
               TensorSpec("top_scores", "float32", ("batch", k)),
               TensorSpec("user_embedding", "float32", ("batch", d)))
    # random ops are nondeterministic in ONNX Runtime and TensorRT: never in any graph
    forbidden = ("Loop", "Scan", "If", "RandomNormal", "RandomNormalLike", "RandomUniform",
                 "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout")
    return GraphSpec(kind="stochastic" if stochastic else "deterministic", inputs=tuple(inputs),
                     outputs=outputs, opset=opset, atol=2e-2 if fp16 else 1e-4, fp16=fp16,
                     forbidden_ops=forbidden)
