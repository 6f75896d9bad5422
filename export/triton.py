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

- ``version_policy: { specific { versions: 1 } }``: the server serves the version written and no
  other, whatever else a model folder ever held.

``vocab.json`` beside ``config.pbtxt`` is what a client needs: the item vocabulary (keys <-> ids),
the popularity top-k for histories with no known item, K, L and the tensor names; it is read by
``cddrec.runtime.triton_client.TritonClientCodec`` (the format is its ``FORMAT``). The graph's
metadata is read through ``cddrec.contract.serving_info``, serving's own reader.

The model folder is written as one unit: everything goes into a temporary folder beside it,
renamed into place at the end. An existing non-empty model folder is refused unless
``force=True`` (``cddrec-export --force``), which replaces it whole: no version, vocabulary or
config of an earlier export survives next to the new one (Triton's default policy, "latest",
would otherwise serve a stale graph of a higher version while clients map keys with the new
vocabulary).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from cddrec.contract import MASK_SCORE, MAX_HISTORY, serving_info
from cddrec.errors import ExportError, ModelFileError
from cddrec.io import atomic_folder, json_dumps
from cddrec.runtime.triton_client import FORMAT as CLIENT_FORMAT

from .metadata import read_metadata
from .tensorrt import nonstandard_ops

CLIENT_FORMAT_VERSION = 1
SIDECAR_NAME = "vocab.json"
PRECISIONS = ("FP32", "FP16")
VERSION = 1  # the one model version a repository folder holds

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
    """What a client needs from the graph's metadata (vocabulary, popularity top-k, K, L), read and
    checked by serving's own reader, ``cddrec.contract.serving_info``."""
    meta = read_metadata(proto)
    try:
        info = serving_info(meta, graph)
        settings = json.loads(meta.get("export_settings") or "{}")
    except ModelFileError as e:
        raise ExportError(str(e)) from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{graph}: metadata 'export_settings' is not valid JSON ({e.msg})") from None
    return {"K": info.K, "L": info.L, "kind": info.contract.kind, "vocab": info.vocab.to_dict(),
            "popular_topk": info.popular, "mask_score": settings.get("mask_score", MASK_SCORE)}


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
    cfg.version_policy.specific.versions.append(VERSION)  # this version and no other, ever
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


@dataclass(frozen=True)
class TritonOptions:
    """A Triton model repository written beside the exported graph (``cddrec-export --triton-repo``)."""

    repo: str | Path  # the repository folder; the model folder is REPO/NAME
    name: str = "cddrec"
    gpu: bool = True  # instance group KIND_GPU (else KIND_CPU)
    max_batch: int = 1024  # max_batch_size (0: no batching)
    tensorrt: bool = True  # the onnxruntime backend's TensorRT accelerator on GPU
    cuda_graphs: bool = False  # CUDA graphs through that accelerator (trt_cuda_graph_enable)
    opt_batch: int = 256  # the TensorRT profile's opt batch, and a preferred batch size
    precision: str | None = None  # TensorRT precision_mode; None: the graph's (FP16 for an --fp16 graph)
    force: bool = False  # replace an existing model folder whole

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.max_batch < 0:
            raise ExportError(f"--triton-max-batch must be >= 0 (0: no batching), got {self.max_batch}")
        if self.cuda_graphs and not (self.gpu and self.tensorrt):
            raise ExportError("--triton-cuda-graphs works through the TensorRT accelerator on GPU: not with "
                              "--triton-cpu or --triton-no-trt")

    @property
    def model_dir(self) -> Path:
        return Path(self.repo) / self.name

    def check(self, optimize: bool) -> Path:
        """Refuse before anything is written: a contrib-op graph (``optimize``) for the TensorRT
        accelerator, or an existing model folder without ``force``. Returns the model folder."""
        if optimize and self.gpu and self.tensorrt:
            raise ExportError("--triton-repo with the TensorRT accelerator needs a standard-op graph: drop --optimize "
                              "(or add --triton-cpu or --triton-no-trt)")
        return model_folder(self.repo, self.name, self.force)

    def write(self, graph: str | Path, fp16: bool = False) -> "TritonRepo":
        return write_triton_repo(graph, self.repo, self.name, gpu=self.gpu, max_batch=self.max_batch,
                                 force=self.force, tensorrt=self.tensorrt, cuda_graphs=self.cuda_graphs,
                                 opt_batch=self.opt_batch, precision=self.precision or ("FP16" if fp16 else "FP32"))


