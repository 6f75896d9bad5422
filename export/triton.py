"""A Triton Inference Server model repository from an exported, validated graph.

    write_triton_repo("model.onnx", "models", "cddrec")
    # models/cddrec/config.pbtxt, models/cddrec/1/model.onnx, models/cddrec/vocab.json

``config.pbtxt`` is a ``ModelConfig`` message (tritonclient's ``model_config_pb2``, generated from
triton-inference-server/common ``protobuf/model_config.proto``) printed with protobuf's
``text_format``, so every field name is checked by protobuf. What it says and where that is
documented:

- ``platform: "onnxruntime_onnx"``, ``backend: "onnxruntime"``; the graph is ``1/model.onnx``
  (server ``docs/user_guide/model_repository.md``, "ONNX Models").
- inputs and outputs with data types and dims read from the graph itself; with
  ``max_batch_size > 0`` the dims leave out the batch axis, dynamic axes are -1
  (``docs/user_guide/model_configuration.md``, "Inputs and Outputs", "Datatypes").
- ``dynamic_batching { preferred_batch_size max_queue_delay_microseconds }`` and
  ``instance_group [{ kind: KIND_GPU count: 1 }]`` (``KIND_CPU`` on request).
- on GPU, the onnxruntime backend's TensorRT accelerator: ``optimization { execution_accelerators
  { gpu_execution_accelerator [{ name: "tensorrt" parameters {...} }] } }`` with ``precision_mode``,
  ``max_workspace_size_bytes``, ``trt_engine_cache_enable`` and the ``trt_profile_{min,opt,max}_shapes``
  of the backend's parameter table (onnxruntime_backend ``README.md``, "ONNX Runtime with TensorRT
  optimization"). The graph must then be a standard-op graph: ``--optimize`` graphs hold ONNX
  Runtime contrib ops that TensorRT does not know.
- CUDA graphs: the onnxruntime backend documents them only as the TensorRT accelerator's
  ``trt_cuda_graph_enable`` (written with ``cuda_graphs=True``). ``optimization { cuda { graphs } }``
  is, per model_config.proto, "currently only recognized by TensorRT backend" (a no-op here), and
  the CUDA provider's ``enable_cuda_graph`` is not exposed by the onnxruntime backend (its issue
  #168), so neither is written. ONNX Runtime replays a captured graph on the input and output
  addresses it was captured with; check the outputs on a GPU before turning this on.

``vocab.json`` beside ``config.pbtxt`` is what a client needs: the item vocabulary (keys <-> ids),
the popularity top-k for histories with no known item, K, L and the tensor names; it is read by
``cddrec.runtime.triton_client.TritonClientCodec``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from cddrec.contract import MASK_SCORE, MAX_HISTORY
from cddrec.errors import ExportError
from cddrec.io import atomic_path, atomic_write_json, atomic_write_text

from .tensorrt import nonstandard_ops

CLIENT_FORMAT = "cddrec-triton-client"
CLIENT_FORMAT_VERSION = 1
SIDECAR_NAME = "vocab.json"
PRECISIONS = ("FP32", "FP16")

# ONNX element type -> Triton data type (model_configuration.md, "Datatypes")
_TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
}


def model_config_pb2():
    """tritonclient's ``model_config_pb2``.

    It lives in ``tritonclient.grpc``, whose ``__init__`` needs grpcio; the module itself needs
    only protobuf, so without grpcio it is loaded from its file.
    """
    try:
        return importlib.import_module("tritonclient.grpc.model_config_pb2")
    except (ImportError, RuntimeError):  # tritonclient.grpc raises RuntimeError without grpcio
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("--triton-repo needs tritonclient for Triton's model config schema: "
                          "pip install tritonclient protobuf")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.exists():
        raise ExportError(f"tritonclient has no {path}: pip install --upgrade tritonclient")
    mspec = importlib.util.spec_from_file_location("cddrec_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@dataclass(frozen=True)
class TritonRepo:
    model_dir: Path
    config: Path
    graph: Path
    sidecar: Path


def _dims(value_info) -> list:
    """Axis sizes of a graph input/output: an int, or the axis name of a dynamic axis."""
    return [d.dim_param if d.HasField("dim_param") or not d.HasField("dim_value") else int(d.dim_value)
            for d in value_info.type.tensor_type.shape.dim]


def _triton_type(value_info, graph: Path) -> str:
    elem = value_info.type.tensor_type.elem_type
    if elem not in _TRITON_TYPES:
        raise ExportError(f"{graph}: {value_info.name} has ONNX element type {onnx.TensorProto.DataType.Name(elem)}, "
                          "which has no Triton data type")
    return _TRITON_TYPES[elem]


def _triton_dims(name: str, dims: list, batched: bool, graph: Path) -> list[int]:
    if batched:
        if not dims or isinstance(dims[0], int):
            raise ExportError(f"{graph}: {name} has shape {dims}; Triton batches along the first axis, which must be "
                              "the dynamic batch axis: use --triton-max-batch 0 (no batching) for this graph")
        dims = dims[1:]
    return [-1 if isinstance(d, str) else d for d in dims]


def _profile_shapes(inputs: list, batch: tuple[int, int, int], history: tuple[int, int, int], graph: Path) -> list[str]:
    """TensorRT profile shapes in the backend's format ``name:d1xd2,...`` (min, opt, max)."""
    ranges = {"batch": batch, "history": history}
    out = []
    for i in range(3):
        parts = []
        for vi in inputs:
            dims = []
            for d in _dims(vi):
                if isinstance(d, int):
                    dims.append(d)
                elif d in ranges:
                    dims.append(ranges[d][i])
                else:
                    raise ExportError(f"{graph}: {vi.name} has a dynamic axis {d!r} that is neither batch nor history")
            parts.append(f"{vi.name}:{'x'.join(map(str, dims))}")
        out.append(",".join(parts))
    return out


