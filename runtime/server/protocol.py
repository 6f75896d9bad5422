"""The Open Inference Protocol (KServe v2) over HTTP: JSON tensors and Triton's binary tensor data extension.

What a ``tritonclient.http`` program sends and reads, against the graph contract:

- a request body is a JSON object, optionally followed by binary tensor data; the header
  ``Inference-Header-Content-Length`` gives the JSON's length. An input with the parameter
  ``binary_data_size`` takes that many bytes of the binary part (inputs in order), little-endian,
  row major; otherwise its ``data`` holds the values (flat or nested, row major);
- ``outputs`` (optional) names the outputs wanted, each with ``binary_data`` (bool); the request
  parameter ``binary_data_output`` makes every output binary (tritonclient sets it when it names
  no outputs); without ``outputs`` every output of the graph comes back;
- a response with a binary output carries ``Inference-Header-Content-Length`` and
  ``"parameters": {"binary_data_size": N}`` on each binary output, its bytes after the JSON in
  output order.

Shared memory, classification and BYTES tensors are refused with a 400 saying so. Every check
names the field and what was expected (``ProtocolError``), so one bad request never reaches the
engine. The request parameter ``timeout`` (microseconds, as tritonclient sends it) shortens the
server's own per-request timeout.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import orjson

from cddrec.contract import GraphContract, TensorSpec
from cddrec.vocab import ascii_digits

# KServe v2 datatype <-> numpy dtype (BYTES, variable-length strings, has no numpy twin here)
DATATYPES = {"BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
             "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
             "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
             "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64)}
NUMPY_TO_KSERVE = {v: k for k, v in DATATYPES.items()}
HEADER_LENGTH = "inference-header-content-length"
NATIVE_LITTLE = sys.byteorder == "little"
SHARED_MEMORY = frozenset(("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"))
LITTLE = {d: d.newbyteorder("<") for d in DATATYPES.values()}


class ProtocolError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


_BY_NAME = {d.name: k for d, k in NUMPY_TO_KSERVE.items()}


def kserve_datatype(dtype: str | np.dtype) -> str:
    """The KServe datatype of a numpy dtype or its name (a dtype's ``name`` costs microseconds: looked up by the
    dtype itself first)."""
    if isinstance(dtype, str):
        return _BY_NAME.get(dtype) or NUMPY_TO_KSERVE[np.dtype(dtype)]
    return NUMPY_TO_KSERVE.get(dtype) or NUMPY_TO_KSERVE[dtype.newbyteorder("=")]


@dataclass(frozen=True)
class Tensors:
    """A contract's tensors, built once per contract (its ``inputs``/``outputs`` properties build new specs)."""

    inputs: dict  # name -> TensorSpec
    output_names: list
    dtypes: dict  # name -> numpy dtype
    plans: dict = field(default_factory=dict, compare=False)  # (JSON header, max_batch) -> Plan (see parse_infer)


@functools.lru_cache(maxsize=8)  # a few models over a server's life (reloads): bounded, no id()-keyed leak
def tensors_of(contract: GraphContract) -> Tensors:
    """The contract's tensors in the form the request decoder uses (computed once per contract)."""
    specs = {s.name: s for s in contract.inputs}
    return Tensors(specs, contract.output_names, {n: np.dtype(s.dtype) for n, s in specs.items()})


def kserve_shape(spec: TensorSpec) -> list[int]:
    """Shape with dynamic axes as -1, as Triton reports it."""
    return [-1 if isinstance(d, str) else int(d) for d in spec.shape]


@dataclass
class InferRequest:
    """A decoded ``/infer`` request: inputs checked against the contract, outputs wanted."""

    inputs: dict[str, np.ndarray]
    rows: int  # users (the batch axis)
    width: int  # history axis of item_ids
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # (name, binary)
    id: str | None = None
    timeout_s: float | None = None