def check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ExportError(f"--triton-name must be a plain folder name, got {name!r}")


def model_folder(repo_dir: str | Path, name: str, force: bool = False) -> Path:
    """``REPO/NAME``, checked before anything is written: an existing model folder that is not
    empty is refused unless ``force`` (it is then replaced whole)."""
    check_name(name)
    model_dir = Path(repo_dir) / name
    if model_dir.exists() and not model_dir.is_dir():
        raise ExportError(f"{model_dir}: exists and is not a folder")
    if model_dir.is_dir() and any(model_dir.iterdir()) and not force:
        held = sorted(p.name for p in model_dir.iterdir())
        raise ExportError(f"{model_dir}: the Triton model folder exists (holding {', '.join(held[:5])}"
                          f"{', ...' if len(held) > 5 else ''}); add --force to replace it whole")
    return model_dir


def write_triton_repo(graph_path: str | Path, repo_dir: str | Path, name: str = "cddrec", *, gpu: bool = True,
                      max_batch: int = 1024, force: bool = False, **config_options) -> TritonRepo:
    """Write the model folder ``REPO/NAME`` as one unit: ``config.pbtxt``, ``1/model.onnx`` (a copy
    of the graph) and ``vocab.json`` (the client's sidecar), staged beside it and renamed into place.

    ``graph_path`` is an exported and validated cddrec graph; ``config_options`` go to
    ``build_model_config`` (``preferred_batch``, ``max_queue_delay_us``, ``tensorrt``,
    ``precision``, ``cuda_graphs``, ``workspace_bytes``, ``engine_cache``, ``opt_batch``, ...).
    A non-empty ``REPO/NAME`` is refused unless ``force``, which replaces it whole.
    """
    graph = Path(graph_path)
    model_dir = model_folder(repo_dir, name, force)
    proto = onnx.load(str(graph), load_external_data=False)
    info = read_client_info(graph, proto)
    if info["kind"] == "stochastic" and max_batch > 0:
        raise ExportError(f"{graph} is a stochastic graph: its noise input (T, batch, d) is not batched along the first "
                          "axis, which Triton batches along; use --triton-max-batch 0")
    config_options.setdefault("opt_history", info["L"])
    cfg = build_model_config(proto, graph, name, gpu=gpu, max_batch=max_batch, **config_options)
    from google.protobuf import text_format

    sidecar = {"format": CLIENT_FORMAT, "version": CLIENT_FORMAT_VERSION, "model_name": name,
               "input": proto.graph.input[0].name, "outputs": [o.name for o in proto.graph.output],
               "max_batch_size": max_batch, "K": info["K"], "L": info["L"], "max_history": MAX_HISTORY,
               "mask_score": info["mask_score"], "vocab": info["vocab"], "popular_topk": info["popular_topk"]}
    with atomic_folder(model_dir) as stage:
        (stage / str(VERSION)).mkdir()
        shutil.copyfile(graph, stage / str(VERSION) / "model.onnx")
        (stage / SIDECAR_NAME).write_text(json_dumps(sidecar), encoding="utf-8")
        (stage / "config.pbtxt").write_text(text_format.MessageToString(cfg), encoding="utf-8")
    return TritonRepo(model_dir, model_dir / "config.pbtxt", model_dir / str(VERSION) / "model.onnx",
                      model_dir / SIDECAR_NAME)