def read_client_info(graph: Path, proto: onnx.ModelProto) -> dict:
    """What a client needs from the graph's metadata: vocabulary, popularity top-k, K, L."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if "cddrec_format_version" not in meta:
        raise ExportError(f"{graph}: not a cddrec export (no cddrec metadata); export a model with cddrec-export")
    if "vocab" in meta:
        vocab = json.loads(meta["vocab"])
    elif "vocab_file" in meta:
        side = graph.parent / meta["vocab_file"]
        if not side.exists():
            raise ExportError(f"{graph}: its item vocabulary {side} is missing (keep it beside the graph)")
        vocab = json.loads(side.read_text())
    else:
        raise ExportError(f"{graph}: cddrec metadata has no item vocabulary")
    settings = json.loads(meta.get("export_settings", "{}"))
    return {"K": int(meta["K"]), "L": int(meta["L"]), "kind": meta.get("graph_kind", "deterministic"),
            "vocab": {"keys": list(vocab["keys"]), "key_type": vocab.get("key_type", "str")},
            "popular_topk": json.loads(meta.get("popular_topk", "[]")),
            "mask_score": settings.get("mask_score", MASK_SCORE)}


def build_model_config(proto: onnx.ModelProto, graph: Path, name: str, *, gpu: bool = True, max_batch: int = 1024,
                       preferred_batch: tuple[int, ...] | None = None, max_queue_delay_us: int = 100,
                       tensorrt: bool = True, precision: str = "FP32", cuda_graphs: bool = False,
                       workspace_bytes: int = 1 << 30, engine_cache: bool = True, opt_batch: int = 256,
                       opt_history: int = 20, max_history: int = MAX_HISTORY):
    """The ``ModelConfig`` message of a graph (see the module docstring for every setting)."""
    pb = model_config_pb2()
    if max_batch < 0:
        raise ExportError(f"--triton-max-batch must be >= 0 (0: no batching), got {max_batch}")
    if precision not in PRECISIONS:
        raise ExportError(f"TensorRT precision_mode must be one of {PRECISIONS}, got {precision!r}")
    if cuda_graphs and not (gpu and tensorrt):
        raise ExportError("CUDA graphs in Triton's onnxruntime backend come with the TensorRT accelerator on GPU "
                          "(trt_cuda_graph_enable): not with --triton-cpu or without TensorRT")
    if gpu and tensorrt:
        bad = nonstandard_ops(proto)
        if bad:
            raise ExportError(f"{graph} holds ONNX Runtime contrib ops {bad} (an --optimize graph) that TensorRT does "
                              "not know: write the Triton repository from a graph exported without --optimize")
    cfg = pb.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=max_batch)
    batched = max_batch > 0
    for vi in proto.graph.input:
        cfg.input.add(name=vi.name, data_type=pb.DataType.Value(_triton_type(vi, graph)),
                      dims=_triton_dims(vi.name, _dims(vi), batched, graph))
    for vi in proto.graph.output:
        cfg.output.add(name=vi.name, data_type=pb.DataType.Value(_triton_type(vi, graph)),
                       dims=_triton_dims(vi.name, _dims(vi), batched, graph))
    if batched:
        opt_batch = min(opt_batch, max_batch)
        sizes = preferred_batch or (opt_batch, max_batch)
        if any(not 1 <= b <= max_batch for b in sizes):
            raise ExportError(f"preferred batch sizes {list(sizes)} must lie in 1..max_batch_size ({max_batch})")
        cfg.dynamic_batching.preferred_batch_size.extend(sorted(set(sizes)))
        cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(kind=kind, count=1)
    if gpu and tensorrt:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = precision
        acc.parameters["max_workspace_size_bytes"] = str(int(workspace_bytes))
        if engine_cache:
            acc.parameters["trt_engine_cache_enable"] = "1"
        profile_max_batch = max_batch or 1024
        lo, opt, hi = _profile_shapes(list(proto.graph.input), (1, min(opt_batch, profile_max_batch), profile_max_batch),
                                      (1, opt_history, max(max_history, opt_history)), graph)
        acc.parameters["trt_profile_min_shapes"] = lo
        acc.parameters["trt_profile_opt_shapes"] = opt
        acc.parameters["trt_profile_max_shapes"] = hi
        if cuda_graphs:
            acc.parameters["trt_cuda_graph_enable"] = "1"
    return cfg


def write_triton_repo(graph_path: str | Path, repo_dir: str | Path, name: str = "cddrec", *, gpu: bool = True,
                      max_batch: int = 1024, **config_options) -> TritonRepo:
    """Write ``REPO/NAME/config.pbtxt``, ``REPO/NAME/1/model.onnx`` (a copy of the graph) and
    ``REPO/NAME/vocab.json`` (the client's sidecar), each atomically.

    ``graph_path`` is an exported and validated cddrec graph; ``config_options`` go to
    ``build_model_config`` (``preferred_batch``, ``max_queue_delay_us``, ``tensorrt``,
    ``precision``, ``cuda_graphs``, ``workspace_bytes``, ``engine_cache``, ``opt_batch``, ...).
    """
    graph = Path(graph_path)
    if not name or "/" in name or name in (".", ".."):
        raise ExportError(f"--triton-name must be a plain folder name, got {name!r}")
    proto = onnx.load(str(graph), load_external_data=False)
    info = read_client_info(graph, proto)
    if info["kind"] == "stochastic" and max_batch > 0:
        raise ExportError(f"{graph} is a stochastic graph: its noise input (T, batch, d) is not batched along the first "
                          "axis, which Triton batches along; use --triton-max-batch 0")
    config_options.setdefault("opt_history", info["L"])
    cfg = build_model_config(proto, graph, name, gpu=gpu, max_batch=max_batch, **config_options)
    from google.protobuf import text_format

    model_dir = Path(repo_dir) / name
    out_graph = model_dir / "1" / "model.onnx"
    with atomic_path(out_graph) as tmp:
        shutil.copyfile(graph, tmp)
    sidecar = model_dir / SIDECAR_NAME
    atomic_write_json(sidecar, {
        "format": CLIENT_FORMAT, "version": CLIENT_FORMAT_VERSION, "model_name": name,
        "input": proto.graph.input[0].name, "outputs": [o.name for o in proto.graph.output],
        "max_batch_size": max_batch, "K": info["K"], "L": info["L"], "max_history": MAX_HISTORY,
        "mask_score": info["mask_score"], "vocab": info["vocab"], "popular_topk": info["popular_topk"]})
    config = model_dir / "config.pbtxt"
    atomic_write_text(config, text_format.MessageToString(cfg))  # last: a repo with a config is complete
    return TritonRepo(model_dir, config, out_graph, sidecar)