def _json_header(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    if header_length is None:
        n = len(body)
    else:
        if not ascii_digits(header_length):  # int() would also read " 10", "+10", "1_0" and "١٠"
            raise ProtocolError(f"header Inference-Header-Content-Length must be an integer, got {header_length!r}")
        n = int(header_length)
        if not 0 <= n <= len(body):
            raise ProtocolError(f"header Inference-Header-Content-Length is {n} but the body has {len(body)} bytes")
    try:
        doc = orjson.loads(body[:n])
    except orjson.JSONDecodeError as e:
        hint = ("; binary tensor data after the JSON needs the header Inference-Header-Content-Length"
                if header_length is None and "content after document" in str(e) else "")
        raise ProtocolError(f"the request is not valid JSON ({e}){hint}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"the request must be a JSON object, got {type(doc).__name__}")
    return doc, memoryview(body)[n:]


def _params(obj: dict, where: str) -> dict:
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object, got {type(p).__name__}")
    return p


def _holds_bool(data: list) -> bool:
    """Whether a nested list holds a JSON true/false anywhere (numpy would read it as 0/1)."""
    stack = [data]
    while stack:
        for v in stack.pop():
            if v is True or v is False:
                return True
            if isinstance(v, list):
                stack.append(v)
    return False


def _shape(t: dict, spec: TensorSpec, where: str, max_batch: int) -> tuple[int, ...]:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ProtocolError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    expected = kserve_shape(spec)
    if len(shape) != len(expected) or any(e != -1 and s != e for s, e in zip(shape, expected)):
        raise ProtocolError(f"{where}: shape {shape} does not match the model's {expected} (-1: any size)")
    for s, axis in zip(shape, spec.shape):
        if axis == "batch" and not 1 <= s <= max_batch:
            raise ProtocolError(f"{where}: batch size {s} must lie in 1..{max_batch} (--max-batch)")
        if axis == "history" and s < 1:
            raise ProtocolError(f"{where}: the history axis must hold at least 1 item (left-padded with 0)")
    return tuple(shape)


def _tensor(t: dict, spec: TensorSpec, dtype: np.dtype, binary: memoryview, offset: int, max_batch: int,
            bools: bool = True) -> tuple[np.ndarray, int]:
    """The input's array and the new offset into the binary part (``bools``: the JSON may hold true/false)."""
    where = f"input '{spec.name}'"
    want = kserve_datatype(spec.dtype)
    if t.get("datatype") != want:
        raise ProtocolError(f"{where}: datatype must be {want}, got {t.get('datatype')!r}")
    shape = _shape(t, spec, where, max_batch)
    count = math.prod(shape)
    params = _params(t, where)
    if params and not SHARED_MEMORY.isdisjoint(params):
        raise ProtocolError(f"{where}: shared memory is not supported by cddrec-serve; send the data in the body")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int or size != count * dtype.itemsize:
            raise ProtocolError(f"{where}: binary_data_size must be {count * dtype.itemsize} ({count} x "
                                f"{dtype.itemsize}-byte {want}) for shape {list(shape)}, got {size!r}")
        if offset + size > len(binary):
            raise ProtocolError(f"{where}: {size} bytes of binary data expected after the JSON header, "
                                f"{len(binary) - offset} left")
        arr = np.frombuffer(binary[offset:offset + size], dtype=LITTLE[dtype]).astype(dtype, copy=False)
        return arr.reshape(shape), offset + size
    if "data" not in t:
        raise ProtocolError(f"{where}: no 'data' and no binary_data_size parameter")
    data = t["data"]
    if not isinstance(data, list) or (bools and _holds_bool(data)):
        raise ProtocolError(f"{where}: 'data' must be a flat or nested list of numbers (row major)")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise ProtocolError(f"{where}: 'data' must be a flat or nested list of numbers (row major)") from None
    kinds = "iu" if dtype.kind in "iu" else "iuf"
    if arr.size and arr.dtype.kind not in kinds:
        raise ProtocolError(f"{where}: 'data' must hold {'integers' if kinds == 'iu' else 'numbers'} for {want}")
    if arr.size != count:
        raise ProtocolError(f"{where}: 'data' holds {arr.size} values, shape {list(shape)} needs {count}")
    try:
        return arr.astype(dtype, casting="unsafe" if kinds == "iuf" else "same_kind").reshape(shape), offset
    except (OverflowError, TypeError):
        raise ProtocolError(f"{where}: 'data' values do not fit {want}") from None


@dataclass(frozen=True)
class Plan:
    """What a request's JSON header says when every input is binary and it has no ``id``: where each input's
    bytes lie and what they are. tritonclient sends the same header for every request of one shape, so a
    server decodes and checks it once; the bytes after it are read and checked for each request."""

    inputs: tuple  # (name, little-endian dtype, native dtype, shape, byte size) in body order
    binary_size: int
    rows: int
    width: int
    outputs: tuple
    timeout_s: float | None


MAX_PLANS = 256  # headers remembered per model; once full, a new header is decoded in full every time


def parse_infer(body: bytes, header_length: str | None, contract: GraphContract, max_batch: int) -> InferRequest:
    """Decode and check an infer request against ``contract``; ``ProtocolError`` (400) naming the field."""
    tables = tensors_of(contract)
    if header_length is not None and ascii_digits(header_length) and int(header_length) <= len(body):
        n = int(header_length)
        plan = tables.plans.get((body[:n], max_batch))
        if plan is not None:
            binary = memoryview(body)[n:]
            if len(binary) != plan.binary_size:
                raise ProtocolError(f"{plan.binary_size} bytes of binary data expected after the JSON header, "
                                    f"got {len(binary)}")
            arrays, offset = {}, 0
            for name, little, dtype, shape, size in plan.inputs:
                arrays[name] = np.frombuffer(binary[offset:offset + size], dtype=little).astype(
                    dtype, copy=False).reshape(shape)
                offset += size
            check_item_ids(arrays["item_ids"], contract.num_items)
            return InferRequest(arrays, plan.rows, plan.width, list(plan.outputs), None, plan.timeout_s)
    request, doc = _parse_infer(body, header_length, contract, max_batch, tables)
    _remember(request, doc, body, header_length, max_batch, tables)
    return request


def _remember(request: InferRequest, doc: dict, body: bytes, header_length: str | None, max_batch: int,
              tables: Tensors) -> None:
    """Keep the plan of a request whose inputs were all binary and which had no id (see ``Plan``)."""
    if request.id is not None or header_length is None or len(tables.plans) >= MAX_PLANS:
        return
    sizes = [(t.get("parameters") or {}).get("binary_data_size") for t in doc["inputs"]]
    if None in sizes:
        return
    inputs = tuple((t["name"], LITTLE[tables.dtypes[t["name"]]], tables.dtypes[t["name"]],
                    request.inputs[t["name"]].shape, size) for t, size in zip(doc["inputs"], sizes))
    tables.plans[(body[:int(header_length)], max_batch)] = Plan(inputs, sum(sizes), request.rows, request.width,
                                                                tuple(request.outputs), request.timeout_s)


def _parse_infer(body: bytes, header_length: str | None, contract: GraphContract, max_batch: int,
                 tables: Tensors) -> tuple[InferRequest, dict]:
    """The full decode and checks: the request and its JSON header."""
    doc, binary = _json_header(body, header_length)
    n = len(body) - len(binary)
    bools = body.find(b"true", 0, n) >= 0 or body.find(b"false", 0, n) >= 0  # else no list holds one: no walk
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise ProtocolError("'inputs' must be a non-empty list of tensor objects {name, shape, datatype, data}")
    specs = tables.inputs
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for t in inputs:
        name = t.get("name")
        if name not in specs:
            raise ProtocolError(f"unknown input {name!r}: this model takes "
                                + ", ".join(f"{s.name} ({kserve_datatype(s.dtype)} {kserve_shape(s)})"
                                            for s in contract.inputs))
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        arrays[name], offset = _tensor(t, specs[name], tables.dtypes[name], binary, offset, max_batch, bools)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input")
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise ProtocolError(f"missing input(s) {missing}: this model takes {list(specs)}")
    rows = _batch_rows(arrays, specs)
    check_item_ids(arrays["item_ids"], contract.num_items)
    params = _params(doc, "request")
    return InferRequest(arrays, rows, int(arrays["item_ids"].shape[1]), _outputs(doc, params, tables.output_names),
                        _request_id(doc), _timeout(params)), doc


def _batch_rows(arrays: dict[str, np.ndarray], specs: dict) -> int:
    sizes = {name: arrays[name].shape[spec.shape.index("batch")] for name, spec in specs.items()}
    if len(sizes) > 1 and len(set(sizes.values())) != 1:
        raise ProtocolError(f"inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def check_item_ids(ids: np.ndarray, num_items: int) -> None:
    """Item ids lie in 0..num_items (0 = padding); anything else would fail the engine for a whole batch."""
    if ids.size and int(ids.view(np.uint64).max()) > num_items:  # one pass: negatives wrap to huge values
        lo, hi = int(ids.min()), int(ids.max())
        raise ProtocolError(f"input 'item_ids': ids must lie in 0..{num_items} (0 = padding), got "
                            f"{lo if lo < 0 else hi}")


def _outputs(doc: dict, params: dict, names: list[str]) -> list[tuple[str, bool]]:
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ProtocolError("parameter 'binary_data_output' must be true or false")
    wanted = doc.get("outputs")
    if wanted is None:
        return [(n, default_binary) for n in names]
    if not isinstance(wanted, list) or not wanted or not all(isinstance(o, dict) for o in wanted):
        raise ProtocolError("'outputs' must be a non-empty list of objects {name, parameters} (leave it out for "
                            f"every output: {names})")
    out = []
    for o in wanted:
        name = o.get("name")
        if name not in names:
            raise ProtocolError(f"unknown output {name!r}: this model returns {names}")
        if any(name == n for n, _ in out):
            raise ProtocolError(f"output {name!r} is asked for twice")
        p = _params(o, f"output '{name}'")
        if p.get("classification"):
            raise ProtocolError(f"output '{name}': the classification extension is not supported")
        if not SHARED_MEMORY.isdisjoint(p):
            raise ProtocolError(f"output '{name}': shared memory is not supported by cddrec-serve")
        binary = p.get("binary_data", default_binary)
        if binary is not True and binary is not False:
            raise ProtocolError(f"output '{name}': parameter 'binary_data' must be true or false")
        out.append((name, binary))
    return out


def _request_id(doc: dict) -> str | None:
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(f"'id' must be a string, got {type(rid).__name__}")
    return rid


def _timeout(params: dict) -> float | None:
    t = params.get("timeout")
    if t is None:
        return None
    if type(t) is not int or t < 0:
        raise ProtocolError(f"parameter 'timeout' must be a non-negative integer (microseconds), got {t!r}")
    return t / 1e6 if t else None


def encode_infer_response(model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray]
                          ) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer response: JSON, then the binary outputs' bytes in output order."""
    items, blobs = [], []
    for name, binary in request.outputs:
        arr = np.ascontiguousarray(outputs[name])
        t = {"name": name, "datatype": kserve_datatype(arr.dtype), "shape": list(arr.shape)}
        if binary:
            raw = arr.tobytes() if NATIVE_LITTLE else arr.astype(LITTLE[arr.dtype], copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr.reshape(-1)
        items.append(t)
    doc = {"model_name": model, "model_version": version, "outputs": items}
    if request.id is not None:
        doc["id"] = request.id
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(head))}


def model_metadata(name: str, versions: list[str], contract: GraphContract, platform: str) -> dict:
    """``GET /v2/models/{name}``: name, versions, platform, inputs and outputs from the graph contract; its
    ``parameters`` add K, L, T, d, the number of items (ids 1..num_items, 0 = padding) and the graph kind."""
    def tensors(specs):
        return [{"name": s.name, "datatype": kserve_datatype(s.dtype), "shape": kserve_shape(s)} for s in specs]

    return {"name": name, "versions": versions, "platform": platform, "inputs": tensors(contract.inputs),
            "outputs": tensors(contract.outputs),
            "parameters": {"K": contract.k, "L": contract.max_len, "T": contract.steps, "d": contract.hidden,
                           "num_items": contract.num_items, "kind": contract.kind}}


def model_config(name: str, contract: GraphContract, max_batch: int, platform: str, instances: int = 1,
                 device: str = "cpu", threads: int = 0, policy=None, workers: int = 1, pinned: bool = False) -> dict:
    """``GET /v2/models/{name}/config``, as Triton's JSON model configuration: ``max_batch_size`` and
    dims without the batch axis when every tensor is batched along its first axis (else 0 and full dims);
    ``instance_group`` the engine instances (of every worker process); the parameters ``workers``
    (``--workers``), ``pinned`` (each worker bound to its share of the cores) and ``threads_per_instance``
    (0: the backend's default); with the batcher's
    ``policy``, the parameter ``idle_poll_ms`` and, for a batched graph, ``dynamic_batching`` from
    ``--max-wait-ms`` (here the wait applies once an engine instance frees), ``--max-queue`` (users here,
    where Triton counts requests) and ``--timeout-ms`` (from arrival to answer here, queueing only in
    Triton)."""
    batched = all(s.shape[0] == "batch" for s in contract.inputs + contract.outputs)

    def tensors(specs):
        return [{"name": s.name, "data_type": "TYPE_" + kserve_datatype(s.dtype),
                 "dims": kserve_shape(s)[1:] if batched else kserve_shape(s)} for s in specs]

    doc = {"name": name, "platform": platform, "max_batch_size": max_batch if batched else 0,
           "input": tensors(contract.inputs), "output": tensors(contract.outputs),
           "instance_group": [{"count": instances, "kind": "KIND_GPU" if device == "cuda" else "KIND_CPU"}],
           "parameters": {"threads_per_instance": {"string_value": str(threads)},
                          "workers": {"string_value": str(workers)},
                          "pinned": {"string_value": str(pinned).lower()}}}
    if policy is not None and batched:
        doc["dynamic_batching"] = {"max_queue_delay_microseconds": round(policy.max_wait_s * 1e6),
                                   "default_queue_policy": {"max_queue_size": policy.max_queue,
                                                            "default_timeout_microseconds":
                                                                round(policy.timeout_s * 1e6)}}
    if policy is not None:
        doc["parameters"]["idle_poll_ms"] = {"string_value": f"{policy.idle_poll_s * 1000:g}"}
    return doc
