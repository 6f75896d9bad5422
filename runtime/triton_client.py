"""Client side of a Triton-served cddrec graph: item keys <-> ids through the repository's sidecar.

    codec = TritonClientCodec.load("models/cddrec/vocab.json")
    batch = codec.encode([["B0001", "B0042"], [17, 3]])   # batch.item_ids (B, S) int64, left-padded
    ... send batch.item_ids as "item_ids", get "top_items" and "top_scores" back ...
    recs = codec.decode(batch, top_items, top_scores)       # [{"items": keys, "scores": [...], ...}]

The same rules as ``Recommender``: unknown items are dropped and counted, the most recent
``max_history`` known items are kept, a history with no known item is not sent and gets the
training popularity top-k with ``"source": "popularity"`` (``"model"`` otherwise), and items scored at the mask score
(fewer than k rankable items) are left out. Needs numpy only (no torch, no tritonclient).

Triton's dynamic batcher merges requests only when their shapes match: pass the same ``width``
to every ``encode`` (histories longer than ``width`` still widen their batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cddrec.contract import MASK_SCORE, check_distinct_keys
from cddrec.errors import ModelFileError
from cddrec.vocab import Vocab

from .codec import KeyMapper, TopK, decode_rows, encode_histories, fill_popular, left_pad, popular_ids, source_of

FORMAT = "cddrec-triton-client"


class ClientFileError(ModelFileError):
    """The sidecar is missing, unreadable or not a cddrec Triton client file."""


@dataclass
class EncodedBatch:
    item_ids: np.ndarray  # (M, S) int64, left-padded with 0: the rows that have a known item
    rows: list[int]  # their positions among the histories
    size: int  # number of histories
    unknown: list[int] = field(default_factory=list)  # unknown items per history


@dataclass
class TritonClientCodec:
    keys: list[str]
    key_type: str
    popular: list  # [[item key, training count], ...], most popular first
    K: int
    L: int
    max_history: int
    mask_score: float = MASK_SCORE
    model_name: str = "cddrec"
    input_name: str = "item_ids"

    def __post_init__(self) -> None:
        self.mapper = KeyMapper(Vocab(self.keys, self.key_type))

    @classmethod
    def load(cls, path: str | Path) -> "TritonClientCodec":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ClientFileError(f"{path}: no such file (it is written beside config.pbtxt by "
                                  "cddrec-export --triton-repo)") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ClientFileError(f"{path}: not readable JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ClientFileError(f"{path}: not a cddrec Triton client file (expected \"format\": \"{FORMAT}\")")
        try:
            codec = cls(list(map(str, d["vocab"]["keys"])), d["vocab"].get("key_type", "str"), list(d["popular_topk"]),
                        int(d["K"]), int(d["L"]), int(d["max_history"]), float(d.get("mask_score", MASK_SCORE)),
                        str(d.get("model_name", "cddrec")), str(d.get("input", "item_ids")))
        except (KeyError, TypeError, ValueError) as e:
            raise ClientFileError(f"{path}: missing or malformed field {e}") from e
        try:
            check_distinct_keys(Vocab(codec.keys, codec.key_type), path)
        except ModelFileError as e:
            raise ClientFileError(str(e)) from None
        return codec

    def encode(self, histories: Sequence[Sequence], width: int | None = None) -> EncodedBatch:
        """Left-padded ids (M, S) of the histories with a known item, S = max(width or L, longest)."""
        enc = encode_histories(histories, self.mapper, self.max_history)
        counts = enc.counts
        rows = np.flatnonzero(counts > 0)
        S = max([width or self.L] + counts[rows].tolist())
        return EncodedBatch(left_pad(enc.ids, counts[rows], S), rows.tolist(), len(histories),
                            enc.unknown.tolist())

    def decode(self, batch: EncodedBatch, top_items: np.ndarray | None = None, top_scores: np.ndarray | None = None,
               k: int | None = None) -> list[dict]:
        """``{"items", "scores", "source", "unknown"}`` per history, in input order (``source``: model | popularity)."""
        k = self.K if k is None else k
        if not 1 <= k <= self.K:
            raise ValueError(f"k={k}: the served graph returns at most K={self.K} items")
        if batch.rows and (top_items is None or top_scores is None or len(top_items) != len(batch.rows)):
            raise ValueError(f"expected top_items/top_scores for the {len(batch.rows)} encoded rows")
        top = TopK.empty(batch.size, k)
        if batch.rows:
            top.items[batch.rows] = top_items[:, :k]
            top.scores[batch.rows] = top_scores[:, :k]
            top.valid[batch.rows] = top_scores[:, :k] > self.mask_score / 2  # fewer than k rankable items left
        sent = np.zeros(batch.size, dtype=bool)
        sent[batch.rows] = True
        fill_popular(top, ~sent, popular_ids(self.popular, self.mapper, k))
        keys, scores = decode_rows(top, self.mapper)
        return [{"items": ks, "scores": ss, "source": source_of(fb), "unknown": u}
                for ks, ss, fb, u in zip(keys, scores, top.fallback, batch.unknown)]
