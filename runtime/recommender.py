"""``Recommender``: original item keys in, top-k item keys and scores out, on any backend.

    rec = Recommender.load("model.onnx", backend="ort-cpu")
    rec.recommend([["B00123", "B00456"], [17, 42]], k=10)

Histories are oldest first. Keys are mapped with the model's vocabulary; unknown items are
dropped and counted; every known item is kept (the last L feed the model, all of them are
excluded from the ranking; TensorRT engines, whose profiles stop at ``MAX_HISTORY``, keep the most
recent ``MAX_HISTORY``). A history with no known item gets the
training popularity top-k, flagged ``fallback: "popular"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cddrec.config import CDDRecConfig
from cddrec.data import Vocab
from cddrec.export.spec import MAX_HISTORY
from cddrec.inference import MASK_SCORE, popular_topk

from .backends import BACKENDS, load_backend


class ModelFileError(ValueError):
    """The file is not a cddrec export (no metadata or vocabulary) or is unreadable."""


@dataclass
class ModelInfo:
    K: int
    L: int
    T: int
    d: int
    num_items: int
    kind: str
    vocab: Vocab
    popular: list  # [[item key, training count], ...], most popular first


def info_from_graph(path: str | Path) -> ModelInfo:
    """Metadata of an exported graph (``.onnx``), or of a TensorRT engine's ``.meta.json``."""
    path = Path(path)
    meta_json = path.with_name(path.name + ".meta.json")
    if path.suffix != ".onnx" and meta_json.exists():
        meta = json.loads(meta_json.read_text())
    else:
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf raises several types
            raise ModelFileError(f"{path}: not a readable ONNX graph ({type(e).__name__}: {e})") from e
        meta = {p.key: p.value for p in proto.metadata_props}
    if "cddrec_format_version" not in meta:
        raise ModelFileError(f"{path}: not a cddrec export (no cddrec metadata); export a model with cddrec-export")
    if "vocab" in meta:
        vocab = Vocab.from_dict(json.loads(meta["vocab"]) if isinstance(meta["vocab"], str) else meta["vocab"])
    elif "vocab_file" in meta:
        side = path.parent / meta["vocab_file"]
        if not side.exists():
            raise ModelFileError(f"{path}: its item vocabulary {side} is missing (keep it beside the graph)")
        vocab = Vocab.from_dict(json.loads(side.read_text()))
    else:
        raise ModelFileError(f"{path}: cddrec metadata has no item vocabulary")

    def num(key: str) -> int:
        return int(meta[key])

    pop = meta.get("popular_topk", "[]")
    return ModelInfo(num("K"), num("L"), num("T"), num("d"), num("num_items"), meta.get("graph_kind", "deterministic"),
                     vocab, json.loads(pop) if isinstance(pop, str) else pop)


@dataclass
class Recommendation:
    items: list
    scores: list
    fallback: str | None = None
    unknown: int = 0  # history items not in the vocabulary


class Recommender:
    def __init__(self, backend, info: ModelInfo, max_history: int | None = None):
        self.backend, self.info, self.max_history = backend, info, max_history
        self.index = info.vocab.index

    @classmethod
    def load(cls, path: str | Path, backend: str = "ort-cpu", *, threads: int = 0, k: int | None = None,
             max_history: int | None = None) -> "Recommender":
        """Open a graph (ort-cpu, ort-cuda), an engine (trt) or a model file (torch)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        path = Path(path)
        if not path.exists():
            raise ModelFileError(f"{path}: no such file")
        if backend == "torch":
            from cddrec.checkpoint import read_checkpoint

            ckpt = read_checkpoint(path)
            info = checkpoint_info(ckpt, k or 10)
        else:
            info = info_from_graph(path)
        if backend == "trt" and max_history is None:
            max_history = MAX_HISTORY
        return cls(load_backend(path, backend, k=info.K, threads=threads), info, max_history)

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
            res = self.backend.infer(feed)
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
        if k is None:
            return self.info.K
        if not 1 <= k <= self.info.K:
            raise ValueError(f"k={k}: this graph returns at most K={self.info.K} items; "
                             f"re-export with cddrec-export --k {k}")
        return k


def checkpoint_info(ckpt: dict, k: int) -> ModelInfo:
    """ModelInfo of a model file, for the torch backend (K = ``k``)."""
    cfg = CDDRecConfig.from_dict(ckpt["config"])
    vocab = Vocab.from_dict(ckpt["vocab"])
    if not 1 <= k <= cfg.num_items:
        raise ValueError(f"k={k} must be between 1 and the number of items ({cfg.num_items})")
    steps = cfg.steps if cfg.decoder else 0
    return ModelInfo(k, cfg.max_len, steps, cfg.hidden_size, cfg.num_items, "deterministic", vocab,
                     popular_topk(ckpt.get("popularity"), vocab, max(k, 100)))
