"""Item keys <-> ids for serving, vectorized (pyarrow + numpy, torch-free).

The one implementation of the serving-side encoding, used by ``Recommender`` (and so by
``cddrec-infer``'s streaming pipeline) and by the Triton client:

- ``KeyMapper``: item key -> id (0 = unknown) by a vectorized lookup, id -> key by a take (a few
  keys, as a server's batch has: by the vocabulary's dict and a Python list, no Arrow round trip);
- ``encode_flat`` / ``encode_histories``: histories (flat keys + offsets) -> the known ids per
  user, unknown items counted, optionally only the most recent ``max_history``;
- ``left_pad``: flat ids -> the graph's (B, S) input, right-aligned after 0 padding;
- ``encode_one``: the same for one user in plain Python (``Recommender.recommend_one``, a server's
  lone request, tested against the batch path in tests/test_pipeline.py);
- ``TopK`` and ``fill_popular``: the engine's (n, K) outputs with the cold-start fallback;
- ``request_problem`` / ``history_problem``: the one request rule (cddrec-infer's lines, the
  server's bodies, ``Recommender.recommend``'s histories);
- ``SOURCES``, ``source_of``, ``SCORE_DECIMALS``, ``round_scores``: what every output says.

Letters: n users, N known ids in all, B engine batch, S padded history, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cddrec.vocab import Vocab, key_problem

SCORE_DECIMALS = 6  # scores as every output writes them
SOURCES = ("model", "popularity")  # where a user's list comes from: the graph, or the popularity fallback


def source_of(fallback: bool) -> str:
    return SOURCES[bool(fallback)]


def round_scores(scores: np.ndarray) -> np.ndarray:
    """Scores as float64 rounded to ``SCORE_DECIMALS``, as every output writes them."""
    return np.round(np.asarray(scores).astype(np.float64), SCORE_DECIMALS)


# ----------------------------------------------------------------------------- the request rule
def _key_at(key, max_chars: int | None) -> str | None:
    problem = key_problem(key)
    if problem is None and max_chars is not None and type(key) is str and len(key) > max_chars:
        problem = f"has {len(key)} characters; at most {max_chars}"
    return problem


def history_problem(hist, max_key_chars: int | None = None) -> str | None:
    """Why ``hist`` is not a history (a list of item keys, each under the one key rule
    ``cddrec.vocab.key_problem``), else None: "must be a list ..." or "entry J ..."."""
    if isinstance(hist, (str, bytes)) or not isinstance(hist, Sequence):
        return f"must be a list of item keys, got {type(hist).__name__}"
    for j, item in enumerate(hist):
        problem = _key_at(item, max_key_chars)
        if problem:
            return f"entry {j} {problem}"
    return None


def request_problem(obj, *, user_required: bool = True, max_key_chars: int | None = None) -> str | None:
    """Why ``obj`` is not a request ``{"user": key, "history": [item keys]}``, else None: the one rule
    of cddrec-infer's lines and the server's bodies (where ``user`` is optional: absent or null)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    user = obj.get("user")
    if "user" not in obj and user_required:
        return "missing field 'user'"
    if user is not None or user_required:
        problem = _key_at(user, max_key_chars)
        if problem:
            return f"field 'user' {problem}"
    if "history" not in obj:
        return "missing field 'history'"
    problem = history_problem(obj["history"], max_key_chars)
    return f"field 'history' {problem}" if problem else None


