"""Columnar writers of recommendations: JSONL, CSV and Parquet (torch-free).

Each writer takes whole blocks (users, Arrow list arrays of item keys and scores, a fallback
mask) and writes them with polars / pyarrow, never line by line. Every row says where its list
comes from: ``source`` is ``"model"`` (the graph's top-k, scores on the model's scale) or
``"popularity"`` (the history had no known item: the training popularity top-k, scores are
interaction counts).

- JSONL: ``{"user": key, "items": [...], "scores": [...], "source": "model"}``; scores rounded
  to ``codec.SCORE_DECIMALS`` (6) decimals.
- CSV: a header, then ``user,rank,item,score,source`` rows (scores rounded the same way).
- Parquet: columns ``user``, ``items`` (list), ``scores`` (list of float32) and ``source`` (string).

Outputs are opened by the pipeline through :mod:`cddrec.io` (temporary file renamed at the end, or
a stream written straight through) under its ``output_lock``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from .codec import SOURCES, round_scores

OUTPUT_FORMATS = ("jsonl", "csv", "parquet")


def output_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = path.suffix.lower()
    return "csv" if suffix == ".csv" else "parquet" if suffix in (".parquet", ".pq") else "jsonl"


def _sources(fallback: np.ndarray) -> pa.Array:
    """("model" | "popularity") per row, dictionary-encoded: two strings, n int8 indices."""
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(fallback, dtype=np.int8)),
                                          pa.array(SOURCES)).cast(pa.string())


def _user_strings(users) -> pa.Array:
    if isinstance(users, list):
        return pa.array([str(u) for u in users], pa.string())
    return users.cast(pa.string())


def _json_user_runs(users) -> list[tuple[int, int, pa.Array]]:
    """Runs (start, stop, array) of users of one JSON type (a list mixes strings and ints)."""
    if not isinstance(users, list):
        return [(0, len(users), users)]
    runs, start = [], 0
    kinds = [str if type(u) is str else int for u in users]
    for i in range(1, len(users) + 1):
        if i == len(users) or kinds[i] is not kinds[start]:
            runs.append((start, i, pa.array(users[start:i], pa.string() if kinds[start] is str else pa.int64())))
            start = i
    return runs


class JsonlWriter:
    def __init__(self, f, **_):
        self.f = f

    def write(self, users, items: pa.ListArray, scores: np.ndarray, offsets: np.ndarray, fallback: np.ndarray
              ) -> None:
        import polars as pl

        sc = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(round_scores(scores)))
        src = _sources(fallback)
        for start, stop, arr in _json_user_runs(users):
            df = pl.from_arrow(pa.table({"user": arr, "items": items[start:stop], "scores": sc[start:stop],
                                         "source": src[start:stop]}))
            b = io.BytesIO()
            df.write_ndjson(b)
            self.f.write(b.getbuffer())

    def close(self) -> None:
        pass


class CsvWriter:
    def __init__(self, f, **_):
        self.f = f
        f.write(b"user,rank,item,score,source\n")

    def write(self, users, items: pa.ListArray, scores: np.ndarray, offsets: np.ndarray, fallback: np.ndarray
              ) -> None:
        import polars as pl

        lens = np.diff(offsets)
        row = np.repeat(np.arange(len(lens)), lens)
        rank = np.arange(len(row)) - np.repeat(offsets[:-1], lens) + 1
        table = pa.table({"user": _user_strings(users).take(pa.array(row)), "rank": pa.array(rank),
                          "item": items.flatten().cast(pa.string()),
                          "score": pa.array(round_scores(scores)),
                          "source": _sources(fallback).take(pa.array(row))})
        b = io.BytesIO()
        pl.from_arrow(table).write_csv(b, include_header=False)
        self.f.write(b.getbuffer())

    def close(self) -> None:
        pass


class ParquetWriter:
    def __init__(self, f, *, user_type: pa.DataType = pa.string(), item_type: pa.DataType = pa.string()):
        import pyarrow.parquet as pq

        self.user_type = user_type
        self.schema = pa.schema([("user", user_type), ("items", pa.list_(item_type)),
                                 ("scores", pa.list_(pa.float32())), ("source", pa.string())])
        self.w = pq.ParquetWriter(f, self.schema)

    def write(self, users, items: pa.ListArray, scores: np.ndarray, offsets: np.ndarray, fallback: np.ndarray
              ) -> None:
        u = _user_strings(users) if self.user_type == pa.string() else pa.array(users, self.user_type) \
            if isinstance(users, list) else users.cast(self.user_type)
        sc = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(scores.astype(np.float32)))
        self.w.write_table(pa.table([u, items.cast(self.schema.field("items").type), sc, _sources(fallback)],
                                    schema=self.schema))

    def close(self) -> None:
        self.w.close()


WRITERS = {"jsonl": JsonlWriter, "csv": CsvWriter, "parquet": ParquetWriter}


class ErrorWriter:
    """``OUTPUT.errors.jsonl``: one ``{"line", "reason", "text"}`` per bad line (text at most
    ``cddrec.readers.TEXT_LIMIT`` characters)."""

    def __init__(self, f):
        self.f = f

    def write(self, bad) -> None:
        if bad:
            self.f.write("".join(json.dumps({"line": b.line, "reason": b.reason, "text": b.text}) + "\n"
                                 for b in bad).encode())
