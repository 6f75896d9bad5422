"""Build an ONNX recommender graph from a model file, then validate it before keeping it.

``contract_for`` declares the graph (``cddrec.contract.GraphContract``); ``build_graph`` traces
``UnrolledRecommender`` to ONNX under it; ``validate_graph`` checks a graph file against the
contract and the PyTorch reference through the serving session factory and the one comparator;
``export_model`` does both, writing to a temporary file renamed only when validation passes.
"""

from __future__ import annotations

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
)
from cddrec.errors import ExportError
from cddrec.inference import popular_topk, reference_scores
from cddrec.io import atomic_path, atomic_write_json
from cddrec.model import CDDRec
from cddrec.parity import compare_topk
from cddrec.runtime.session import cuda_provider_available, ort_session
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


def contract_for(model: CDDRec, k: int = DEFAULT_K, *, stochastic: bool = False, fp16: bool = False,
                 opset: int = DEFAULT_OPSET, min_overlap: float | None = None) -> GraphContract:
    """The contract of the graph of ``model`` with top-``k`` outputs (``min_overlap``: approximate)."""
    cfg = model.cfg
    return GraphContract(k=k, steps=model.steps, hidden=cfg.hidden_size, max_len=cfg.max_len,
                         num_items=cfg.num_items, stochastic=stochastic, fp16=fp16, opset=opset,
                         min_overlap=min_overlap)


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

        module = FusedRecommender(model, contract.k, stochastic=contract.stochastic, fusions=fusions).eval()
    else:
        module = UnrolledRecommender(model, contract.k, stochastic=contract.stochastic, fp16=contract.fp16).eval()
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
                                     opset_version=contract.opset, dynamo=True)
            prog.save(str(path))
        else:
            raise ExportError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    proto = onnx.load(str(path))
    written = graph_opset(proto)
    if written != contract.opset:
        raise ExportError(f"the {exporter} exporter wrote opset {written}, not the requested {contract.opset}")
    if one_item_table(proto):
        onnx.save(proto, str(path))


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


def read_metadata(path_or_model) -> dict[str, str]:
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model),
                                                                                    load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def cuda_available() -> bool:
    """Both a CUDA GPU for PyTorch and ONNX Runtime's CUDA provider."""
    return torch.cuda.is_available() and cuda_provider_available()


