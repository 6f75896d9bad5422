"""TensorRT engines from an exported graph, written against the API common to TensorRT 10 and 11.

What that common API is (NVIDIA/TensorRT ``include/NvInfer.h`` and ``python/src/infer/pyCore.cpp``
at the 10.16 and 11.1 releases, ``samples/python``):

- networks are created with ``create_network(1 << STRONGLY_TYPED)``: explicit batch is the only
  mode in both (``EXPLICIT_BATCH`` is deprecated and ignored in 10, gone in 11); TensorRT 11 is
  always strongly typed (the flag is kept and ignored), so both build strongly typed networks and
  the engine's precision is the graph's: an fp16 engine comes from an ``--fp16`` graph.
  ``BuilderFlag.FP16`` is deprecated in 10 and removed in 11, so it is never used.
- TF32 is on by default in both; it is cleared (fp32 means fp32) unless ``tf32=True``.
- ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``, one optimization profile
  (``create_optimization_profile``/``set_shape``/``add_optimization_profile``) and
  ``build_serialized_network``.

The engine gets one profile: batch min 1 / opt / max, history min 1 / opt L / max ``max_history``
(512). TensorRT's ONNX parser knows only standard ONNX ops: a graph written with ``--optimize``
holds ONNX Runtime contrib ops (com.microsoft Attention, MultiHeadAttention, BiasGelu) and is refused, as
are the int8 and two-stage graphs (``--int8``, ``--rescore``). Without
the ``tensorrt`` package the functions raise ``TensorRTUnavailable`` with what to install.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cddrec.contract import MAX_HISTORY, TRT_MAX_K, GraphContract, vocab_file_name
from cddrec.errors import BackendUnavailable, ExportError
from cddrec.io import atomic_path, atomic_write_json

STANDARD_DOMAINS = ("", "ai.onnx")


class TensorRTUnavailable(BackendUnavailable):
    pass


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed: pip install 'cddrec[gpu]' (or pip install tensorrt) on a machine "
            "with an NVIDIA GPU and CUDA; the ONNX graph runs without it on ONNX Runtime") from e
    return trt


def nonstandard_ops(model) -> list[str]:
    """``domain:op`` of every node outside the standard ONNX domain (ONNX Runtime contrib ops)."""
    return sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def check_trt_graph(onnx_path: str | Path) -> None:
    """Refuse a graph TensorRT's ONNX parser cannot read: contrib ops, or an ``--optimize`` export."""
    import onnx

    from .metadata import read_metadata

    proto = onnx.load(str(onnx_path), load_external_data=False)
    settings = json.loads(read_metadata(proto).get("export_settings", "{}"))
    bad = nonstandard_ops(proto)
    if bad or settings.get("optimize"):
        raise ExportError(f"{onnx_path} was written with --optimize and holds ONNX Runtime contrib ops "
                          f"({', '.join(bad) or 'an ORT-optimized graph'}) that TensorRT's ONNX parser does not know: "
                          "build the engine from a graph exported without --optimize")


def check_trt_request(k: int, *, optimize: bool, fp16: bool, trt_fp16: bool) -> None:
    """Refuse an ``--trt`` export that cannot work, before anything is written."""
    if k > TRT_MAX_K:
        raise ExportError(f"--k {k} exceeds TensorRT's TopK limit of {TRT_MAX_K}; use a smaller --k for --trt")
    if optimize:
        raise ExportError("--trt needs a standard-op graph, and --optimize writes ONNX Runtime contrib ops "
                          "(Attention, MultiHeadAttention, BiasGelu; --int8 and --rescore write ONNX Runtime graphs "
                          "too) that TensorRT's ONNX parser does not know: "
                          "export without --optimize for --trt (run cddrec-export twice for both)")
    if trt_fp16 and not fp16:
        raise ExportError("--trt-fp16 needs --fp16: TensorRT builds strongly typed networks (always in TensorRT 11), "
                          "so the engine's precision is the graph's")
    import_tensorrt()  # fail before writing anything when TensorRT is missing


def build_engine(onnx_path: str | Path, engine_path: str | Path, contract: GraphContract, *,
                 fp16: bool = False, max_batch: int = 1024, opt_batch: int = 256, max_history: int | None = None,
                 workspace_gb: float = 2.0, tf32: bool = False) -> Path:
    """Parse the ONNX graph and write a serialized engine (atomically).

    ``fp16`` states that the graph is an fp16 graph (``contract.fp16``); it adds nothing to the build.
    """
    k = contract.k
    if k > TRT_MAX_K:
        raise ExportError(f"K={k} exceeds TensorRT's TopK limit of {TRT_MAX_K}")
    if fp16 and not contract.fp16:
        raise ExportError("an fp16 engine needs an fp16 graph (cddrec-export --fp16): TensorRT builds strongly typed "
                          "networks, so the engine's precision is the graph's")
    check_trt_graph(onnx_path)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default in TensorRT 10 and 11
    max_len = contract.max_len
    max_history = max(max_history or MAX_HISTORY, max_len)
    opt_batch = min(opt_batch, max_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape("item_ids", (1, 1), (opt_batch, max_len), (max_batch, max_history))
    for t in contract.inputs[1:]:  # noise (T, batch, d)
        T, _, d = t.shape
        profile.set_shape(t.name, (T, 1, d), (T, opt_batch, d), (T, max_batch, d))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportError("TensorRT failed to build the engine (see the log above)")
    engine_path = Path(engine_path)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(blob))
    write_engine_meta(onnx_path, engine_path)
    return engine_path


def write_engine_meta(onnx_path: str | Path, engine_path: str | Path) -> Path:
    """Copy the graph's metadata to ``ENGINE.meta.json`` (engines carry none), and its vocabulary
    sidecar beside the engine when the engine is written in another folder (``vocab_file`` is a
    plain file name beside what it describes)."""
    from .metadata import read_metadata

    meta = read_metadata(onnx_path)
    if "vocab_file" in meta:  # a file name beside the graph, and beside the engine too: copied when elsewhere
        side = Path(onnx_path).with_name(vocab_file_name(meta, onnx_path))
        beside_engine = Path(engine_path).with_name(side.name)
        if beside_engine.resolve() != side.resolve():
            if beside_engine.exists() and beside_engine.read_bytes() != side.read_bytes():
                raise ExportError(f"{beside_engine} exists and is not the vocabulary of {onnx_path}: the engine needs "
                                  "its vocabulary beside it; write the engine in another folder")
            with atomic_path(beside_engine) as tmp:
                shutil.copyfile(side, tmp)
    out = Path(engine_path).with_name(Path(engine_path).name + ".meta.json")
    atomic_write_json(out, meta)
    return out
