"""The model a server serves: its name, its versions, and the atomic swap to the newest one.

``--model`` is a graph file (name: its stem, version 1) or a model folder of versions, the layout
``cddrec-export --triton-repo`` writes (``NAME/1/model.onnx``, ``NAME/2/model.onnx``; the name is the
folder's), or a repository root holding exactly one such folder. The newest version (the largest
number whose folder holds the model file) is served.

``ModelRepository.reload`` loads the newest version beside the one serving (a thread: the event
loop and the engine keep going), warms it up (``Recommender.load``) and only then swaps the
reference the batches read: a batch reads the model once, when it starts, so requests in flight
finish on the old graph, later batches run on the new one, and the old one is closed once the
batches already handed to the engine are done (``Batcher.after_running``). A version that fails to load, validate or warm up
leaves the old one serving (the error says so).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cddrec.errors import ModelFileError
from cddrec.vocab import ascii_digits

from ..backends import backend_class, load_backend
from ..recommender import Recommender

log = logging.getLogger("cddrec.serve")
# the file a version folder holds, by what the backend reads (Triton's default names first)
MODEL_FILES = {"graph": ("model.onnx",), "engine": ("model.plan", "model.engine", "model.trt"),
               "model": ("model.pt",)}
PLATFORMS = {"graph": "onnxruntime_onnx", "engine": "tensorrt_plan", "model": "pytorch"}
SMALL_BATCH = 4  # batches of at most this many users run on a session of their own (small_batch_threads)


@dataclass
class ModelSource:
    """Where the versions of one model live: a single file, or a folder of numbered versions."""

    name: str
    file: Path | None = None
    folder: Path | None = None
    reads: str = "graph"

    def versions(self) -> dict[int, Path]:
        """version -> model file, oldest first (version folders without the model file are skipped)."""
        if self.file is not None:
            return {1: self.file}
        out = {}
        for d in self.folder.iterdir():
            if d.is_dir() and ascii_digits(d.name):
                f = next((d / n for n in MODEL_FILES[self.reads] if (d / n).is_file()), None)
                if f is not None:
                    out[int(d.name)] = f
        return dict(sorted(out.items()))

    def newest(self) -> tuple[int, Path]:
        versions = self.versions()
        if not versions:
            raise ModelFileError(f"{self.folder}: no version folder holds {' or '.join(MODEL_FILES[self.reads])} "
                                 f"(expected {self.folder}/1/{MODEL_FILES[self.reads][0]}, as --triton-repo writes)")
        return max(versions.items())


def model_source(path: str | Path, name: str | None = None, backend: str = "ort-cpu") -> ModelSource:
    """The model behind ``--model``: a file, a model folder of versions, or a repository root with one model."""
    path = Path(path)
    reads = getattr(backend_class(backend), "reads", "graph")
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or folder")
    if path.is_file():
        return ModelSource(name or path.stem, file=path, reads=reads)

    def has_versions(d: Path) -> bool:
        return any(v.is_dir() and ascii_digits(v.name) for v in d.iterdir())

    folder = path
    if not has_versions(path):
        models = [d for d in path.iterdir() if d.is_dir() and has_versions(d)]
        if len(models) != 1:
            raise ModelFileError(f"{path}: expected a model file, a model folder of versions (NAME/1/"
                                 f"{MODEL_FILES[reads][0]}, NAME/2/...) or a repository with one such folder; "
                                 f"found {len(models)} model folders")
        folder = models[0]
    return ModelSource(name or folder.name, folder=folder, reads=reads)


@dataclass
class ServedModel:
    name: str
    version: int
    path: Path
    rec: Recommender
    loaded_at: float
    small: Recommender | None = None  # a one-thread session of the same graph for batches of few users

    @property
    def contract(self):
        return self.rec.contract

    def for_batch(self, users: int) -> Recommender:
        """The session a batch of ``users`` runs on: up to SMALL_BATCH users, the small-batch session
        (the backend's ``small_batch_threads``), else the main one."""
        return self.small if self.small is not None and users <= SMALL_BATCH else self.rec

    def close(self) -> None:
        self.rec.close()
        if self.small is not None:
            self.small.close()


class ModelRepository:
    """One model's versions; ``current`` is what new batches run on."""

    def __init__(self, source: ModelSource, backend: str = "ort-cpu", threads: int = 0, options: dict | None = None):
        self.source, self.backend, self.threads, self.options = source, backend, threads, dict(options or {})
        self.platform = PLATFORMS.get(source.reads, source.reads)
        self.current: ServedModel | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def name(self) -> str:
        return self.source.name

    def load_newest(self) -> ServedModel:
        """Open and warm up the newest version (blocking); the current one is untouched."""
        version, path = self.source.newest()
        t0 = time.perf_counter()
        rec = Recommender.load(path, backend=self.backend, threads=self.threads, **self.options)
        small = None
        small_threads = type(rec.backend).small_batch_threads(self.threads)
        if small_threads is not None:
            opts = {**self.options, "threads": small_threads}
            small = Recommender(load_backend(path, self.backend, warmup=True, **opts), rec.info, rec.max_history)
            small.mapper = rec.mapper
        log.info("loaded %s version %d (%s) in %.2f s", self.name, version, path, time.perf_counter() - t0)
        return ServedModel(self.name, version, path, rec, time.time(), small)

    def open(self) -> ServedModel:
        self.current = self.load_newest()
        return self.current

    async def reload(self, retire=None) -> tuple[ServedModel, ServedModel]:
        """Load the newest version in a thread, then swap it in; returns (old, new). ``retire(fn)`` runs
        ``fn`` once the batches already started are answered (the batcher's ``after_running``); the old
        model is closed then. A failure raises ``ModelFileError`` and leaves the current version serving."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            old = self.current
            try:
                new = await asyncio.to_thread(self.load_newest)
            except Exception as e:  # noqa: BLE001 - whatever the new version does, the old one keeps serving
                raise ModelFileError(f"reload of {self.name} failed, version {old.version} keeps serving: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            self.current = new  # one reference assignment: a batch sees the old model or the new one
            if retire is not None:
                retire(old.close)
            else:
                old.close()
            return old, new

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
