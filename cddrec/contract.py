"""The graph contract: what an exported recommender graph takes, returns and declares (torch-free).

One object, as optimum's ``OnnxConfig``: input and output names, dtypes and dynamic axes, K, T,
d, L, the number of items, the opset, the parity tolerance and the graph's metadata with a format
version. The exporter builds to it (``cddrec.export``), validation checks against it, TensorRT
reads its profile from it, and serving (``cddrec.runtime``) reads every graph through
``GraphContract.from_metadata``, so the three never disagree on a name or a meaning.

The graph: ``item_ids`` int64 (batch, history), left-padded with 0, history >= 1; the last L
items feed the model and all of them are excluded from the ranking, with the padding row and the
mask token. The stochastic graph also takes ``noise`` float32 (T, batch, d). Outputs
``top_items`` int64 (batch, K) and ``top_scores`` float32 (batch, K), best first, and
``user_embedding`` float32 (batch, d). Excluded items score ``MASK_SCORE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFileError
from .vocab import Vocab

GRAPH_FORMAT_VERSION = 2  # 2: parity tolerance declared in the metadata (rtol, atol)
READABLE_FORMAT_VERSIONS = (1, 2)
DEFAULT_OPSET = 17
MIN_OPSET = 14  # the causal mask (Trilu) needs opset 14; the dynamo exporter writes 18 or newer
DYNAMO_MIN_OPSET = 18
DEFAULT_K = 10  # items per user when nobody says otherwise
MASK_SCORE = -30000.0  # excluded items: large, finite and fp16-representable, so TopK never sees -inf or NaN
TRT_MAX_K = 3840  # TensorRT's TopK limit
MAX_HISTORY = 512  # longest history a TensorRT profile covers (ONNX Runtime takes any length)
VOCAB_INLINE_MAX = 200_000  # larger vocabularies go to a sidecar GRAPH.vocab.json
APPROX_MIN_OVERLAP = 0.8  # approximate graphs (int8, two-stage top-k): least mean top-k overlap with the reference
POPULAR_TOPK = 100  # popularity fallback entries stored with a graph (at least K)
# the steps are unrolled and random numbers come in as inputs: none of these may appear in a graph
FORBIDDEN_OPS = ("Loop", "Scan", "If", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                 "Multinomial", "Bernoulli", "Dropout")

KINDS = ("deterministic", "stochastic")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints, or axis names for dynamic axes


@dataclass(frozen=True)
class GraphContract:
    k: int  # K, items returned per user
    steps: int  # T, unrolled denoising steps (0 without a decoder)
    hidden: int  # d
    max_len: int  # L, history items that feed the model
    num_items: int  # N, item ids 1..N
    stochastic: bool = False
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    validate_batches: tuple[int, ...] = (1, 7, 64)
    min_overlap: float | None = None  # approximate graphs: validated by mean top-k overlap, not by score tolerance
    rtol: float | None = None  # None: the default of the precision (``tolerance``)
    atol: float | None = None
    gpu_rtol: float | None = None  # None: the default of the precision on CUDA (``tolerance_on("cuda")``)
    gpu_atol: float | None = None
    extra: dict = field(default_factory=dict, compare=False)  # other metadata (vocab, config, ...)

    def __post_init__(self) -> None:
        for name in ("k", "hidden", "max_len", "num_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"graph contract: {name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"graph contract: steps must be >= 0, got {self.steps}")
        if self.k > self.num_items:
            raise ValueError(f"graph contract: K={self.k} exceeds the number of items ({self.num_items})")

    # ------------------------------------------------------------------ tensors
    @property
    def kind(self) -> str:
        return "stochastic" if self.stochastic else "deterministic"

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        ins = [TensorSpec("item_ids", "int64", ("batch", "history"))]
        if self.stochastic:
            ins.append(TensorSpec("noise", "float32", (self.steps, "batch", self.hidden)))
        return tuple(ins)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("top_items", "int64", ("batch", self.k)),
                TensorSpec("top_scores", "float32", ("batch", self.k)),
                TensorSpec("user_embedding", "float32", ("batch", self.hidden)))

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

    # ---------------------------------------------------------------- tolerance
    @property
    def tolerance(self) -> tuple[float, float]:
        """(rtol, atol): a score passes when |score - reference| <= atol + rtol * scale, where scale is
        the largest |reference score| of the batch (fp16 errors grow with the scale of the scores)."""
        rtol, atol = (2e-2, 2e-2) if self.fp16 else (1e-5, 1e-4)
        return (self.rtol if self.rtol is not None else rtol, self.atol if self.atol is not None else atol)

    def tolerance_on(self, device: str = "cpu") -> tuple[float, float]:
        """(rtol, atol) of the graph run on ``device`` against the fp32 PyTorch reference on the CPU.

        CUDA (ONNX Runtime's CUDA provider, TF32 off) sums in another order than the CPU, so fp32
        declares a looser bound there: 1e-4 relative, 5e-4 absolute; fp16 keeps its own 2e-2. TF32
        is opt-in serving and is not validated against this bound."""
        if device == "cpu":
            return self.tolerance
        if device != "cuda":
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        rtol, atol = self.tolerance
        g_rtol, g_atol = max(rtol, 1e-4), max(atol, 5e-4)
        return (self.gpu_rtol if self.gpu_rtol is not None else g_rtol,
                self.gpu_atol if self.gpu_atol is not None else g_atol)

    def check_k(self, k: int | None) -> int:
        """``k`` items per user, at most the graph's K (None: K); a graph of every item (K = N) serves
        any larger k with all N."""
        if k is None:
            return self.k
        if k < 1:
            raise ValueError(f"k={k}: the number of items per user must be at least 1")
        if k > self.k == self.num_items:  # the graph already returns every item: that is all there is
            return self.k
        if not 1 <= k <= self.k:
            raise ValueError(f"k={k}: this graph returns at most K={self.k} items; re-export with cddrec-export --k {k}")
        return k

    # ----------------------------------------------------------------- metadata
    def to_metadata(self) -> dict[str, str]:
        """The contract as ONNX metadata_props (string values)."""
        rtol, atol = self.tolerance
        g_rtol, g_atol = self.tolerance_on("cuda")
        meta = {"cddrec_format_version": str(GRAPH_FORMAT_VERSION), "graph_kind": self.kind,
                "T": str(self.steps), "K": str(self.k), "d": str(self.hidden), "L": str(self.max_len),
                "num_items": str(self.num_items), "opset": str(self.opset), "fp16": json.dumps(self.fp16),
                "tolerance": json.dumps({"rtol": rtol, "atol": atol}),
                "tolerance_cuda": json.dumps({"rtol": g_rtol, "atol": g_atol}),
                **({"min_overlap": json.dumps(self.min_overlap)} if self.min_overlap is not None else {}),
                "inputs": json.dumps({t.name: [t.dtype, list(t.shape)] for t in self.inputs})}
        for key, value in self.extra.items():
            meta[key] = value if isinstance(value, str) else json.dumps(value)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str | Path = "graph") -> "GraphContract":
        """Read and check a graph's metadata; a ``ModelFileError`` naming ``source`` otherwise."""
        if "cddrec_format_version" not in meta:
            raise ModelFileError(f"{source}: not a cddrec export (no cddrec metadata); export a model with cddrec-export")
        try:
            version = int(meta["cddrec_format_version"])
        except ValueError:
            version = -1
        if version not in READABLE_FORMAT_VERSIONS:
            raise ModelFileError(f"{source}: graph format version {meta['cddrec_format_version']!r}; this cddrec reads "
                                 f"versions {list(READABLE_FORMAT_VERSIONS)}: re-export the model")

        def integer(key: str, minimum: int) -> int:
            if key not in meta:
                raise ModelFileError(f"{source}: cddrec metadata has no {key!r} entry")
            try:
                value = int(meta[key])
            except (TypeError, ValueError):
                raise ModelFileError(f"{source}: metadata {key!r} must be an integer, got {meta[key]!r}") from None
            if value < minimum:
                raise ModelFileError(f"{source}: metadata {key!r} must be >= {minimum}, got {value}")
            return value

        kind = meta.get("graph_kind", "deterministic")
        if kind not in KINDS:
            raise ModelFileError(f"{source}: metadata graph_kind must be one of {KINDS}, got {kind!r}")
        tol = _json(meta, "tolerance", source, {}) or {}
        tol_cuda = _json(meta, "tolerance_cuda", source, {}) or {}  # absent in graphs exported before it
        known = {"cddrec_format_version", "graph_kind", "T", "K", "d", "L", "num_items", "opset", "fp16",
                 "tolerance", "tolerance_cuda", "min_overlap", "inputs"}
        try:
            return cls(k=integer("K", 1), steps=integer("T", 0), hidden=integer("d", 1), max_len=integer("L", 1),
                       num_items=integer("num_items", 1), stochastic=kind == "stochastic",
                       fp16=bool(_json(meta, "fp16", source, False)),
                       opset=integer("opset", 1) if "opset" in meta else DEFAULT_OPSET,
                       rtol=tol.get("rtol"), atol=tol.get("atol"),
                       gpu_rtol=tol_cuda.get("rtol"), gpu_atol=tol_cuda.get("atol"),
                       min_overlap=_json(meta, "min_overlap", source, None),
                       extra={k: v for k, v in meta.items() if k not in known})
        except ValueError as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(f"{source}: inconsistent cddrec metadata: {e}") from None


def _json(meta: dict[str, str], key: str, source, default: Any) -> Any:
    if key not in meta:
        return default
    value = meta[key]
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{source}: metadata {key!r} is not valid JSON ({e.msg})") from None


@dataclass
class ServingInfo:
    """What serving needs beside the graph: the contract, the vocabulary and the popularity fallback."""

    contract: GraphContract
    vocab: Vocab
    popular: list  # [[item key, training count], ...], most popular first

    @property
    def K(self) -> int:  # noqa: N802 - the paper's letter
        return self.contract.k

    @property
    def L(self) -> int:  # noqa: N802
        return self.contract.max_len


def serving_info(meta: dict[str, str], source: str | Path) -> ServingInfo:
    """Contract, vocabulary (inline or the sidecar beside ``source``) and popularity of a graph's metadata."""
    contract = GraphContract.from_metadata(meta, source)
    source = Path(source)
    if "vocab" in meta:
        vocab_doc = _json(meta, "vocab", source, None)
    elif "vocab_file" in meta:
        side = source.parent / meta["vocab_file"]
        if not side.exists():
            raise ModelFileError(f"{source}: its item vocabulary {side} is missing (keep it beside the graph)")
        try:
            vocab_doc = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{side}: not a readable vocabulary file ({e})") from None
    else:
        raise ModelFileError(f"{source}: cddrec metadata has no item vocabulary")
    try:
        vocab = Vocab.from_dict(vocab_doc)
    except (KeyError, TypeError, AttributeError):
        raise ModelFileError(f"{source}: the item vocabulary is not {{'keys': [...], 'key_type': ...}}") from None
    if len(vocab) != contract.num_items:
        raise ModelFileError(f"{source}: the vocabulary has {len(vocab)} keys but the graph scores "
                             f"{contract.num_items} items")
    popular = _json(meta, "popular_topk", source, [])
    if not isinstance(popular, list) or not all(isinstance(p, list) and len(p) == 2 for p in popular):
        raise ModelFileError(f"{source}: metadata 'popular_topk' must be a list of [item key, count] pairs")
    if len(popular) < min(contract.k, contract.num_items):
        raise ModelFileError(f"{source}: metadata 'popular_topk' has {len(popular)} entries, fewer than K={contract.k}; "
                             "re-export the model")
    return ServingInfo(contract, vocab, popular)
