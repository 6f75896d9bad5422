"""TensorRT engines from an exported graph (TensorRT 10 name-based API).

The engine gets one optimization profile: batch min 1 / opt / max, history min 1 / opt L /
max ``max_history`` (512); fp16 optional. Without the ``tensorrt`` package the functions raise
``TensorRTUnavailable`` with what to install.
"""

from __future__ import annotations

from pathlib import Path

from cddrec.contract import MAX_HISTORY, TRT_MAX_K, GraphContract
from cddrec.errors import BackendUnavailable
from cddrec.io import atomic_path, atomic_write_json


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


def build_engine(onnx_path: str | Path, engine_path: str | Path, contract: GraphContract, *,
                 fp16: bool = False, max_batch: int = 1024, opt_batch: int = 256, max_history: int | None = None,
                 workspace_gb: float = 2.0) -> Path:
    """Parse the ONNX graph and write a serialized engine (atomically)."""
    if contract.k > TRT_MAX_K:
        raise ValueError(f"K={contract.k} exceeds TensorRT's TopK limit of {TRT_MAX_K}")
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
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
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    engine_path = Path(engine_path)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(blob))
    write_engine_meta(onnx_path, engine_path)
    return engine_path


def write_engine_meta(onnx_path: str | Path, engine_path: str | Path) -> Path:
    """Copy the graph's metadata to ``ENGINE.meta.json`` (engines carry none)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if "vocab_file" in meta:  # the sidecar sits beside the graph: point at it from the engine's folder
        meta["vocab_file"] = str(Path(onnx_path).with_name(meta["vocab_file"]).resolve())
    out = Path(engine_path).with_name(Path(engine_path).name + ".meta.json")
    atomic_write_json(out, meta)
    return out
