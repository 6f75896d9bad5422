"""Build an ONNX recommender graph from a model file, then validate it before keeping it.

``build_graph`` traces ``UnrolledRecommender`` to ONNX under a ``GraphSpec``;
``validate_graph`` checks a graph file against the spec and the PyTorch reference;
``export_model`` does both, writing to a temporary file renamed only when validation passes.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from cddrec import __version__
from cddrec.checkpoint import load_checkpoint, weights_checksum
from cddrec.data import Vocab
from cddrec.inference import MASK_SCORE, popular_topk, reference_scores
from cddrec.io import atomic_path, atomic_write_json
from cddrec.model import CDDRec

from .fusion import DEFAULT_FUSIONS
from .graph import UnrolledRecommender
from .spec import DEFAULT_OPSET, GRAPH_FORMAT_VERSION, TRT_MAX_K, GraphSpec, graph_spec

VOCAB_INLINE_MAX = 200_000  # larger vocabularies go to a sidecar model.vocab.json


class ExportError(ValueError):
    """Export or validation failed; nothing was written."""


@dataclass
class ExportReport:
    path: str
    spec: dict
    graph_bytes: int = 0
    ops: dict = field(default_factory=dict)
    ops_optimized: dict = field(default_factory=dict)
    session_seconds: float = 0.0
    max_abs_diff: dict = field(default_factory=dict)  # per validation batch size
    topk_mismatches: int = 0
    export_seconds: float = 0.0
    vocab_sidecar: str | None = None
    trt_engine: str | None = None
    notes: list = field(default_factory=list)
    topk_overlap: dict = field(default_factory=dict)  # per validation batch size: mean top-k overlap (approximate)
    int8: dict = field(default_factory=dict)  # what quantize_graph quantized


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def example_inputs(model: CDDRec, spec: GraphSpec, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the spec's shapes (batch >= 2, history L + 3 so no axis is specialized)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    S = cfg.max_len + 3
    ids = torch.randint(1, cfg.num_items + 1, (batch, S), generator=g)
    lens = torch.randint(1, S + 1, (batch,), generator=g)
    ids[torch.arange(S).view(1, -1) < (S - lens).view(-1, 1)] = 0  # left padding
    feed = {"item_ids": ids}
    if spec.kind == "stochastic":
        feed["noise"] = torch.randn(model.steps, batch, cfg.hidden_size, generator=g)
    return feed


def build_graph(model: CDDRec, path: str | Path, spec: GraphSpec, exporter: str = "torchscript",
                fusions: tuple[str, ...] | None = None, rescore: int = 0) -> None:
    """Trace the unrolled recommender to ONNX at ``path`` following ``spec``; ``fusions``: the
    fused graph with those ONNX Runtime contrib ops (``export/fusion.py``, torchscript exporter);
    ``rescore`` C > 0: the two-stage top-k of ``export/catalogue.py`` (int8 candidates, C rescored)."""
    k = spec.outputs[0].shape[1]
    fused = fusions is not None
    if fused:
        from .fusion import MS_DOMAIN, FusedRecommender

        if exporter != "torchscript" or spec.fp16:
            raise ExportError("the fused graph (--optimize) is fp32 and needs the torchscript exporter")
        module = FusedRecommender(model, k, stochastic=spec.kind == "stochastic", fusions=fusions).eval()
    else:
        module = UnrolledRecommender(model, k, stochastic=spec.kind == "stochastic", fp16=spec.fp16).eval()
    if rescore:
        from .catalogue import TwoStageTopK
        from .fusion import MS_DOMAIN

        if exporter != "torchscript" or spec.fp16:
            raise ExportError("the two-stage top-k (--rescore) is fp32 and needs the torchscript exporter")
        module, fused = TwoStageTopK(module, rescore).eval(), True
    args = tuple(example_inputs(model, spec).values())
    with torch.no_grad(), warnings.catch_warnings():
        # tracing notes (constant folding of Slice, TracerWarnings) are expected and harmless
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes,
                              opset_version=spec.opset, do_constant_folding=True, dynamo=False,
                              custom_opsets={MS_DOMAIN: 1} if fused else None)
        elif exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401
            except ImportError as e:
                raise ExportError("the dynamo exporter needs onnxscript (pip install onnxscript)") from e
            dims = {name: {i: torch.export.Dim.AUTO for i in axes} for name, axes in spec.dynamic_axes.items()
                    if name in spec.input_names}
            prog = torch.onnx.export(module, args, input_names=spec.input_names, output_names=spec.output_names,
                                     dynamic_shapes=dims, opset_version=spec.opset, dynamo=True)
            prog.save(str(path))
        else:
            raise ExportError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")


def add_metadata(path: str | Path, meta: dict[str, object]) -> None:
    m = onnx.load(str(path))
    del m.metadata_props[:]
    for key, value in meta.items():
        entry = m.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    m.producer_name, m.producer_version = "cddrec", __version__
    onnx.save(m, str(path))


def read_metadata(path_or_model) -> dict[str, str]:
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model),
                                                                                    load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def ort_session(path: str | Path, providers: list[str] | None = None, threads: int = 0, opt_path: str | None = None,
                profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if profile_prefix:  # per-node timings, written by session.end_profiling()
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if opt_path:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt_path)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


def validate_graph(path: str | Path, model: CDDRec, spec: GraphSpec, report: ExportReport | None = None,
                   seed: int = 1234, approximate: bool = False) -> ExportReport:
    """Check a graph file against its spec and the PyTorch reference; raise ExportError if not.

    ONNX checker; no Loop/Scan/If and no random op; an ONNX Runtime CPU session; fresh random
    histories at each validation batch size: top_scores within ``spec.atol`` of the reference
    and top_items identical except where the reference scores tie. ``approximate`` graphs (int8,
    two-stage top-k) report the same figures and the mean top-k overlap, which must reach
    ``INT8_MIN_OVERLAP``.
    """
    report = report or ExportReport(path=str(path), spec=asdict(spec))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"ONNX checker rejected the graph: {e}") from e
    proto = onnx.load(str(path))
    report.ops = op_counts(proto)
    bad = sorted(set(report.ops) & set(spec.forbidden_ops))
    if bad:
        raise ExportError(f"graph contains forbidden ops {bad} (the steps must be unrolled, no random ops)")
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != spec.input_names or names_out != spec.output_names:
        raise ExportError(f"graph inputs/outputs {names_in}/{names_out} differ from the spec "
                          f"{spec.input_names}/{spec.output_names}")
    t0 = time.perf_counter()
    sess = ort_session(path)
    report.session_seconds = round(time.perf_counter() - t0, 4)
    k = spec.outputs[0].shape[1]
    mismatches = 0
    for i, batch in enumerate(spec.validate_batches):
        feed = example_inputs(model, spec, batch=batch, seed=seed + i)
        full, _ = reference_scores(model, feed["item_ids"], feed.get("noise"))  # (B, V)
        ref_scores, ref_items = full.topk(k, dim=1)
        items, scores, user = sess.run(spec.output_names, {n: v.numpy() for n, v in feed.items()})
        diff = float(np.abs(scores - ref_scores.numpy()).max())
        report.max_abs_diff[str(batch)] = diff
        if approximate:
            from .quantize import INT8_MIN_OVERLAP, topk_overlap

            overlap = report.topk_overlap[str(batch)] = topk_overlap(items, ref_items.numpy())
            mismatches += _topk_mismatches(items, ref_items.numpy(), ref_scores.numpy(), full.numpy(), spec.atol)
            if overlap < INT8_MIN_OVERLAP:
                raise ExportError(f"approximate graph, batch {batch}: top-{k} overlap with the fp32 reference {overlap:.3f} "
                                  f"is below {INT8_MIN_OVERLAP} (max |score difference| {diff:.3g})")
            continue
        tol = spec.atol * (max(1.0, float(ref_scores[ref_scores > MASK_SCORE].abs().max())) if spec.fp16 else 1.0)
        if not diff <= tol:
            raise ExportError(f"batch {batch}: max |score difference| {diff:.3g} exceeds {tol:.3g}")
        mismatches += _topk_mismatches(items, ref_items.numpy(), ref_scores.numpy(), full.numpy(), tol)
    report.topk_mismatches = mismatches
    if mismatches and not spec.fp16 and not approximate:
        raise ExportError(f"{mismatches} top-k ids differ from the reference beyond exact ties")
    return report


def _topk_mismatches(items: np.ndarray, ref_items: np.ndarray, ref_scores: np.ndarray, full: np.ndarray,
                     tol: float) -> int:
    """Top-k positions whose id differs from the reference and is not an exact tie: the graph's
    item must have, in the reference, the score the reference ranks at that position."""
    rows, cols = np.nonzero(items != ref_items)
    their = full[rows, items[rows, cols]]
    return int((np.abs(their - ref_scores[rows, cols]) > tol).sum())


def export_model(checkpoint: str | Path, out: str | Path, *, k: int = 10, opset: int = DEFAULT_OPSET,
                 fp16: bool = False, stochastic: bool = False, optimize: bool = False, exporter: str = "torchscript",
                 vocab_sidecar: bool | None = None, trt_engine: str | Path | None = None,
                 trt_fp16: bool = False, trt_max_batch: int = 1024, trt_opt_batch: int = 256,
                 validate: bool = True, int8: bool = False, int8_scoring: bool = False,
                 rescore: int = 0) -> ExportReport:
    """Export a model file to a validated ONNX graph (and optionally a TensorRT engine).

    ``optimize``: the fused graph with ONNX Runtime contrib ops (``export/fusion.py``), for
    ONNX Runtime only. ``int8``: MatMuls dynamically quantized (``export/quantize.py``; the
    scoring MatMul too with ``int8_scoring``; of the fused graph with ``optimize``), validated
    by top-k overlap. ``rescore`` C: the
    two-stage top-k (``export/catalogue.py``: int8 candidates, the top C rescored exactly),
    validated by top-k overlap."""
    model, ckpt = load_checkpoint(checkpoint)
    cfg = model.cfg
    if not 1 <= k <= cfg.num_items:
        raise ExportError(f"--k {k} must be between 1 and the number of items ({cfg.num_items})")
    if (optimize or int8 or rescore) and (trt_engine or fp16):
        raise ExportError("--optimize, --int8 and --rescore write ONNX Runtime graphs: TensorRT and --fp16 need "
                          "the standard fp32 graph")
    if rescore and not k <= rescore:
        raise ExportError(f"--rescore {rescore} must be at least --k {k}")
    if trt_engine:
        if k > TRT_MAX_K:
            raise ExportError(f"--k {k} exceeds TensorRT's TopK limit of {TRT_MAX_K}; use a smaller --k for --trt")
        from .tensorrt import import_tensorrt

        import_tensorrt()  # fail before writing anything when TensorRT is missing
    spec = graph_spec(k=k, d=cfg.hidden_size, steps=model.steps, stochastic=stochastic, fp16=fp16, opset=opset)
    out = Path(out)
    report = ExportReport(path=str(out), spec=asdict(spec))
    vocab = Vocab.from_dict(ckpt["vocab"])
    if vocab_sidecar is None:
        vocab_sidecar = len(vocab) > VOCAB_INLINE_MAX
    meta = {
        "cddrec_format_version": str(GRAPH_FORMAT_VERSION),
        "graph_kind": spec.kind,
        "T": str(model.steps), "K": str(k), "d": str(cfg.hidden_size), "L": str(cfg.max_len),
        "num_items": str(cfg.num_items),
        "inputs": json.dumps({t.name: [t.dtype, list(t.shape)] for t in spec.inputs}),
        "weights_sha256": weights_checksum(model),
        "popular_topk": popular_topk(ckpt.get("popularity"), vocab, max(k, 100)),
        "export_settings": {"opset": opset, "fp16": fp16, "stochastic": stochastic, "optimize": optimize,
                            "int8": int8, "int8_scoring": int8_scoring, "rescore": rescore,
                            "exporter": exporter, "torch": torch.__version__, "cddrec": __version__,
                            "mask_score": MASK_SCORE, "source": str(checkpoint)},
        "config": ckpt["config"],
    }
    if vocab_sidecar:
        meta["vocab_file"] = out.with_suffix(".vocab.json").name
    else:
        meta["vocab"] = vocab.to_dict()
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        if optimize or rescore:  # the standard graph's op counts, then the fused or two-stage graph in its place
            build_graph(model, tmp, spec, exporter)
            report.ops = op_counts(onnx.load(str(tmp)))
        build_graph(model, tmp, spec, exporter, fusions=DEFAULT_FUSIONS if optimize else None, rescore=rescore)
        if int8:
            from .quantize import quantize_graph

            report.ops = report.ops or op_counts(onnx.load(str(tmp)))  # counts before quantization
            fp32 = tmp.with_name(tmp.name + ".fp32")
            try:
                tmp.replace(fp32)
                report.int8 = quantize_graph(fp32, tmp, cfg.num_rows, quantize_scoring=int8_scoring)
            finally:
                fp32.unlink(missing_ok=True)
        add_metadata(tmp, meta)
        if optimize or int8 or rescore:
            report.ops_optimized = op_counts(onnx.load(str(tmp)))
        report.export_seconds = round(time.perf_counter() - t0, 3)
        if validate:
            ops_before = report.ops
            validate_graph(tmp, model, spec, report, approximate=int8 or bool(rescore))
            if optimize or int8 or rescore:
                report.ops_optimized, report.ops = report.ops, ops_before
        report.graph_bytes = tmp.stat().st_size
        if vocab_sidecar:
            sidecar = out.with_suffix(".vocab.json")
            atomic_write_json(sidecar, vocab.to_dict())
            report.vocab_sidecar = str(sidecar)
    if trt_engine:
        from .tensorrt import build_engine

        build_engine(out, trt_engine, spec, cfg.max_len, fp16=trt_fp16, max_batch=trt_max_batch,
                     opt_batch=trt_opt_batch)
        report.trt_engine = str(trt_engine)
    return report
