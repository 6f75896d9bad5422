"""Build an ONNX recommender graph from a model file, then validate it before keeping it.

``contract_for`` declares the graph (``cddrec.contract.GraphContract``); ``build_graph`` traces
``UnrolledRecommender`` to ONNX under it; ``validate_graph`` checks a graph file against the
contract (names, dtypes, axes, static sizes) and the PyTorch reference through the serving
backend and the one parity loop (``cddrec.parity.compare_runners``); ``export_model`` does both
under an ``ExportOptions`` (and, for an engine, ``TensorRTOptions``), checks the metadata it
writes with serving's own reader (``cddrec.contract.serving_info``), and writes to a temporary
file renamed only when validation passes.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from cddrec import __version__
from cddrec.checkpoint import load_checkpoint, weights_checksum
from cddrec.contract import (
    APPROX_MIN_OVERLAP,
    DEFAULT_K,
    DEFAULT_OPSET,
    DYNAMO_MIN_OPSET,
    FORBIDDEN_OPS,
    MASK_SCORE,
    MIN_OPSET,
    POPULAR_TOPK,
    VOCAB_INLINE_MAX,
    GraphContract,
    MetadataError,
    serving_info,
)
from cddrec.errors import ExportError
from cddrec.inference import popular_topk, reference_runner
from cddrec.io import atomic_path, atomic_write_json
from cddrec.model import CDDRec
from cddrec.parity import compare_runners
from cddrec.runtime.backends import OrtBackend
from cddrec.runtime.session import cuda_provider_available
from cddrec.vocab import Vocab

from .fusion import DEFAULT_FUSIONS, MS_DOMAIN
from .graph import UnrolledRecommender


@dataclass
class ExportReport:
    path: str
    contract: dict
    graph_bytes: int = 0
    ops: dict = field(default_factory=dict)
    ops_optimized: dict = field(default_factory=dict)
    session_seconds: float = 0.0
    parity: dict = field(default_factory=dict)  # per validation batch size: cddrec.parity.Parity as a dict
    parity_cuda: dict = field(default_factory=dict)  # the same on ort-cuda (TF32 off), when CUDA is present
    validated_on: list = field(default_factory=list)  # "cpu", and "cuda" when CUDA was present
    topk_mismatches: int = 0
    export_seconds: float = 0.0
    vocab_sidecar: str | None = None
    trt_engine: str | None = None
    k_requested: int | None = None  # the --k asked for, when it exceeded the catalogue and K was clamped
    int8: dict = field(default_factory=dict)  # what quantize_graph quantized
    triton_repo: str | None = None  # the model folder of a Triton repository written beside the graph

    @property
    def max_abs_diff(self) -> dict:
        return {b: p["max_abs_diff"] for b, p in self.parity.items()}

    @property
    def topk_overlap(self) -> dict:
        """Per validation batch size, the mean top-k overlap of an approximate graph (int8, two-stage)."""
        approximate = self.contract.get("min_overlap") is not None
        return {b: p["overlap"] for b, p in self.parity.items()} if approximate else {}


EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class ExportOptions:
    """What graph ``export_model`` writes (the options of ``cddrec-export``)."""

    k: int = DEFAULT_K  # top-k items the graph returns (clamped to the catalogue)
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"  # "torchscript" (the tracer) or "dynamo" (torch.export, opset >= 18)
    fp16: bool = False  # fp16 matmuls; LayerNorm, softmax, scoring and TopK stay fp32
    stochastic: bool = False  # a noise input (T, batch, d): the sampled reverse chain
    optimize: bool = False  # the fused graph (ONNX Runtime contrib ops, ``export/fusion.py``)
    int8: bool = False  # MatMuls dynamically quantized (``export/quantize.py``)
    int8_scoring: bool = False  # with int8: the scoring MatMul too
    rescore: int = 0  # C > 0: the two-stage top-k (int8 candidates, C rescored in fp32)
    vocab_sidecar: bool | None = None  # vocabulary beside the graph; None: when over VOCAB_INLINE_MAX keys
    validate: bool = True
    steps: int | None = None  # S: early exit, the graph runs the first S of the T reverse steps; None: all T

    def __post_init__(self) -> None:
        """Refuse settings that cannot work whatever the model (before anything is read or written)."""
        if self.k < 1:
            raise ExportError(f"--k {self.k} must be >= 1")
        if self.exporter not in EXPORTERS:
            raise ExportError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.opset < MIN_OPSET:
            raise ExportError(f"--opset {self.opset}: the graph needs opset {MIN_OPSET} or newer (Trilu for the "
                              "causal mask)")
        if self.exporter == "dynamo" and self.opset < DYNAMO_MIN_OPSET:
            raise ExportError(f"--opset {self.opset}: the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer; "
                              f"use --opset {DYNAMO_MIN_OPSET} or --exporter torchscript")
        if (self.optimize or self.int8 or self.rescore) and self.fp16:
            raise ExportError("--optimize, --int8 and --rescore write fp32 ONNX Runtime graphs: not with --fp16")
        if self.int8_scoring and not self.int8:
            raise ExportError("--int8-scoring quantizes the scoring MatMul of an --int8 graph: add --int8")
        if self.rescore < 0:
            raise ExportError(f"--rescore {self.rescore} must be >= 0")
        if self.steps is not None and self.steps < 1:
            raise ExportError(f"--steps {self.steps} must be >= 1 (early exit after S of the T reverse steps)")

    @property
    def approximate(self) -> bool:
        """int8 and two-stage graphs: validated by top-k overlap, not by score tolerance."""
        return self.int8 or bool(self.rescore)

    @property
    def ort_only(self) -> bool:
        """Graphs with ONNX Runtime contrib or quantized ops (not for TensorRT)."""
        return self.optimize or self.int8 or bool(self.rescore)


@dataclass(frozen=True)
class TensorRTOptions:
    """A TensorRT engine built from the exported graph (``cddrec-export --trt``)."""

    engine: str | Path  # where the engine is written (its metadata goes to ENGINE.meta.json)
    fp16: bool = False  # an fp16 engine: needs an fp16 graph (ExportOptions.fp16)
    max_batch: int = 1024  # largest batch of the optimization profile
    opt_batch: int = 256  # batch the profile is tuned for


def contract_for(model: CDDRec, k: int = DEFAULT_K, *, stochastic: bool = False, fp16: bool = False,
                 opset: int = DEFAULT_OPSET, min_overlap: float | None = None,
                 steps: int | None = None) -> GraphContract:
    """The contract of the graph of ``model`` with top-``k`` outputs (``min_overlap``: approximate;
    ``steps`` S: early exit after S of the T reverse steps, None: all T)."""
    cfg = model.cfg
    return GraphContract(k=k, steps=model.steps, hidden=cfg.hidden_size, max_len=cfg.max_len,
                         num_items=cfg.num_items, stochastic=stochastic, fp16=fp16, opset=opset,
                         min_overlap=min_overlap, steps_run=steps)


def chain_steps(contract: GraphContract) -> int | None:
    """The ``steps`` argument of the modules and the reference for ``contract``: S, or None without a
    decoder (no chain to cut)."""
    return contract.steps_run or None


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def example_inputs(model: CDDRec, contract: GraphContract, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the contract's shapes (batch >= 2, history L + 3 so no axis is specialized)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    S = cfg.max_len + 3
    ids = torch.randint(1, cfg.num_items + 1, (batch, S), generator=g)
    lens = torch.randint(1, S + 1, (batch,), generator=g)
    ids[torch.arange(S).view(1, -1) < (S - lens).view(-1, 1)] = 0  # left padding
    feed = {"item_ids": ids}
    if contract.stochastic:
        feed["noise"] = torch.randn(model.steps, batch, cfg.hidden_size, generator=g)
    return feed


def build_graph(model: CDDRec, path: str | Path, contract: GraphContract, exporter: str = "torchscript",
                fusions: tuple[str, ...] | None = None, rescore: int = 0) -> None:
    """Trace the unrolled recommender to ONNX at ``path`` following ``contract``; ``fusions``: the
    fused graph with those ONNX Runtime contrib ops (``export/fusion.py``, torchscript exporter);
    ``rescore`` C > 0: the two-stage top-k of ``export/catalogue.py`` (int8 candidates, C rescored)."""
    fused = fusions is not None
    if (fused or rescore) and (exporter != "torchscript" or contract.fp16):
        raise ExportError("the fused graph (--optimize) and the two-stage top-k (--rescore) are fp32 graphs of the "
                          "torchscript exporter")
    if fused:
        from .fusion import FusedRecommender

        module = FusedRecommender(model, contract.k, stochastic=contract.stochastic, fusions=fusions,
                                  steps=chain_steps(contract)).eval()
    else:
        module = UnrolledRecommender(model, contract.k, stochastic=contract.stochastic, fp16=contract.fp16,
                                     steps=chain_steps(contract)).eval()
    if rescore:
        from .catalogue import TwoStageTopK

        module, fused = TwoStageTopK(module, rescore).eval(), True
    args = tuple(example_inputs(model, contract).values())
    with torch.no_grad(), warnings.catch_warnings():
        # tracing notes (constant folding of Slice, TracerWarnings) are expected and harmless
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), input_names=contract.input_names,
                              output_names=contract.output_names, dynamic_axes=contract.dynamic_axes,
                              opset_version=contract.opset, do_constant_folding=True, dynamo=False,
                              custom_opsets={MS_DOMAIN: 1} if fused else None)
        elif exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401
            except ImportError as e:
                raise ExportError("the dynamo exporter needs onnxscript (pip install onnxscript)") from e
            dims = {name: {i: torch.export.Dim.AUTO for i in axes} for name, axes in contract.dynamic_axes.items()
                    if name in contract.input_names}
            prog = torch.onnx.export(module, args, input_names=contract.input_names,
                                     output_names=contract.output_names, dynamic_shapes=dims,
                                     opset_version=contract.opset, dynamo=True, verbose=False)
            prog.save(str(path))
        else:
            raise ExportError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    proto = onnx.load(str(path))
    written = graph_opset(proto)
    if written != contract.opset:
        raise ExportError(f"the {exporter} exporter wrote opset {written}, not the requested {contract.opset}")
    conformed = conform_io(proto, contract)
    if one_item_table(proto) or conformed:
        onnx.save(proto, str(path))


def graph_io(proto: onnx.ModelProto) -> tuple[list[tuple], list[tuple]]:
    """A graph's inputs and outputs as ``[(name, numpy dtype name, shape)]`` (axes: int, the name of
    a dynamic axis, or None), the form ``GraphContract.io_problems`` checks."""
    def spec(vi):
        t = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "undefined"
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] \
            if t.HasField("shape") else None
        return vi.name, dtype, dims

    return [spec(v) for v in proto.graph.input], [spec(v) for v in proto.graph.output]


def conform_io(proto: onnx.ModelProto, contract: GraphContract) -> bool:
    """Declare the graph's inputs and outputs with the contract's axis names and sizes, in place.

    Dynamic axes get the contract's names (``batch``, ``history``): the dynamo exporter names them
    after its shape symbols (``s42``, ``s64``), and then nothing that fixes axes by name works (ONNX
    Runtime's free-dimension overrides of the static-shape sessions of ``ort-cuda-graph`` silently
    do nothing; Triton's TensorRT profile cannot be written). Each such symbol is renamed
    everywhere it appears (inputs, outputs, value_info, and inside expressions such as ``s64 + 8``).
    A static axis the exporter left symbolic (``TopKtop_scores_dim_1`` for K after the two-stage
    top-k) is declared with the contract's size; validation then runs the graph and checks the
    real shapes. Returns whether anything changed."""
    ins, outs = graph_io(proto)
    rename: dict[str, str] = {}
    changed = False
    for spec, vi, (_, _, shape) in zip(contract.inputs + contract.outputs,
                                       list(proto.graph.input) + list(proto.graph.output), ins + outs):
        if shape is None or len(shape) != len(spec.shape):
            continue  # validation names the mismatch
        for axis, (want, got) in enumerate(zip(spec.shape, shape)):
            if isinstance(want, str) and isinstance(got, str) and got != want:
                if rename.setdefault(got, want) != want:
                    raise ExportError(f"the exporter gave one symbol {got!r} to the axes {rename[got]!r} and {want!r}")
            elif isinstance(want, int) and not isinstance(got, int):
                vi.type.tensor_type.shape.dim[axis].dim_value = want  # clears the dim_param
                changed = True
    if not rename:
        return changed
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    for vi in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = pattern.sub(lambda m: rename[m.group(1)], d.dim_param)
    return True


def graph_opset(proto: onnx.ModelProto) -> int:
    """The default-domain opset a graph imports."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def one_item_table(proto: onnx.ModelProto) -> bool:
    """Store each weight matrix once: the TorchScript exporter turns ``F.linear`` without a bias
    into ``MatMul(x, W^T)`` with ``W^T`` constant-folded, a second (transposed) copy of the item
    table beside the one the embedding Gather reads. Each MatMul on such a transposed copy whose
    other input is 2-D becomes ``Gemm(x, W, transB=1)`` and the copy is dropped. Returns whether
    the graph changed."""
    inits = {i.name: i for i in proto.graph.initializer}
    by_shape: dict[tuple, list[str]] = {}
    for name, init in inits.items():
        if len(init.dims) == 2:
            by_shape.setdefault(tuple(init.dims), []).append(name)
    twin: dict[str, str] = {}  # transposed copy -> original
    for name, init in inits.items():
        if len(init.dims) != 2 or init.dims[0] == init.dims[1]:
            continue
        candidates = by_shape.get((init.dims[1], init.dims[0]), [])
        if not candidates:
            continue
        arr = numpy_helper.to_array(init)
        for other in candidates:
            if np.array_equal(numpy_helper.to_array(inits[other]).T, arr):
                twin[name] = other
                break
    if not twin:
        return False
    ranks = _ranks(proto)
    changed = False
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in twin and ranks.get(node.input[0]) == 2:
            original = twin[node.input[1]]
            node.op_type = "Gemm"
            node.input[1] = original
            node.attribute.extend([onnx.helper.make_attribute("transB", 1)])
            changed = True
    used = {i for n in proto.graph.node for i in n.input}
    for name in twin:
        if name not in used:
            proto.graph.initializer.remove(inits[name])
    return changed


def _ranks(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def write_metadata(path: str | Path, meta: dict[str, str]) -> None:
    m = onnx.load(str(path))
    del m.metadata_props[:]
    for key, value in meta.items():
        entry = m.metadata_props.add()
        entry.key = key
        entry.value = value
    m.producer_name, m.producer_version = "cddrec", __version__
    onnx.save(m, str(path))


def cuda_available() -> bool:
    """Both a CUDA GPU for PyTorch and ONNX Runtime's CUDA provider."""
    return torch.cuda.is_available() and cuda_provider_available()


def validate_graph(path: str | Path, model: CDDRec, contract: GraphContract, report: ExportReport | None = None,
                   seed: int = 1234, devices: tuple[str, ...] | None = None) -> ExportReport:
    """Check a graph file against its contract and the PyTorch reference (of the same reverse steps:
    ``contract.steps_run``); raise ExportError if not.

    ONNX checker; no Loop/Scan/If and no random op; inputs and outputs as the contract declares
    them (names, dtypes, static sizes, named dynamic axes: ``GraphContract.io_problems``); the
    serving backend (``OrtBackend``, as ``ort-cpu``/``ort-cuda`` open it) on each of ``devices``
    (default: the CPU, and CUDA (TF32 off) when ``cuda_available()``) against the fp32 reference on
    fresh random histories at each validation batch size, through the one parity loop
    (``compare_runners``) under the contract's rule (``parity_rule(device)``): scores within
    ``tolerance_on(device)`` and ids identical beyond ties (fp16: scores only); an approximate
    graph (int8, two-stage top-k: ``contract.min_overlap`` set) must reach that mean top-k overlap.
    """
    report = report or ExportReport(path=str(path), contract=asdict(contract))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"ONNX checker rejected the graph: {e}") from e
    proto = onnx.load(str(path))
    report.ops = op_counts(proto)
    bad = sorted(set(report.ops) & set(FORBIDDEN_OPS))
    if bad:
        raise ExportError(f"graph contains forbidden ops {bad} (the steps must be unrolled, no random ops)")
    problems = contract.io_problems(*graph_io(proto))
    if problems:
        raise ExportError(f"the graph's inputs/outputs differ from the contract: {'; '.join(problems)}")
    devices = devices if devices is not None else (("cpu", "cuda") if cuda_available() else ("cpu",))
    feeds = {str(b): {n: v.numpy() for n, v in example_inputs(model, contract, batch=b, seed=seed + i).items()}
             for i, b in enumerate(contract.validate_batches)}
    reference = reference_runner(model, steps=chain_steps(contract))  # S steps, as the graph runs them
    refs = {label: reference(feed) for label, feed in feeds.items()}  # (B, V) each, shared by the devices
    mismatches = 0
    for device in devices:
        t0 = time.perf_counter()
        backend = OrtBackend(path, device)
        if device == "cpu":
            report.session_seconds = round(time.perf_counter() - t0, 4)
        try:
            parity = compare_runners({device: backend.infer}, refs, feeds, **contract.parity_rule(device))
        finally:
            backend.close()
        (report.parity if device == "cpu" else report.parity_cuda).update(
            {b: p.as_dict() for b, p in parity.results[device].items()})
        mismatches += parity.topk_mismatches
        if not parity.ok:
            kind = "approximate graph, " if contract.min_overlap is not None else ""
            raise ExportError(kind + parity.failures()[0])
        report.validated_on.append(device)
    report.topk_mismatches = mismatches
    return report


def check_request(model: CDDRec, options: ExportOptions, trt: TensorRTOptions | None, triton=None) -> int:
    """Refuse what this model cannot be exported as, before anything is written; returns K (the
    requested k clamped to the catalogue)."""
    if triton is not None:
        triton.check(optimize=options.optimize)
    if options.stochastic and model.steps < 2:
        raise ExportError("--stochastic needs a model with a decoder and T >= 2: the last reverse step is its mean "
                          f"(no noise), so this model (T={model.steps}) has no sampled step; export it without "
                          "--stochastic")
    if options.steps is not None and not 1 <= options.steps <= model.steps:
        raise ExportError(f"--steps {options.steps}: " + (
            f"this model runs T={model.steps} reverse steps; early exit takes S between 1 and {model.steps}"
            if model.steps else "this model has no decoder (a SASRec baseline): there are no reverse steps to cut"))
    k = min(options.k, model.cfg.num_items)  # a small catalogue: K is clamped (report.k_requested says so)
    if options.rescore and not k <= options.rescore:
        raise ExportError(f"--rescore {options.rescore} must be at least --k {k}")
    if trt is not None:
        from .tensorrt import check_trt_request

        # before anything is written; the int8 and two-stage graphs are ONNX Runtime graphs too
        check_trt_request(k, optimize=options.ort_only, fp16=options.fp16, trt_fp16=trt.fp16)
    return k


def check_servable(meta: dict[str, str], out: Path, vocab: Vocab, sidecar: bool, checkpoint, ckpt: dict) -> None:
    """Read the metadata about to be written with serving's own reader (``serving_info``), so a graph
    serving would refuse is refused here, with its cause in the model file."""
    try:
        serving_info(meta, out, vocab_doc=vocab.to_dict() if sidecar else None)
    except MetadataError as e:
        cfg_items = int(meta["num_items"])
        if e.field == "popular_topk" and ckpt.get("popularity") is None:
            cause = ("has no item popularity counts, which serving needs for users with no known item; save the model "
                     "with its popularity (cddrec-train does)")
        elif e.field == "vocab" and len(vocab) != cfg_items:
            cause = (f"has a vocabulary of {len(vocab)} item keys but its model scores {cfg_items} items: serving could "
                     "not map the graph's ids back to keys; save the model with the vocabulary it was trained on")
        else:
            cause = f"would give a graph serving refuses ({e})"
        raise ExportError(f"{checkpoint}: the model file {cause}") from None


def export_model(checkpoint: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 trt: TensorRTOptions | None = None, triton=None) -> ExportReport:
    """Export a model file to a validated ONNX graph (and, with ``trt``, a TensorRT engine; with
    ``triton``, a ``cddrec.export.triton.TritonOptions``, a Triton model folder).

    ``options.optimize``: the fused graph with ONNX Runtime contrib ops (``export/fusion.py``), for
    ONNX Runtime only. ``int8``: MatMuls dynamically quantized (``export/quantize.py``; the
    scoring MatMul too with ``int8_scoring``; of the fused graph with ``optimize``). ``rescore`` C:
    the two-stage top-k (``export/catalogue.py``: int8 candidates, the top C rescored exactly).
    int8 and two-stage graphs are approximate: validated by top-k overlap (``APPROX_MIN_OVERLAP``)."""
    o = options
    model, ckpt = load_checkpoint(checkpoint)
    k = check_request(model, o, trt, triton)
    out = Path(out)
    vocab = Vocab.from_dict(ckpt["vocab"])
    sidecar = len(vocab) > VOCAB_INLINE_MAX if o.vocab_sidecar is None else o.vocab_sidecar
    extra = {
        "weights_sha256": weights_checksum(model),
        "popular_topk": popular_topk(ckpt.get("popularity"), vocab, max(k, POPULAR_TOPK)),
        "export_settings": {"opset": o.opset, "fp16": o.fp16, "stochastic": o.stochastic, "optimize": o.optimize,
                            "int8": o.int8, "int8_scoring": o.int8_scoring, "rescore": o.rescore,
                            "exporter": o.exporter, "torch": torch.__version__, "cddrec": __version__,
                            "mask_score": MASK_SCORE, "source": str(checkpoint)},
        "config": ckpt["model_config"],  # the model config: what the graph was built from
        **({"vocab_file": out.with_suffix(".vocab.json").name} if sidecar else {"vocab": vocab.to_dict()}),
    }
    contract = GraphContract(**{**asdict(contract_for(model, k, stochastic=o.stochastic, fp16=o.fp16, opset=o.opset,
                                                      min_overlap=APPROX_MIN_OVERLAP if o.approximate else None,
                                                      steps=o.steps)),
                                "extra": extra})
    meta = contract.to_metadata()
    check_servable(meta, out, vocab, sidecar, checkpoint, ckpt)
    report = ExportReport(path=str(out), contract={k_: v for k_, v in asdict(contract).items() if k_ != "extra"},
                          k_requested=o.k if o.k != k else None)
    with atomic_path(out) as tmp:
        write_graph(model, tmp, contract, meta, o, report)
        if o.validate:
            ops_before = report.ops
            validate_graph(tmp, model, contract, report)
            if o.ort_only:
                report.ops_optimized, report.ops = report.ops, ops_before
        report.graph_bytes = tmp.stat().st_size
        if sidecar:
            path = out.with_suffix(".vocab.json")
            atomic_write_json(path, vocab.to_dict())
            report.vocab_sidecar = str(path)
    if trt is not None:
        from .tensorrt import build_engine

        build_engine(out, trt.engine, contract, fp16=trt.fp16, max_batch=trt.max_batch, opt_batch=trt.opt_batch)
        report.trt_engine = str(trt.engine)
    if triton is not None:
        report.triton_repo = str(triton.write(out, fp16=o.fp16).model_dir)
    return report


def write_graph(model: CDDRec, tmp: Path, contract: GraphContract, meta: dict[str, str], o: ExportOptions,
                report: ExportReport) -> None:
    """Trace the graph ``o`` asks for to ``tmp`` (fused, two-stage, quantized) with its metadata;
    ``report`` gets the op counts (standard graph, and after optimization) and the export time."""
    t0 = time.perf_counter()
    if o.optimize or o.rescore:  # the standard graph's op counts, then the fused or two-stage graph in its place
        build_graph(model, tmp, contract, o.exporter)
        report.ops = op_counts(onnx.load(str(tmp)))
    build_graph(model, tmp, contract, o.exporter, fusions=DEFAULT_FUSIONS if o.optimize else None, rescore=o.rescore)
    if o.int8:
        from .quantize import quantize_graph

        report.ops = report.ops or op_counts(onnx.load(str(tmp)))  # counts before quantization
        fp32 = tmp.with_name(tmp.name + ".fp32")
        try:
            tmp.replace(fp32)
            report.int8 = quantize_graph(fp32, tmp, model.cfg.num_rows, quantize_scoring=o.int8_scoring)
        finally:
            fp32.unlink(missing_ok=True)
    write_metadata(tmp, meta)
    if o.ort_only:
        report.ops_optimized = op_counts(onnx.load(str(tmp)))
    report.export_seconds = round(time.perf_counter() - t0, 3)
