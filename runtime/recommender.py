"""``Recommender``: original item keys in, top-k item keys and scores out, on any backend.

    rec = Recommender.load("model.onnx", backend="ort-cpu")
    rec.recommend([["B00123", "B00456"], [17, 42]], k=10)

Histories are oldest first. Keys are mapped with the model's vocabulary; unknown items are
dropped and counted; every known item is kept (the last L feed the model, all of them are
excluded from the ranking; TensorRT engines, whose profiles stop at ``MAX_HISTORY``, keep the most
recent ``MAX_HISTORY``). A history with no known item gets the
training popularity top-k, flagged ``fallback: "popular"``. Torch-free: graphs are read through
``cddrec.contract`` and served by ``cddrec.runtime.backends``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cddrec.contract import MASK_SCORE, MAX_HISTORY, ServingInfo, serving_info
from cddrec.errors import ModelFileError

from .backends import Backend, load_backend


def read_serving_info(path: str | Path, backend: Backend | None = None) -> ServingInfo:
    """Contract, vocabulary and popularity of a graph (``.onnx``, from the backend's session when it
    has one), of a TensorRT engine (its ``ENGINE.meta.json``), or of a model-file backend."""
    path = Path(path)
    if backend is not None and hasattr(backend, "serving_info"):
        return backend.serving_info()
    meta_json = path.with_name(path.name + ".meta.json")
    if path.suffix != ".onnx" and meta_json.exists():
        try:
            meta = json.loads(meta_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{meta_json}: not readable engine metadata ({e})") from None
    elif backend is not None and hasattr(backend, "metadata"):
        meta = backend.metadata()
    else:
        from .backends import OrtBackend

        meta = OrtBackend(path, "cpu", 1, level="disable").metadata()
    return serving_info(meta, path)


@dataclass
class Recommendation:
    items: list
    scores: list
    fallback: str | None = None
    unknown: int = 0  # history items not in the vocabulary


class Recommender:
    def __init__(self, backend: Backend, info: ServingInfo, max_history: int | None = None, seed: int = 0):
        self.backend, self.info, self.max_history = backend, info, max_history
        self.index = info.vocab.index
        self.rng = np.random.default_rng(seed)  # the noise of a stochastic graph (sampled reverse chain)

    @classmethod
    def load(cls, path: str | Path, backend: str = "ort-cpu", *, threads: int = 0, k: int | None = None,
             max_history: int | None = None, seed: int = 0, **options) -> "Recommender":
        """Open a graph (ort-cpu, ort-cuda), an engine (trt) or a model file (torch backends)."""
        path = Path(path)
        if not path.exists():
            raise ModelFileError(f"{path}: no such file")
        if path.is_dir():
            raise ModelFileError(f"{path}: is a directory, expected a model file")
        be = load_backend(path, backend, k=k, threads=threads, **options)
        if backend == "trt" and max_history is None:
            max_history = MAX_HISTORY  # TensorRT's profiles stop there
        return cls(be, read_serving_info(path, be), max_history, seed=seed)

    @property
    def contract(self):
        return self.info.contract

    # ------------------------------------------------------------------ encoding
    def encode(self, history: Sequence) -> tuple[np.ndarray, int]:
        """Item ids of the known items (all, or the most recent ``max_history``) and the unknown count."""
        ids = [self.index.get(str(key), 0) for key in history]
        known = [i for i in ids if i]
        kept = known[-self.max_history:] if self.max_history else known
        return np.asarray(kept, dtype=np.int64), len(ids) - len(known)

    def batch_input(self, encoded: Sequence[np.ndarray]) -> np.ndarray:
        """(B, S) left-padded, S = max(L, longest history)."""
        S = max([self.info.L] + [len(e) for e in encoded])
        out = np.zeros((len(encoded), S), dtype=np.int64)
        for b, e in enumerate(encoded):
            if len(e):
                out[b, S - len(e):] = e
        return out

    # ---------------------------------------------------------------- recommending
    def recommend_encoded(self, encoded: Sequence[np.ndarray], k: int | None = None,
                          unknown: Sequence[int] | None = None) -> list[Recommendation]:
        k = self.check_k(k)
        unknown = unknown if unknown is not None else [0] * len(encoded)
        out: list[Recommendation | None] = [None] * len(encoded)
        model_rows = [i for i, e in enumerate(encoded) if len(e)]
        if model_rows:
            feed = {"item_ids": self.batch_input([encoded[i] for i in model_rows])}
            c = self.info.contract
            if c.stochastic:
                feed["noise"] = self.rng.standard_normal((c.steps, len(model_rows), c.hidden), dtype=np.float32)
            res = self.backend.infer(feed)
            if res["top_items"].shape[1] != c.k:
                raise ModelFileError(f"the graph returns {res['top_items'].shape[1]} items per user but its metadata "
                                     f"says K={c.k}: the metadata does not belong to this graph; re-export it")
            items, scores = res["top_items"][:, :k], res["top_scores"][:, :k]
            decode = self.info.vocab.key
            for r, i in enumerate(model_rows):
                keep = scores[r] > MASK_SCORE / 2  # fewer than k rankable items left
                out[i] = Recommendation([decode(int(x)) for x in items[r][keep]],
                                        [float(s) for s in scores[r][keep]], None, unknown[i])
        popular = self.info.popular[:k]
        for i, e in enumerate(encoded):
            if not len(e):
                out[i] = Recommendation([p[0] for p in popular], [float(p[1]) for p in popular], "popular",
                                        unknown[i])
        return out  # type: ignore[return-value]

    def recommend(self, histories: Sequence[Sequence], k: int | None = None) -> list[Recommendation]:
        """Top-k item keys and scores for each history (item keys, oldest first)."""
        enc = [self.encode(h) for h in histories]
        return self.recommend_encoded([e for e, _ in enc], k, [u for _, u in enc])

    def check_k(self, k: int | None) -> int:
        return self.info.contract.check_k(k)