class KeyMapper:
    """Vectorized item key -> id (0 = unknown) and id -> key, with the model's vocabulary.

    A key matches as its string form, as ``Vocab.index.get(str(key))`` does: 17 and "17" are the
    same item. Integer keys spanning a range of at most ``LUT_SPAN_PER_KEY`` times their count
    (plus ``LUT_SPAN_MIN``) are looked up in a dense table (one gather per key); sparser ones by a
    binary search; other keys through the vocabulary's dict (a few) or one hash lookup (many)."""

    LUT_SPAN_PER_KEY = 8
    LUT_SPAN_MIN = 1 << 20
    # up to this many keys go through the vocabulary's dict rather than ``pyarrow.compute.index_in``, which
    # builds a hash table of the whole vocabulary on every call (about 1 ms for 12k keys: nothing for a block
    # of 32k requests, most of the cost of a server's batch of one)
    SMALL = 4096

    def __init__(self, vocab: Vocab):
        self.keys_str = pa.array(vocab.keys, pa.string())
        self.index = vocab.index  # key (as its string form) -> id
        self.is_int = vocab.key_type == "int"
        self.sorted_int = self.order = self.lut = None
        self._key_objects: list | None = None  # out_keys as Python objects (key_list)
        self.lo = 0
        if self.is_int:
            ints = np.array([int(k) for k in vocab.keys], dtype=np.int64)
            self.order = np.argsort(ints, kind="stable")
            self.sorted_int = ints[self.order]
            self.out_keys = pa.array(ints)
            if len(ints):
                self.lo = int(self.sorted_int[0])
                span = int(self.sorted_int[-1]) - self.lo + 1
                if span <= self.LUT_SPAN_PER_KEY * len(ints) + self.LUT_SPAN_MIN:
                    self.lut = np.zeros(span + 1, dtype=np.int32)  # key - lo -> id; the last entry: unknown
                    self.lut[(ints - self.lo)[::-1]] = np.arange(len(ints), 0, -1, dtype=np.int32)  # first wins
        else:
            self.out_keys = self.keys_str

    def ids(self, values: pa.Array | list) -> np.ndarray:
        """(n,) int64 ids of the keys (an Arrow array, or a list of checked keys: ints and strings), 0 where
        unknown."""
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64)
        if isinstance(values, list):  # a few: straight to the dict, no Arrow round trip
            if len(values) <= self.SMALL:
                return np.fromiter(self.id_list(values), np.int64, len(values))
            values = pa.array([k if type(k) is str else str(k) for k in values], pa.string())
        if self.is_int and pa.types.is_integer(values.type):
            v = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            if self.lut is not None:
                # v - lo wraps (mod 2**64) for keys below lo, so as unsigned every key outside the table is >= its size
                span = len(self.lut) - 1
                pos = np.minimum((v - np.int64(self.lo)).view(np.uint64), np.uint64(span))
                return self.lut[pos].astype(np.int64)
            pos = np.searchsorted(self.sorted_int, v).clip(0, len(self.sorted_int) - 1)
            hit = self.sorted_int[pos] == v
            return np.where(hit, self.order[pos] + 1, 0).astype(np.int64)
        if len(values) <= self.SMALL:
            get = self.index.get
            return np.fromiter((get(k, 0) for k in values.cast(pa.string()).to_pylist()), np.int64, len(values))
        idx = pc.index_in(values.cast(pa.string()), value_set=self.keys_str)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1

    def id_list(self, values: list) -> list[int]:
        """The ids of a few checked keys (ints and strings) as a Python list, 0 where unknown."""
        get = self.index.get
        return [get(k if type(k) is str else str(k), 0) for k in values]

    def keys(self, ids: np.ndarray) -> pa.Array:
        return self.out_keys.take(pa.array(np.asarray(ids, dtype=np.int64) - 1))

    def key_list(self, ids: np.ndarray) -> list:
        """The keys of ``ids`` as Python objects: a few by list lookups (pyarrow's take and to_pylist cost
        tens of microseconds, most of a one-user answer's decoding), many through ``keys``."""
        if len(ids) > self.SMALL:
            return self.keys(ids).to_pylist()
        if self._key_objects is None:  # built once, on first use (two threads may both build it: same list)
            self._key_objects = self.out_keys.to_pylist()
        objs = self._key_objects
        return [objs[i - 1] for i in np.asarray(ids, dtype=np.int64).tolist()]


@dataclass
class Encoded:
    """Known ids per user, flat, with offsets; and the unknown items each history had."""

    ids: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (n + 1,) int64
    unknown: np.ndarray  # (n,) int64

    @property
    def counts(self) -> np.ndarray:
        return self.offsets[1:] - self.offsets[:-1]

    def __len__(self) -> int:
        return len(self.unknown)


