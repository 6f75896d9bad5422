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

Early exit (``cddrec-export --steps S``): the graph runs the first S of the T reverse steps and
serves the state x_hat_{T-S}; the metadata records S (``steps_run``, key ``"S"``; graphs without
it run all T), validation compares it with the S-step PyTorch reference, and its noise input keeps
the T-step shape (only the steps run read it).
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
# what each static axis of the tensors is, for messages
_SIZE_LETTERS = {("top_items", 1): "K", ("top_scores", 1): "K", ("user_embedding", 1): "d", ("noise", 0): "T",
                 ("noise", 2): "d"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints, or axis names for dynamic axes


@dataclass(frozen=True)
class GraphContract:
    k: int  # K, items returned per user
    steps: int  # T, denoising steps of the model (0 without a decoder)
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
    steps_run: int | None = None  # S, reverse steps the graph unrolls (early exit, 1..T); None: all T
    extra: dict = field(default_factory=dict, compare=False)  # other metadata (vocab, config, ...)

    def __post_init__(self) -> None:
        for name in ("k", "hidden", "max_len", "num_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"graph contract: {name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"graph contract: steps must be >= 0, got {self.steps}")
        if self.steps_run is None:
            object.__setattr__(self, "steps_run", self.steps)  # all T: the default graph
        elif not (self.steps_run == self.steps == 0 or 1 <= self.steps_run <= self.steps):
            raise ValueError(f"graph contract: the graph runs S={self.steps_run} reverse steps; S must be between 1 "
                             f"and T={self.steps}" + (" (this model has no decoder)" if not self.steps else ""))
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

    def parity_rule(self, device: str = "cpu") -> dict:
        """The verdict options of this graph on ``device`` for ``cddrec.parity.compare_runners``:
        ``rtol``/``atol`` (``tolerance_on``), ``min_overlap`` (approximate graphs are judged by
        top-k overlap) and ``exact_ids`` (an fp16 graph is judged by its scores: ids that swap within
        twice the tolerance are not errors)."""
        rtol, atol = self.tolerance_on(device)
        return {"rtol": rtol, "atol": atol, "min_overlap": self.min_overlap, "exact_ids": not self.fp16}

    def io_problems(self, inputs: list[tuple], outputs: list[tuple], *, axis_names: bool = True,
                    exact_sizes: bool = True) -> list[str]:
        """What differs between a graph's declared inputs/outputs and the contract's, one phrase each
        (empty: they agree). ``inputs``/``outputs``: ``[(name, dtype, shape)]`` as the graph declares
        them, dtype a numpy dtype name, each axis an int (static), a str (a symbolic axis) or None.

        Always checked: names in order, dtypes, ranks, static sizes the graph declares, and that
        dynamic axes are not fixed. ``axis_names``: dynamic axes carry the contract's names (which
        static-shape sessions fix by name). ``exact_sizes``: static axes are declared as numbers,
        not symbols. Export checks everything; loading a graph checks names, dtypes and sizes
        (graphs of earlier exporters left some sizes symbolic), plus ``axis_names`` where
        sessions fix axes by name."""
        got_names = ([n for n, _, _ in inputs], [n for n, _, _ in outputs])
        if got_names != (self.input_names, self.output_names):
            return [f"inputs/outputs {got_names[0]}/{got_names[1]} are not the contract's "
                    f"{self.input_names}/{self.output_names}"]
        problems = []
        for spec, (name, dtype, shape) in zip(self.inputs + self.outputs, list(inputs) + list(outputs)):
            if dtype != spec.dtype:
                problems.append(f"{name} is {dtype}, not {spec.dtype}")
            if shape is None or len(shape) != len(spec.shape):
                problems.append(f"{name} has shape {None if shape is None else list(shape)}, not {list(spec.shape)}")
                continue
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int) and (isinstance(got, int) or exact_sizes) and got != want:
                    letter = _SIZE_LETTERS.get((name, axis))
                    problems.append(f"{name} axis {axis} is {got!r}, not {letter + '=' if letter else ''}{want}")
                elif isinstance(want, str) and isinstance(got, int):
                    problems.append(f"{name} axis {axis} ({want}) is fixed at {got}, not dynamic")
                elif isinstance(want, str) and axis_names and got != want:
                    problems.append(f"{name} axis {axis} is named {got!r}, not {want!r}")
        return problems

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
            fix = (f"re-export with cddrec-export --k {k}" if k <= self.num_items else
                   f"the catalogue has {self.num_items:,} items")
            raise ValueError(f"k={k}: this graph returns at most K={self.k} items; {fix}")
        return k

    # ----------------------------------------------------------------- metadata
    def to_metadata(self) -> dict[str, str]:
        """The contract as ONNX metadata_props (string values)."""
        rtol, atol = self.tolerance
        g_rtol, g_atol = self.tolerance_on("cuda")
        meta = {"cddrec_format_version": str(GRAPH_FORMAT_VERSION), "graph_kind": self.kind,
                "T": str(self.steps), "S": str(self.steps_run), "K": str(self.k), "d": str(self.hidden),
                "L": str(self.max_len),
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
        known = {"cddrec_format_version", "graph_kind", "T", "S", "K", "d", "L", "num_items", "opset", "fp16",
                 "tolerance", "tolerance_cuda", "min_overlap", "inputs"}
        try:
            return cls(k=integer("K", 1), steps=integer("T", 0), steps_run=integer("S", 0) if "S" in meta else None,
                       hidden=integer("d", 1), max_len=integer("L", 1),
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


class MetadataError(ModelFileError):
    """Graph metadata serving cannot use; ``field`` names the entry at fault ("vocab", "vocab_file",
    "popular_topk"), so an exporter can name the cause in the model file instead."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def check_distinct_keys(vocab: Vocab, source: str | Path) -> None:
    """Refuse a vocabulary that repeats a key: two ids would be served under one key."""
    if len(vocab.index) != len(vocab):
        seen: set = set()
        dup = next(k for k in vocab.keys if k in seen or seen.add(k))
        raise MetadataError(f"{source}: the vocabulary repeats the item key {dup!r}: keys must be distinct", "vocab")


def vocab_file_name(meta: dict[str, str], source: str | Path) -> str:
    """The metadata's ``vocab_file``: a plain file name beside the graph (no folder, no '..', not
    absolute), so a graph cannot make serving open any other file."""
    name = meta["vocab_file"]
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
             and "\0" not in name and not Path(name).is_absolute() and Path(name).name == name)
    if not plain:
        raise MetadataError(f"{source}: metadata 'vocab_file' must be the name of a file beside the graph, got {name!r}",
                            "vocab_file")
    return name


def serving_info(meta: dict[str, str], source: str | Path, vocab_doc: dict | None = None) -> ServingInfo:
    """Contract, vocabulary (inline or the sidecar beside ``source``) and popularity of a graph's
    metadata, checked as serving needs them: the one reader of serving info, used by serving
    (``Recommender``, the Triton repository writer) and by export, which checks the metadata it is
    about to write (``vocab_doc``: the sidecar's content, not written yet). A ``MetadataError``
    (one line, naming ``source``) otherwise."""
    contract = GraphContract.from_metadata(meta, source)
    source = Path(source)
    if vocab_doc is None:
        vocab_doc = _vocab_doc(meta, source)
    try:
        vocab = Vocab.from_dict(vocab_doc)
        if not all(isinstance(k, str) for k in vocab.keys):
            raise TypeError("keys")
    except (KeyError, TypeError, AttributeError):
        raise MetadataError(f"{source}: the item vocabulary is not {{'keys': [...], 'key_type': ...}}",
                            "vocab") from None
    if len(vocab) != contract.num_items:
        raise MetadataError(f"{source}: the vocabulary has {len(vocab)} keys but the graph scores "
                            f"{contract.num_items} items", "vocab")
    check_distinct_keys(vocab, source)
    popular = _json(meta, "popular_topk", source, [])
    if not isinstance(popular, list) or not all(isinstance(p, list) and len(p) == 2 for p in popular):
        raise MetadataError(f"{source}: metadata 'popular_topk' must be a list of [item key, count] pairs",
                            "popular_topk")
    if len(popular) < min(contract.k, contract.num_items):
        raise MetadataError(f"{source}: metadata 'popular_topk' has {len(popular)} entries, fewer than K={contract.k}; "
                            "re-export the model", "popular_topk")
    return ServingInfo(contract, vocab, popular)


def _vocab_doc(meta: dict[str, str], source: Path):
    if "vocab" in meta:
        return _json(meta, "vocab", source, None)
    if "vocab_file" not in meta:
        raise MetadataError(f"{source}: cddrec metadata has no item vocabulary", "vocab")
    side = source.parent / vocab_file_name(meta, source)
    if not side.exists():
        raise MetadataError(f"{source}: its item vocabulary {side} is missing (keep it beside the graph)", "vocab_file")
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetadataError(f"{side}: not a readable vocabulary file ({e})", "vocab_file") from None
