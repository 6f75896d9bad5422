"""Columnar writers of recommendations: JSONL, CSV and Parquet (torch-free).

Each writer takes whole blocks (users, Arrow list arrays of item keys and scores, a fallback
mask) and writes them with polars / pyarrow, never line by line:

- JSONL: ``{"user": key, "items": [...], "scores": [...]}`` plus ``"fallback": "popular"`` on
  users served the popularity list; scores rounded to 6 decimals.
- CSV: a header, then ``user,rank,item,score,fallback`` rows (scores rounded to 6 decimals).
- Parquet: columns ``user``, ``items`` (list), ``scores`` (list of float32) and ``fallback``
  (string, null unless "popular").

Outputs go to a temporary file renamed at the end (:mod:`cddrec.io`); :func:`output_lock` keeps
two runs from writing the same output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from cddrec.errors import DataError

OUTPUT_FORMATS = ("jsonl", "csv", "parquet")
_FALLBACK_TAIL = np.frombuffer(b',"fallback":"popular"', dtype=np.uint8)


def output_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = path.suffix.lower()
    return "csv" if suffix == ".csv" else "parquet" if suffix in (".parquet", ".pq") else "jsonl"


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.NAME.lock`` beside ``path``; refuse when another run holds it.

    ``flock`` locks are released by the kernel when their process dies, so a crash never leaves a
    stale lock behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DataError(f"{path}: another run is writing this output (lock {lock} is held); "
                                "wait for it to finish or choose another --output") from None
            raise
        try:  # the holder before us may have removed the file it locked: lock the current one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _user_strings(users) -> pa.Array:
    if isinstance(users, list):
        return pa.array([str(u) for u in users], pa.string())
    return users.cast(pa.string())


def _json_user_runs(users) -> list[tuple[int, int, pa.Array | None]]:
    """Runs (start, stop, array) of users of one JSON type; array None where keys are huge ints."""
    if not isinstance(users, list):
        return [(0, len(users), users)]
    runs, start = [], 0
    kinds = [str if type(u) is str else int for u in users]
    for i in range(1, len(users) + 1):
        if i == len(users) or kinds[i] is not kinds[start]:
            chunk = users[start:i]
            try:
                arr = pa.array(chunk, pa.string() if kinds[start] is str else pa.int64())
            except (OverflowError, pa.ArrowInvalid):
                arr = None
            runs.append((start, i, arr))
            start = i
    return runs


class JsonlWriter:
    def __init__(self, f, **_):
        self.f = f

    def write(self, users, items: pa.ListArray, scores: np.ndarray, offsets: np.ndarray, fallback: np.ndarray
              ) -> None:
        import polars as pl

        sc = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(np.round(scores.astype(np.float64), 6)))
        for start, stop, arr in _json_user_runs(users):
            if arr is None:  # integers beyond 64 bits: plain json for these few lines
                for j in range(start, stop):
                    line = {"user": users[j], "items": items[j].as_py(), "scores": sc[j].as_py()}
                    if fallback[j]:
                        line["fallback"] = "popular"
                    self.f.write((json.dumps(line) + "\n").encode())
                continue
            df = pl.from_arrow(pa.table({"user": arr, "items": items[start:stop], "scores": sc[start:stop]}))
            buf = _ndjson(df)
            fb = np.flatnonzero(fallback[start:stop])
            if len(fb):
                buf = _tag_fallback(buf, fb)
            self.f.write(buf)

    def close(self) -> None:
        pass


def _ndjson(df) -> bytes:
    import io

    b = io.BytesIO()
    df.write_ndjson(b)
    return b.getbuffer()


def _tag_fallback(buf, rows: np.ndarray) -> bytes:
    """Insert ``,"fallback":"popular"`` before the closing brace of the given lines."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)[rows]  # each line ends '}\n'; insert before the '}'
    pos = np.repeat(ends - 1, len(_FALLBACK_TAIL))
    vals = np.tile(_FALLBACK_TAIL, len(rows))
    return np.insert(arr, pos, vals).tobytes()


class CsvWriter:
    def __init__(self, f, **_):
        self.f = f
        f.write(b"user,rank,item,score,fallback\n")

    def write(self, users, items: pa.ListArray, scores: np.ndarray, offsets: np.ndarray, fallback: np.ndarray
              ) -> None:
        import polars as pl

        lens = np.diff(offsets)
        row = np.repeat(np.arange(len(lens)), lens)
        rank = np.arange(len(row)) - np.repeat(offsets[:-1], lens) + 1
        fb = pa.array(np.where(fallback[row], "popular", None) if len(row) else [], pa.string())
        table = pa.table({"user": _user_strings(users).take(pa.array(row)), "rank": pa.array(rank),
                          "item": items.flatten().cast(pa.string()),
                          "score": pa.array(np.round(scores.astype(np.float64), 6)), "fallback": fb})
        import io

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
                                 ("scores", pa.list_(pa.float32())), ("fallback", pa.string())])
        self.w = pq.ParquetWriter(f, self.schema)

    def write(self, users, items: pa.ListArray, scores: np.ndarray, offsets: np.ndarray, fallback: np.ndarray
              ) -> None:
        u = _user_strings(users) if self.user_type == pa.string() else pa.array(users, self.user_type) \
            if isinstance(users, list) else users.cast(self.user_type)
        sc = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(scores.astype(np.float32)))
        fb = pa.array(np.where(fallback, "popular", None) if len(fallback) else [], pa.string())
        self.w.write_table(pa.table([u, items, sc, fb], schema=self.schema))

    def close(self) -> None:
        self.w.close()


WRITERS = {"jsonl": JsonlWriter, "csv": CsvWriter, "parquet": ParquetWriter}


class ErrorWriter:
    """``OUTPUT.errors.jsonl``: one ``{"line", "reason", "text"}`` per bad line."""

    def __init__(self, f):
        self.f = f

    def write(self, bad) -> None:
        if bad:
            self.f.write("".join(json.dumps({"line": b.line, "reason": b.reason, "text": b.text}) + "\n"
                                 for b in bad).encode())
