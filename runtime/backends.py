"""Inference backends behind one interface with a lifecycle, so any two compare and any one serves.

Every backend is a class with:

- ``load(path, *, k, threads, **options)`` (classmethod): open a graph, an engine or a model file;
- ``warmup()``: create sessions, capture graphs and run each shape it will serve once, so the
  first live request does not pay for it; returns the seconds it took (``warmup_seconds``);
- ``infer(feed) -> outputs``: ``feed`` maps the contract's input names to numpy arrays
  (``item_ids`` (B, S) int64, optionally ``noise`` (T, B, d) float32); outputs map the contract's
  output names: ``top_items`` (B, K) int64, ``top_scores`` (B, K) float32, ``user_embedding`` (B, d);
- ``close()``: release sessions and device memory (also as a context manager).

It declares ``contract`` (``cddrec.contract.GraphContract``: the names, K, L and precision it
serves), ``name``, ``device`` ("cpu" | "cuda"), ``reads`` ("graph" | "engine" | "model") and
``unavailable()``, why it cannot run on this machine (None when it can), and its serving policy,
which callers read from the class instead of testing names: ``max_history`` (the longest history
it serves; longer ones keep their most recent items), ``takes_tf32``, ``serving_options(tf32)``
(the options batch and online serving load it with: ``engine_options``) and
``small_batch_threads(threads)`` (a second session for batches of few users, or None).

Built in, torch-free: ``ort-cpu``, ``ort-cuda`` and ``ort-cuda-graph`` (ONNX Runtime on an
exported graph; the last replays captured CUDA graphs per batch bucket) and ``trt`` (a TensorRT
engine). Other backends come from the entry-point group ``cddrec.backends``: this project's
PyTorch backends (``torch``, ``torch-fast``, ``torch-compile``, ``torch-cuda``,
``torch-cuda-fp16``, in ``cddrec.export.torch_serving``) are registered there by ``setup.py``, as a
third-party package would register its own; this package never names them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from cddrec.contract import GraphContract
from cddrec.errors import BackendUnavailable, ModelFileError, first_line

from .buckets import DEFAULT_BUCKETS, check_buckets, run_bucketed
from .session import available_cores, cuda_provider_available, import_ort, ort_session, session_io

ENTRY_POINT_GROUP = "cddrec.backends"
WARMUP_BATCHES = (1, 64)  # shapes a dynamic-shape backend runs once at load


class BackendBase:
    """What every backend shares: names from the contract, a default warm-up, close, context manager."""

    name: ClassVar[str] = "backend"
    device: ClassVar[str] = "cpu"
    reads: ClassVar[str] = "graph"
    max_history: ClassVar[int | None] = None  # longest history served (None: any length)
    takes_tf32: ClassVar[bool] = False  # takes the option tf32=True (TF32 matmuls on CUDA)
    contract: GraphContract
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0

    @classmethod
    def serving_options(cls, tf32: bool = False) -> dict:
        """The options batch serving (cddrec-infer, Ray) and online serving (cddrec-serve) load this
        backend with; ``tf32`` only where ``takes_tf32``."""
        if tf32 and not cls.takes_tf32:
            raise ValueError(tf32_problem(cls.name))
        return {"tf32": True} if tf32 else {}

    @classmethod
    def small_batch_threads(cls, threads: int) -> int | None:
        """Threads of a second session of the same model that a server runs batches of few users on
        (None: no second session)."""
        return None

    concurrent_runs: ClassVar[bool] = False  # one loaded backend may run batches from several threads at once

    @classmethod
    def serving_instances(cls, threads: int, instances: int, cores: int | None = None) -> tuple[int, int]:
        """(engine instances, threads each) of a server asked for ``--threads`` and ``--instances``
        (0: the backend's choice), on ``cores`` (default: the cores this process may use). Here one
        instance: its runs cannot overlap (a captured CUDA graph replays into fixed buffers) or have
        not been measured side by side."""
        if instances > 1 and not cls.concurrent_runs:
            raise ValueError(f"{cls.name} runs one batch at a time: use --instances 1, not {instances}")
        return 1, threads

    @classmethod
    def load(cls, path: str | Path, *, k: int | None = None, threads: int = 0, **options) -> "BackendBase":
        return cls(path, k=k, threads=threads, **options)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run here (a missing library or device), None when it can."""
        return None

    @property
    def input_names(self) -> list[str]:
        return self.contract.input_names

    @property
    def output_names(self) -> list[str]:
        return self.contract.output_names

    def warmup_feeds(self) -> list[dict[str, np.ndarray]]:
        """Inputs of every shape this backend should have seen before serving (padding-only histories)."""
        c = self.contract
        feeds = []
        for b in WARMUP_BATCHES:
            feed = {"item_ids": np.zeros((b, c.max_len), dtype=np.int64)}
            if c.stochastic:
                feed["noise"] = np.zeros((c.steps, b, c.hidden), dtype=np.float32)
            feeds.append(feed)
        return feeds

    def warmup(self) -> float:
        t0 = time.perf_counter()
        for feed in self.warmup_feeds():
            self.infer(feed)
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ registry
def _trt_class():
    from .trt_backend import TrtBackend

    return TrtBackend


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    try:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # noqa: BLE001 - a broken third-party distribution must not break serving
        return {}


def available_backends() -> dict[str, str]:
    """Every backend name this installation knows -> where it comes from (built in, or an entry point)."""
    names = {name: "cddrec.runtime" for name in BUILTIN}
    for name, ep in _entry_points().items():
        names.setdefault(name, ep.value)
    return names


def backend_class(name: str) -> type:
    """The class registered as ``name``; ``BackendUnavailable`` when its module cannot be imported."""
    if name in BUILTIN:
        target = BUILTIN[name]
        return target() if not isinstance(target, type) else target
    eps = _entry_points()
    if name not in eps:
        raise ValueError(f"backend must be one of {', '.join(sorted(available_backends()))}, got {name!r}")
    try:
        return eps[name].load()
    except ImportError as e:
        what = e.name or "a missing module"
        hint = "pip install 'cddrec[train]'" if what.split(".")[0] in ("torch", "onnx") else str(e)
        raise BackendUnavailable(f"backend {name!r} needs {what} ({hint})") from e


def runnable_backends(builtin_only: bool = False) -> list[str]:
    """The backends this machine can run (their libraries import and their device is present).

    ``builtin_only``: only this package's own backends, without loading any entry point (loading the
    torch backends' entry points imports torch)."""
    out = []
    for name in (BUILTIN if builtin_only else available_backends()):
        try:
            if backend_class(name).unavailable() is None:
                out.append(name)
        except BackendUnavailable:
            continue
    return out


def engine_options(backend: str, tf32: bool = False) -> dict:
    """The options ``backend`` serves with (``serving_options`` of its class)."""
    return backend_class(backend).serving_options(tf32)


def tf32_backends() -> list[str]:
    """The built-in backends that take ``tf32`` (named in messages; loads no entry point)."""
    return [name for name in BUILTIN if backend_class(name).takes_tf32]


def tf32_problem(backend: str) -> str | None:
    """Why ``backend`` does not take ``tf32`` ("tf32 applies to ..., not NAME"), None when it does."""
    try:
        if backend_class(backend).takes_tf32:
            return None
    except BackendUnavailable:
        pass
    return f"tf32 applies to {' and '.join(tf32_backends())}, not {backend}"


def load_backend(path: str | Path, backend: str = "ort-cpu", *, k: int | None = None, threads: int = 0,
                 warmup: bool = False, **options) -> BackendBase:
    """Open ``path`` with the backend called ``backend``; ``k`` is used by backends that build their
    graph from a model file (an exported graph's K is fixed); ``warmup`` runs ``warmup()`` before returning."""
    cls = backend_class(backend)
    be = cls.load(path, k=k, threads=threads, **options)
    if warmup:
        be.warmup()
    return be


# ------------------------------------------------------------------------ ONNX Runtime
class OrtBackend(BackendBase):
    """ONNX Runtime on an exported graph; on CUDA, inputs and outputs go through IO binding.

    Options: ``tf32`` (CUDA only; off by default: fp32 means fp32); ``cuda_graph=True`` (CUDA
    only) serves through captured CUDA graphs: one static-shape session per batch bucket
    (``buckets``, default ``DEFAULT_BUCKETS``; history length ``history``, default the graph's L),
    the CUDA provider's ``enable_cuda_graph``, input and output buffers allocated once on the
    device and bound with IO binding, inputs updated in place (``OrtValue.update_inplace``).
    Requests are padded up to the bucket (``cddrec.runtime.buckets``); rows with a longer history
    and graphs with a noise input run on the uncaptured session. ``buckets=`` without
    ``cuda_graph`` runs the same static-shape sessions uncaptured (on the CPU too: how the bucket
    path is tested without a GPU). Other options go to ``ort_session`` (``allow_spinning``,
    ``level``, ``cuda_options``, ...), merged with a session's own (``merge_options``). Loading
    checks the graph's inputs and outputs against its metadata (names, dtypes, sizes; with
    buckets also the names of the axes the static sessions fix) and refuses a mismatch in one line.
    ``warmup()`` (called by ``Recommender.load``) creates, and on CUDA captures, every bucket.
    """

    name = "ort-cpu"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0, *, cuda_graph: bool = False,
                 buckets=None, history: int | None = None, **session_kwargs):
        ort = import_ort()
        if cuda_graph and device != "cuda":
            raise ValueError("cuda_graph=True needs device 'cuda' (ort-cuda)")
        self.name = f"ort-{device}" + ("-graph" if cuda_graph else "")
        self.device = device
        t0 = time.perf_counter()
        self._ort, self._errors = ort, ort.capi.onnxruntime_pybind11_state
        self.path, self.threads, self.session_kwargs = path, threads, session_kwargs
        self.session = self._open(device)
        self.contract = GraphContract.from_metadata(self.metadata(), path)
        bucketed = cuda_graph or buckets is not None
        self._check_io(axis_names=bucketed)
        self.load_seconds = time.perf_counter() - t0
        self.cuda_graph = cuda_graph
        self.buckets: tuple[int, ...] | None = None
        self._static: dict[int, _StaticBucket] = {}
        if bucketed:
            if self.contract.stochastic:
                raise ValueError("captured/bucketed sessions serve deterministic graphs (this one takes noise)")
            self.buckets = check_buckets(DEFAULT_BUCKETS if buckets is None else buckets)
            self.history = int(history or self.contract.max_len)
            self.concurrent_runs = False  # one bound input/output buffer per bucket: runs must not overlap
            if self.history < 1:
                raise ValueError(f"history must be >= 1, got {history}")

    def _check_io(self, axis_names: bool) -> None:
        """The graph's inputs/outputs are the ones its cddrec metadata declares (names, dtypes, static
        sizes); with ``axis_names`` (static-shape sessions fix the axes by name) also the names of
        its dynamic axes. A ``ModelFileError`` of one line otherwise."""
        problems = self.contract.io_problems(*session_io(self.session), axis_names=axis_names, exact_sizes=False)
        if problems:
            raise ModelFileError(f"{self.path}: the graph does not match its cddrec metadata: {'; '.join(problems[:3])}"
                                 "; re-export it with cddrec-export")

    def _open(self, device: str, **extra):
        opts = merge_options(self.session_kwargs, extra)
        try:
            return ort_session(self.path, device, threads=self.threads, **opts)
        except tuple(getattr(self._errors, n) for n in ("Fail", "InvalidArgument", "InvalidProtobuf", "InvalidGraph",
                                                         "NoSuchFile", "NotImplemented", "RuntimeException", "EPFail")
                     if hasattr(self._errors, n)) as e:
            if (opts.get("cuda_options") or {}).get("enable_cuda_graph"):
                raise BackendUnavailable(f"{self.path}: ONNX Runtime cannot capture this graph as a CUDA graph "
                                         f"({first_line(e, 300)})") from None
            hint = ("; it looks like a model file (model.pt): export it with cddrec-export, or serve it with "
                    "--backend torch") if Path(self.path).suffix.lower() in (".pt", ".pth") else ""
            raise ModelFileError(f"{self.path}: ONNX Runtime cannot load it as a graph "
                                 f"({first_line(e, 200)}){hint}") from None

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def static_bucket(self, bucket: int) -> "_StaticBucket":
        """The static-shape session of ``bucket`` rows (created, and on CUDA captured, on first use)."""
        if bucket not in self._static:
            extra: dict = {"dims": {"batch": bucket, "history": self.history}}
            if self.cuda_graph:
                extra["cuda_options"] = {"enable_cuda_graph": "1"}
            sess = self._open(self.device, **extra)
            self._static[bucket] = _StaticBucket(self._ort, sess, self.device, bucket, self.history, self.contract)
        return self._static[bucket]

    def warmup_feeds(self) -> list[dict[str, np.ndarray]]:
        if self.buckets is None:
            return super().warmup_feeds()
        return [{"item_ids": np.zeros((b, self.history), dtype=np.int64)} for b in self.buckets]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.buckets is not None:
            return run_bucketed(np.asarray(feed["item_ids"], dtype=np.int64), self.buckets, self.history,
                                lambda b, ids: self.static_bucket(b).run(ids),
                                lambda ids: self._infer_dynamic({"item_ids": ids}))
        return self._infer_dynamic(feed)

    def _infer_dynamic(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names_in, names_out = self.contract.input_names, self.contract.output_names
        if self.device == "cuda":
            binding = self.session.io_binding()
            for name in names_in:
                binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(feed[name]), "cuda", 0))
            for name in names_out:
                binding.bind_output(name, "cuda", 0)
            self.session.run_with_iobinding(binding)
            return dict(zip(names_out, binding.copy_outputs_to_cpu()))
        outs = self.session.run(names_out, {n: feed[n] for n in names_in})
        return dict(zip(names_out, outs))

    def close(self) -> None:
        self._static.clear()
        self.session = None