def encode_flat(values: pa.Array | list, offsets: np.ndarray, mapper: KeyMapper, max_history: int | None = None
                ) -> Encoded:
    """Histories given as flat item keys ``values`` (an Arrow array or a list) and ``offsets`` (n + 1,) ->
    ``Encoded``."""
    offs = np.asarray(offsets, dtype=np.int64)
    lo, hi = int(offs[0]), int(offs[-1])
    ids = mapper.ids(values[lo:hi] if isinstance(values, list) else values.slice(lo, hi - lo))  # (total,)
    offs = offs - offs[0]
    n, lens = len(offs) - 1, np.diff(offs)
    known = ids > 0
    if not max_history:  # every known id: counts from a running count of known items
        kept = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(known, out=kept[1:])
        koffs = kept[offs]  # (n + 1,)
        return Encoded(ids if kept[-1] == len(ids) else ids[known], koffs, lens - np.diff(koffs))
    # the most recent max_history known items (TensorRT profiles stop there)
    row = np.repeat(np.arange(n), lens)
    kpos = np.flatnonzero(known)
    kc = np.bincount(row[kpos], minlength=n)
    kend = np.cumsum(kc)  # end of each row's run among the known items
    keep = known.copy()
    keep[kpos] = kend[row[kpos]] - 1 - np.arange(len(kpos)) < max_history
    counts = np.bincount(row[keep], minlength=n)
    unknown = lens - np.bincount(row[known], minlength=n)
    return Encoded(ids[keep], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), unknown.astype(np.int64))


def encode_one(history: list, mapper: KeyMapper, max_history: int | None = None) -> tuple[list[int], int]:
    """One user's checked keys -> (the known ids kept, as ``encode_flat`` keeps them; how many were
    unknown), in plain Python: for a lone request the array path's dozen numpy calls cost more than
    its one dict lookup per key."""
    ids = mapper.id_list(history)
    known = [i for i in ids if i]
    return (known[-max_history:] if max_history else known), len(ids) - len(known)


def encode_histories(histories: Sequence[Sequence], mapper: KeyMapper, max_history: int | None = None) -> Encoded:
    """Python histories (item keys, oldest first; ints and strings alike) -> ``Encoded``; a history that
    is not a list of keys is a ValueError (``history_problem``, the rule of the request files' lines)."""
    for i, h in enumerate(histories):
        problem = history_problem(h)
        if problem:
            raise ValueError(f"history {i} {problem}")
    lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    values = [key for h in histories for key in h]
    return encode_flat(values, np.concatenate([[0], np.cumsum(lens)]), mapper, max_history)


def left_pad(ids: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """(B, width) int64, each row's ids right-aligned after 0 padding (ids flat, row after row)."""
    B = len(counts)
    out = np.zeros((B, width), dtype=np.int64)
    if B == 1:  # one user: one slice
        out[0, width - len(ids):] = ids
        return out
    row = np.repeat(np.arange(B), counts)  # (N,)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    col = width - counts[row] + (np.arange(len(ids)) - start)
    out[row, col] = ids
    return out


@dataclass
class TopK:
    """Top-k of n users: ids, scores, which entries are real (fewer than k rankable items leave
    masked ones) and which users got the popularity fallback."""

    items: np.ndarray  # (n, k) int64 ids
    scores: np.ndarray  # (n, k) float32
    valid: np.ndarray  # (n, k) bool
    fallback: np.ndarray  # (n,) bool

    @classmethod
    def empty(cls, n: int, k: int) -> "TopK":
        return cls(np.zeros((n, k), np.int64), np.zeros((n, k), np.float32), np.zeros((n, k), bool),
                   np.zeros(n, bool))


def popular_ids(popular: list, mapper: KeyMapper, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts as float32) of the first k popularity entries [[key, count], ...]."""
    pop = popular[:k]
    ids = mapper.ids(pa.array([str(p[0]) for p in pop], pa.string()))
    ok = ids > 0
    return ids[ok], np.array([float(p[1]) for p in pop], dtype=np.float32)[ok]


def fill_popular(top: TopK, rows: np.ndarray, popular: tuple[np.ndarray, np.ndarray]) -> None:
    """In place: ``rows`` (bool (n,)) get the popularity top-k, flagged as fallback."""
    if not rows.any():
        return
    pop_ids, pop_scores = popular
    m = min(len(pop_ids), top.items.shape[1])
    top.items[rows, :m] = pop_ids[:m]
    top.scores[rows, :m] = pop_scores[:m]
    top.valid[rows] = np.arange(top.items.shape[1]) < m
    top.fallback[rows] = True


def decode_rows(top: TopK, mapper: KeyMapper) -> tuple[list[list], list[list[float]]]:
    """Per user: the item keys and scores of the valid entries (Python lists)."""
    counts = top.valid.sum(axis=1)
    keys = mapper.key_list(top.items[top.valid])
    scores = top.scores[top.valid].astype(np.float64).tolist()
    ends = np.cumsum(counts).tolist()
    starts = [0] + ends[:-1]
    return [keys[a:b] for a, b in zip(starts, ends)], [scores[a:b] for a, b in zip(starts, ends)]
