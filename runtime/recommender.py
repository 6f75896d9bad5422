"""``Recommender``: original item keys in, top-k item keys and scores out, on any backend.

    rec = Recommender.load("model.onnx", backend="ort-cpu")
    rec.recommend([["B00123", "B00456"], [17, 42]], k=10)

Histories are oldest first. Keys are mapped with the model's vocabulary; unknown items are
dropped and counted; every known item is kept (the last L feed the model, all of them are
excluded from the ranking; a backend that declares a ``max_history``, as TensorRT engines do
(their profiles stop at ``MAX_HISTORY``), keeps the most recent ``max_history``). A history with
no known item gets the training popularity top-k, marked ``source="popularity"`` (its scores are
training counts). Torch-free: graphs are read through ``cddrec.contract`` and served by
``cddrec.runtime.backends``.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cddrec.contract import MASK_SCORE, ServingInfo, serving_info
from cddrec.errors import ModelFileError

from .backends import BackendBase, OrtBackend, load_backend
from .codec import (
    Encoded,
    KeyMapper,
    TopK,
    decode_rows,
    encode_histories,
    encode_one,
    fill_popular,
    history_problem,
    left_pad,
    popular_ids,
    source_of,
)

MAX_CELLS = 1 << 22  # padded ids per engine batch (32 MB of int64)


def read_serving_info(path: str | Path, backend: BackendBase | None = None) -> ServingInfo:
    """Contract, vocabulary and popularity of what ``backend`` serves: from the model file for the torch
    backends (``serving_info()``), else from the graph's (or engine's) metadata."""
    path = Path(path)
    if backend is None:
        backend = OrtBackend(path, "cpu", 1, level="disable")
    if hasattr(backend, "serving_info"):
        return backend.serving_info()
    return serving_info(backend.metadata(), path)


@dataclass
class Recommendation:
    items: list
    scores: list
    source: str = "model"  # "popularity": no history item was known; scores are training counts
    unknown: int = 0  # history items not in the vocabulary


class Recommender:
    def __init__(self, backend: BackendBase, info: ServingInfo, max_history: int | None = None, seed: int = 0,
                 instances: int = 1):
        if max_history is not None and (isinstance(max_history, bool) or not isinstance(max_history, int)
                                        or max_history < 1):
            raise ValueError(f"max_history must be a positive integer or None, got {max_history!r}")
        self.backend, self.info, self.max_history = backend, info, max_history
        self.mapper = KeyMapper(info.vocab)
        self.rng = np.random.default_rng(seed)  # the noise of a stochastic graph (sampled reverse chain)
        if instances > 1 and not backend.concurrent_runs:
            raise ValueError(f"{backend.name} runs one batch at a time: use --instances 1, not {instances}")
        self.instances = instances  # engine batches of one call run side by side on this many threads
        self._pool: ThreadPoolExecutor | None = None
        self.path: Path | None = None  # the model file it was loaded from (no output may replace it)

    @classmethod
    def load(cls, path: str | Path, backend: str = "ort-cpu", *, threads: int = 0, k: int | None = None,
             max_history: int | None = None, seed: int = 0, warmup: bool = True, instances: int = 1,
             **options) -> "Recommender":
        """Open a graph (ort-cpu, ort-cuda), an engine (trt) or a model file (torch backends), and warm
        it up (``backend.warmup_seconds`` says how long that took) unless ``warmup=False``.
        ``instances``: engine batches run side by side on that many threads (``threads`` each), where the
        backend's runs may overlap (``concurrent_runs``)."""
        path = Path(path)
        if not path.exists():
            raise ModelFileError(f"{path}: no such file")
        if path.is_dir():
            raise ModelFileError(f"{path}: is a directory, expected a model file")
        be = load_backend(path, backend, k=k, threads=threads, warmup=warmup, **options)
        if max_history is None:
            max_history = getattr(be, "max_history", None)  # the longest history the backend serves (None: any)
        rec = cls(be, read_serving_info(path, be), max_history, seed=seed, instances=instances)
        rec.path = path
        return rec

    @property
    def contract(self):
        return self.info.contract

    def startup_line(self) -> str:
        """How long opening the model and warming the backend up took (printed by cddrec-infer)."""
        be = self.backend
        threads = getattr(be, "threads", None)
        return (f"{be.name}: loaded in {be.load_seconds:.2f} s, warm-up {be.warmup_seconds:.2f} s"
                + (f" ({len(be.buckets)} batch buckets)" if getattr(be, "buckets", None) else "")
                + f"; {self.instances} engine instance(s)" + (f" x {threads} thread(s)" if threads else ""))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- recommending
    def infer_encoded(self, enc: Encoded, k: int | None = None, batch_size: int = 256) -> TopK:
        """Top-k ids of every encoded user (the popularity fallback where no item is known).

        Engine batches hold at most ``batch_size`` users and ``MAX_CELLS`` padded ids, so a few
        very long histories get batches of their own instead of a huge padded matrix."""
        k = self.check_k(k)
        c = self.info.contract
        counts = enc.counts
        top = TopK.empty(len(enc), k)
        model_rows = np.flatnonzero(counts > 0)
        mcounts = counts[model_rows]
        moffs = np.concatenate([[0], np.cumsum(mcounts)])
        every = len(model_rows) == len(enc)  # every user has a known item: model rows a..b are users a..b
        for (a, b), res in self._run_all(((a, b), self._feed(enc.ids[moffs[a]:moffs[b]], mcounts[a:b]))
                                         for a, b in engine_batches(mcounts, batch_size, c.max_len)):
            self._check_outputs(res)
            rows = slice(a, b) if every else model_rows[a:b]
            top.items[rows] = res["top_items"][:, :k]  # (B, k)
            top.scores[rows] = res["top_scores"][:, :k]
            top.valid[rows] = rankable(res["top_scores"][:, :k])
        unknown = counts == 0
        if unknown.any():  # mapping the popularity keys costs more than a batch of one's other work
            fill_popular(top, unknown, popular_ids(self.info.popular, self.mapper, k))
        return top

    def _check_outputs(self, res: dict[str, np.ndarray]) -> None:
        K = self.info.contract.k
        if res["top_items"].shape[1] != K:
            raise ModelFileError(f"the graph returns {res['top_items'].shape[1]} items per user but its metadata "
                                 f"says K={K}: the metadata does not belong to this graph; re-export it")

    def _feed(self, ids: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs for one engine batch: ``ids`` (N,) flat, ``counts`` (B,) per row."""
        c = self.info.contract
        feed = {"item_ids": left_pad(ids, counts, max(c.max_len, int(counts.max())))}  # (B, S)
        if c.stochastic:  # drawn on this thread, in batch order
            feed["noise"] = self.rng.standard_normal((c.steps, len(counts), c.hidden), dtype=np.float32)
        return feed

    def _run_all(self, feeds: Iterator[tuple[tuple[int, int], dict]]) -> Iterator[tuple[tuple[int, int], dict]]:
        """(span, outputs) of every feed, in order; with ``instances`` > 1, up to that many engine runs at
        once, each feed built only when a run frees (memory holds ``instances`` batches, not the block)."""
        if self.instances == 1:
            for span, feed in feeds:
                yield span, self.backend.infer(feed)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.instances, thread_name_prefix="instance")
        window: deque = deque()
        for span, feed in feeds:
            window.append((span, self._pool.submit(self.backend.infer, feed)))
            if len(window) == self.instances:
                span0, fut = window.popleft()
                yield span0, fut.result()
        while window:
            span0, fut = window.popleft()
            yield span0, fut.result()

    def recommend(self, histories: Sequence[Sequence], k: int | None = None) -> list[Recommendation]:
        """Top-k item keys and scores for each history (item keys, oldest first)."""
        if len(histories) == 1:
            problem = history_problem(histories[0])
            if problem:
                raise ValueError(f"history 0 {problem}")
            return [self.recommend_one(histories[0], k)]
        enc = encode_histories(histories, self.mapper, self.max_history)
        top = self.infer_encoded(enc, k)
        keys, scores = decode_rows(top, self.mapper)
        return [Recommendation(ks, ss, source_of(fb), int(u))
                for ks, ss, fb, u in zip(keys, scores, top.fallback, enc.unknown)]

    def recommend_one(self, history: list, k: int | None = None) -> Recommendation:
        """``recommend([history], k)[0]`` for one history of checked keys (``codec.history_problem``) with a
        dozen fewer numpy calls: a server's lone request, where they cost more than the work around the
        engine run (tests/test_pipeline.py checks it against the batch path)."""
        k = self.check_k(k)
        ids, unknown = encode_one(history, self.mapper, self.max_history)
        if not ids:  # nothing known: the popularity fallback, as the batch path builds it
            top = TopK.empty(1, k)
            fill_popular(top, np.ones(1, dtype=bool), popular_ids(self.info.popular, self.mapper, k))
            keys, scores = decode_rows(top, self.mapper)
            return Recommendation(keys[0], scores[0], source_of(True), unknown)
        res = self.backend.infer(self._feed(np.array(ids, dtype=np.int64), np.array([len(ids)])))
        self._check_outputs(res)
        scores = res["top_scores"][0, :k]  # (k,)
        valid = rankable(scores)
        return Recommendation(self.mapper.key_list(res["top_items"][0, :k][valid]),
                              scores[valid].astype(np.float64).tolist(), source_of(False), unknown)

    def check_k(self, k: int | None) -> int:
        return self.info.contract.check_k(k)


def rankable(scores: np.ndarray) -> np.ndarray:
    """Which top-k entries are items (bool, as ``scores``): a user with fewer than k rankable items left
    after masking gets masked entries at the end."""
    return scores > MASK_SCORE / 2


def engine_batches(counts: np.ndarray, batch_size: int, L: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of consecutive rows: at most batch_size rows and MAX_CELLS padded ids."""
    n = len(counts)
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        while stop - start > 1 and (stop - start) * max(L, int(counts[start:stop].max())) > MAX_CELLS:
            stop = start + (stop - start) // 2
        yield start, stop
        start = stop