def merge_options(caller: dict, own: dict) -> dict:
    """The caller's session options with a session's own on top; options that are dicts
    (``cuda_options``, ``dims``) are merged key by key, so neither side's entries are lost and no
    option reaches ``ort_session`` twice."""
    opts = dict(caller)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(opts.get(key), dict):
            opts[key] = {**opts[key], **value}
        else:
            opts[key] = value
    return opts


class OrtCpu(OrtBackend):
    name = "ort-cpu"

    def __init__(self, path, *, k=None, threads: int = 0, **kwargs):
        super().__init__(path, "cpu", threads, **kwargs)

    @classmethod
    def serving_options(cls, tf32: bool = False) -> dict:
        """ONNX Runtime's CPU threads do not spin between ops: a batch run's reader and writer threads
        and a server's event loop share the cores (spinning measured 20% slower end to end on 2 cores,
        benchmarks/results/infer_throughput_paper.md)."""
        return {**super().serving_options(tf32), "allow_spinning": False}

    @classmethod
    def small_batch_threads(cls, threads: int) -> int | None:
        """A one-thread session for batches of few users when the main one has several threads: a
        multi-threaded session that does not spin wakes its pool for each of the graph's ops, which
        costs more than the work of a batch of one."""
        return 1 if (threads or available_cores()) > 1 else None

    concurrent_runs = True  # InferenceSession.run is thread-safe (not so a bucketed one: see OrtBackend)

    @classmethod
    def serving_instances(cls, threads: int, instances: int, cores: int | None = None) -> tuple[int, int]:
        """By default one single-thread instance per core: this graph's ~900 small ops gain little from
        intra-op threads, and on 2 cores two one-thread runs side by side on one session did 1.25-1.83x
        the users/s of one two-thread run (batch 16-256; 1.07-1.16x when the host ran fast;
        benchmarks/results/serve_instances_cpu.md), and cddrec-infer 1.2x end to end.
        Given one of the two, the other divides the cores."""
        cores = cores or available_cores()
        if instances == 0:
            instances = max(1, cores // threads) if threads else cores
        return instances, threads or max(1, cores // instances)


class OrtCuda(OrtBackend):
    name, device = "ort-cuda", "cuda"
    takes_tf32 = True

    def __init__(self, path, *, k=None, threads: int = 0, **kwargs):
        super().__init__(path, "cuda", threads, **kwargs)

    @classmethod
    def unavailable(cls) -> str | None:
        return None if cuda_provider_available() else "onnxruntime-gpu with CUDA is not installed here"


class OrtCudaGraph(OrtCuda):
    name = "ort-cuda-graph"

    def __init__(self, path, *, k=None, threads: int = 0, **kwargs):
        OrtBackend.__init__(self, path, "cuda", threads, **{"cuda_graph": True, **kwargs})


class _StaticBucket:
    """One static-shape session (P, H) with its input and outputs allocated once on the device and
    bound once; a run updates the input in place, so a captured CUDA graph replays on the same
    addresses (ONNX Runtime's "Using CUDA Graphs" recipe)."""

    def __init__(self, ort, session, device: str, bucket: int, history: int, contract: GraphContract):
        self.session, self.device, self.shape = session, device, (bucket, history)
        self.input = ort.OrtValue.ortvalue_from_shape_and_type([bucket, history], np.int64, device, 0)
        self.outputs = {t.name: ort.OrtValue.ortvalue_from_shape_and_type(
            [bucket if s == "batch" else int(s) for s in t.shape], np.dtype(t.dtype).type, device, 0)
            for t in contract.outputs}
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(contract.input_names[0], self.input)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of ``ids`` (P, H) int64, as host arrays of their own."""
        if ids.shape != self.shape:
            raise ValueError(f"bucket input must be {self.shape}, got {ids.shape}")
        self.input.update_inplace(np.ascontiguousarray(ids, dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        # a CPU OrtValue's numpy() is a view of the bound buffer (the next run overwrites it): copy;
        # a CUDA one is copied to the host by numpy() itself
        return {name: (v.numpy().copy() if self.device == "cpu" else v.numpy()) for name, v in self.outputs.items()}


# name -> class (or a function returning it, for modules that import optional libraries)
BUILTIN = {"ort-cpu": OrtCpu, "ort-cuda": OrtCuda, "ort-cuda-graph": OrtCudaGraph, "trt": _trt_class}