def validate_graph(path: str | Path, model: CDDRec, contract: GraphContract, report: ExportReport | None = None,
                   seed: int = 1234, devices: tuple[str, ...] | None = None) -> ExportReport:
    """Check a graph file against its contract and the PyTorch reference; raise ExportError if not.

    ONNX checker; no Loop/Scan/If and no random op; the serving ONNX Runtime session on each of
    ``devices`` (default: the CPU, and CUDA (TF32 off) when ``cuda_available()``); fresh random
    histories at each validation batch size: top_scores within the contract's tolerance of the
    fp32 reference on the CPU (``contract.tolerance_on(device)``) and top_items identical except
    where the reference scores tie (``cddrec.parity.compare_topk``). An approximate graph (int8,
    two-stage top-k: ``contract.min_overlap`` set) reports the same figures and must reach that
    mean top-k overlap with the reference instead.
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
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != contract.input_names or names_out != contract.output_names:
        raise ExportError(f"graph inputs/outputs {names_in}/{names_out} differ from the contract "
                          f"{contract.input_names}/{contract.output_names}")
    devices = devices if devices is not None else (("cpu", "cuda") if cuda_available() else ("cpu",))
    mismatches = 0
    for device in devices:
        t0 = time.perf_counter()
        sess = ort_session(path, device)
        if device == "cpu":
            report.session_seconds = round(time.perf_counter() - t0, 4)
        rtol, atol = contract.tolerance_on(device)
        parity = report.parity if device == "cpu" else report.parity_cuda
        for i, batch in enumerate(contract.validate_batches):
            feed = example_inputs(model, contract, batch=batch, seed=seed + i)
            full, _ = reference_scores(model, feed["item_ids"], feed.get("noise"))  # (B, V)
            ref_scores, ref_items = full.topk(contract.k, dim=1)
            items, scores, _ = sess.run(contract.output_names, {n: v.numpy() for n, v in feed.items()})
            p = compare_topk(items, scores, ref_items.numpy(), ref_scores.numpy(), full.numpy(), rtol=rtol, atol=atol)
            if contract.min_overlap is not None:  # approximate: the verdict is the declared overlap
                p.ok = p.overlap >= contract.min_overlap
            parity[str(batch)] = p.as_dict()
            mismatches += p.topk_mismatches
            if contract.min_overlap is not None:
                if not p.ok:
                    raise ExportError(f"approximate graph, {device}, batch {batch}: top-{contract.k} overlap with the "
                                      f"fp32 reference {p.overlap:.3f} is below {contract.min_overlap} "
                                      f"(max |score difference| {p.max_abs_diff:.3g})")
                continue
            if not p.max_abs_diff <= p.tolerance:
                raise ExportError(f"{device}, batch {batch}: max |score difference| {p.max_abs_diff:.3g} exceeds "
                                  f"{p.tolerance:.3g}")
        report.validated_on.append(device)
    report.topk_mismatches = mismatches
    if mismatches and not contract.fp16 and contract.min_overlap is None:
        raise ExportError(f"{mismatches} top-k ids differ from the reference beyond exact ties")
    return report


def export_model(checkpoint: str | Path, out: str | Path, *, k: int = DEFAULT_K, opset: int = DEFAULT_OPSET,
                 fp16: bool = False, stochastic: bool = False, optimize: bool = False, exporter: str = "torchscript",
                 vocab_sidecar: bool | None = None, trt_engine: str | Path | None = None,
                 trt_fp16: bool = False, trt_max_batch: int = 1024, trt_opt_batch: int = 256,
                 validate: bool = True, int8: bool = False, int8_scoring: bool = False,
                 rescore: int = 0) -> ExportReport:
    """Export a model file to a validated ONNX graph (and optionally a TensorRT engine).

    ``optimize``: the fused graph with ONNX Runtime contrib ops (``export/fusion.py``), for
    ONNX Runtime only. ``int8``: MatMuls dynamically quantized (``export/quantize.py``; the
    scoring MatMul too with ``int8_scoring``; of the fused graph with ``optimize``). ``rescore`` C:
    the two-stage top-k (``export/catalogue.py``: int8 candidates, the top C rescored exactly).
    int8 and two-stage graphs are approximate: validated by top-k overlap (``APPROX_MIN_OVERLAP``)."""
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: the graph needs opset {MIN_OPSET} or newer (Trilu for the causal mask)")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"--opset {opset}: the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer; "
                          f"use --opset {DYNAMO_MIN_OPSET} or --exporter torchscript")
    model, ckpt = load_checkpoint(checkpoint)
    cfg = model.cfg
    if k < 1:
        raise ExportError(f"--k {k} must be >= 1")
    if stochastic and model.steps < 2:
        raise ExportError("--stochastic needs a model with a decoder and T >= 2: the last reverse step is its mean "
                          f"(no noise), so this model (T={model.steps}) has no sampled step; export it without "
                          "--stochastic")
    k_asked = k
    k = min(k, cfg.num_items)  # a small catalogue: K is clamped to the rankable items (report.k_requested says so)
    if (optimize or int8 or rescore) and fp16:
        raise ExportError("--optimize, --int8 and --rescore write fp32 ONNX Runtime graphs: not with --fp16")
    if rescore and not k <= rescore:
        raise ExportError(f"--rescore {rescore} must be at least --k {k}")
    if trt_engine:
        from .tensorrt import check_trt_request

        # before anything is written; the int8 and two-stage graphs are ONNX Runtime graphs too
        check_trt_request(k, optimize=optimize or int8 or bool(rescore), fp16=fp16, trt_fp16=trt_fp16)
    out = Path(out)
    vocab = Vocab.from_dict(ckpt["vocab"])
    if vocab_sidecar is None:
        vocab_sidecar = len(vocab) > VOCAB_INLINE_MAX
    extra = {
        "weights_sha256": weights_checksum(model),
        "popular_topk": popular_topk(ckpt.get("popularity"), vocab, max(k, POPULAR_TOPK)),
        "export_settings": {"opset": opset, "fp16": fp16, "stochastic": stochastic, "optimize": optimize,
                            "int8": int8, "int8_scoring": int8_scoring, "rescore": rescore, "exporter": exporter,
                            "torch": torch.__version__, "cddrec": __version__,
                            "mask_score": MASK_SCORE, "source": str(checkpoint)},
        "config": ckpt["model_config"],  # the model config: what the graph was built from
    }
    if vocab_sidecar:
        extra["vocab_file"] = out.with_suffix(".vocab.json").name
    else:
        extra["vocab"] = vocab.to_dict()
    contract = GraphContract(**{**asdict(contract_for(model, k, stochastic=stochastic, fp16=fp16, opset=opset,
                                                      min_overlap=APPROX_MIN_OVERLAP if int8 or rescore else None)),
                                "extra": extra})
    report = ExportReport(path=str(out), contract={k_: v for k_, v in asdict(contract).items() if k_ != "extra"},
                          k_requested=k_asked if k_asked != k else None)
    meta = contract.to_metadata()
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        if optimize or rescore:  # the standard graph's op counts, then the fused or two-stage graph in its place
            build_graph(model, tmp, contract, exporter)
            report.ops = op_counts(onnx.load(str(tmp)))
        build_graph(model, tmp, contract, exporter, fusions=DEFAULT_FUSIONS if optimize else None, rescore=rescore)
        if int8:
            from .quantize import quantize_graph

            report.ops = report.ops or op_counts(onnx.load(str(tmp)))  # counts before quantization
            fp32 = tmp.with_name(tmp.name + ".fp32")
            try:
                tmp.replace(fp32)
                report.int8 = quantize_graph(fp32, tmp, cfg.num_rows, quantize_scoring=int8_scoring)
            finally:
                fp32.unlink(missing_ok=True)
        write_metadata(tmp, meta)
        if optimize or int8 or rescore:
            report.ops_optimized = op_counts(onnx.load(str(tmp)))
        report.export_seconds = round(time.perf_counter() - t0, 3)
        if validate:
            ops_before = report.ops
            validate_graph(tmp, model, contract, report)
            if optimize or int8 or rescore:
                report.ops_optimized, report.ops = report.ops, ops_before
        report.graph_bytes = tmp.stat().st_size
        if vocab_sidecar:
            sidecar = out.with_suffix(".vocab.json")
            atomic_write_json(sidecar, vocab.to_dict())
            report.vocab_sidecar = str(sidecar)
    if trt_engine:
        from .tensorrt import build_engine

        build_engine(out, trt_engine, contract, fp16=trt_fp16, max_batch=trt_max_batch, opt_batch=trt_opt_batch)
        report.trt_engine = str(trt_engine)
    return report
