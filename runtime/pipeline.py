"""The streaming, columnar serving loop behind ``cddrec-infer`` (torch-free).

    blocks = read_blocks(path, fmt)            # runtime.requests: Arrow blocks + bad lines
    stats = serve(rec, blocks, writer, ...)    # map, dedupe, pad, infer, decode, write

Three stages overlap: a reader thread parses the next block, maps item keys to ids
(``cddrec.runtime.codec``, a vectorized lookup) and checks users for duplicates (:class:`SeenUsers`,
64-bit hashes and first lines in sorted numpy runs: 16 bytes per user); the calling thread pads engine batches
(numpy, from the list offsets) and runs the backend; a writer thread maps ids back to keys (a
take on the vocabulary array) and writes the block. Only the current blocks and the user hashes
are in memory, however long the file.

Histories are never truncated (every history item is excluded from the ranking; the graph
feeds the last L to the model), except on TensorRT whose profiles stop at the Recommender's
``max_history``. Engine batches are ``Recommender.infer_encoded``'s (at most ``batch_size``
users and a bounded number of padded ids).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from cddrec.errors import DataError
from cddrec.io import atomic_open, atomic_path, output_lock, output_target, refuse_overwrite_inputs
from cddrec.readers import BadLine
from cddrec.vocab import int_keys, is_int_key

from . import writers
from .codec import Encoded, KeyMapper, TopK, encode_flat
from .recommender import Recommender
from .requests import RequestBlock, compact, input_format, read_blocks
from .writers import WRITERS, ErrorWriter

KEY_MODES = ("auto", "str", "int")
STREAM_ERRORS_FILE = "cddrec-infer.errors.jsonl"  # the errors file of an output that is not a file (-, a FIFO)
FALLBACK_WARN_SHARE = 0.5  # more users than this share on the popularity fallback: "served with problems"


class BadInput(DataError):
    """A bad request line in strict mode."""


@dataclass
class BatchStats:
    lines: int = 0
    served: int = 0
    bad: int = 0
    unknown_items: int = 0
    fallbacks: int = 0
    seconds: float = 0.0
    errors_path: str | None = None

    @property
    def mostly_fallback(self) -> bool:
        """More than half of the served users got the popularity list: the item keys are probably not
        those the model knows (another column, another key type, another model)."""
        return self.served > 0 and self.fallbacks > FALLBACK_WARN_SHARE * self.served

    def summary(self) -> str:
        rate = self.served / self.seconds if self.seconds else 0.0
        text = (f"served {self.served} users ({rate:,.0f} users/s), bad lines {self.bad}, unknown items dropped "
                f"{self.unknown_items}, popularity fallbacks {self.fallbacks}")
        if self.mostly_fallback:
            text += (f"\nproblem: {self.fallbacks} of {self.served} users ({self.fallbacks / self.served:.0%}) had no "
                     "item the model knows and got the popularity list; are these the item keys the model was "
                     "trained on (the right --item-col, keys of the same type)?")
        return text

    def add(self, other: "BatchStats") -> None:
        for name in ("lines", "served", "bad", "unknown_items", "fallbacks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


# ----------------------------------------------------------------------------- duplicate users
def _user_hashes(users) -> np.ndarray:
    import polars as pl

    if isinstance(users, list):
        strings = pa.array([str(u) for u in users], pa.string())
    else:
        strings = users.cast(pa.string())
    return pl.Series(strings).hash(seed=0x5EED).to_numpy()


class SeenUsers:
    """Users seen so far as 64-bit hashes of their string keys, in sorted runs merged as they grow
    (a log-structured set: 16 bytes per user, O(log) runs to search)."""

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, their first lines)

    def check(self, hashes: np.ndarray, lines: np.ndarray) -> np.ndarray:
        """First line of each user seen before (earlier in the file or in this block), else 0; the
        rest are recorded."""
        n = len(hashes)
        first = np.zeros(n, dtype=np.int64)
        if n == 0:
            return first
        order = np.argsort(hashes, kind="stable")
        h = hashes[order]
        lead = np.ones(n, dtype=bool)
        lead[1:] = h[1:] != h[:-1]
        group_start = np.maximum.accumulate(np.where(lead, np.arange(n), 0))
        dup_in_block = ~lead
        first[order[dup_in_block]] = lines[order[group_start[dup_in_block]]]
        uh, ul, urows = h[lead], lines[order[lead]], order[lead]
        for rh, rl in self.runs:
            pos = np.searchsorted(rh, uh).clip(0, len(rh) - 1)
            hit = rh[pos] == uh
            if hit.any():
                earlier = rl[pos[hit]]
                rows = urows[hit]
                first[rows] = earlier
                # later copies in this block point to the earlier block's line too
                same = np.isin(h, uh[hit]) & dup_in_block
                first[order[same]] = earlier[np.searchsorted(uh[hit], h[same])]
        new = first[urows] == 0
        self._add(uh[new], ul[new])
        return first

    def _add(self, h: np.ndarray, lines: np.ndarray) -> None:
        if len(h):
            self.runs.append((h, lines))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (h1, l1), (h2, l2) = self.runs.pop(-2), self.runs.pop()
            self.runs.append(_merge_sorted(h1, l1, h2, l2))


def _merge_sorted(h1: np.ndarray, l1: np.ndarray, h2: np.ndarray, l2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sorted runs (hashes and their lines) in linear time and memory: each entry of the
    second run goes after the equal ones of the first (no argsort of the concatenation)."""
    n = len(h1) + len(h2)
    pos2 = np.searchsorted(h1, h2, side="right") + np.arange(len(h2))  # (n2,) places in the merged run
    from1 = np.ones(n, dtype=bool)
    from1[pos2] = False
    h, lines = np.empty(n, dtype=h1.dtype), np.empty(n, dtype=l1.dtype)
    h[pos2], lines[pos2] = h2, l2
    h[from1], lines[from1] = h1, l1
    return h, lines


# ----------------------------------------------------------------------------- encoding
def encode_block(block: RequestBlock, mapper: KeyMapper, max_history: int | None = None) -> Encoded:
    return encode_flat(block.histories.values, np.asarray(block.histories.offsets), mapper, max_history)


# ----------------------------------------------------------------------------- the loop
def serve(rec: Recommender, blocks: Iterable[RequestBlock], writer, errors: ErrorWriter, *, k: int,
          batch_size: int = 256, strict: bool = False, check_duplicates: bool = True, source: str = "input",
          progress: bool = False, max_history: int | None = None, keys: str = "auto", progress_every: float = 0.0,
          log: Callable[[str], None] | None = None) -> BatchStats:
    """Serve every block: read ahead on one thread, infer here, write behind on another. ``keys``
    (auto | str | int): the type of the keys written (see ``run_batch``). ``progress``: a tqdm bar (a
    terminal); ``progress_every`` > 0: a line through ``log`` at most that often (logs, CI, nohup)."""
    mapper = rec.mapper
    out_keys = mapper.keys_str if keys == "str" else mapper.out_keys
    seen = SeenUsers() if check_duplicates else None
    stats = BatchStats()

    def prepare(it: Iterator[RequestBlock]) -> tuple[RequestBlock, Encoded] | None:
        block = next(it, None)
        if block is None:
            return None
        if keys != "auto" and len(block):
            typed, not_int = typed_users(block.users, keys)
            if not_int.any():
                _drop(block, not_int, lambda i: f"user key {_user_at(block, i)!r} is not an integer (--keys int)")
                typed = [u for u, bad in zip(typed, not_int) if not bad] if isinstance(typed, list) \
                    else typed.filter(pa.array(~not_int))
            block.users = typed
        if seen is not None and len(block):
            first = seen.check(_user_hashes(block.users), block.lines)
            dup = first > 0
            if dup.any():
                _drop(block, dup, lambda i: f"duplicate user {_user_at(block, i)!r} (first on line {int(first[i])})")
        if strict and block.bad:
            b = block.bad[0]
            raise BadInput(f"{source}:{b.line}: {b.reason}")
        return block, encode_block(block, mapper, max_history)

    def write(blk: RequestBlock, enc: Encoded, res: TopK) -> None:
        errors.write(blk.bad)
        counts = res.valid.sum(axis=1)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        ids = np.asarray(res.items[res.valid], dtype=np.int64)
        items = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), out_keys.take(pa.array(ids - 1)))
        if len(blk):
            writer.write(blk.users, items, res.scores[res.valid], offsets, res.fallback)
        stats.lines += blk.n_lines
        stats.bad += len(blk.bad)
        stats.served += len(blk)
        stats.unknown_items += int(enc.unknown.sum())
        stats.fallbacks += int(res.fallback.sum())
        if bar is not None:
            bar.update(len(blk))
        elif progress_every and log is not None:
            now = time.perf_counter()
            if now - last_line[0] >= progress_every:
                last_line[0] = now
                with contextlib.suppress(OSError):  # a closed stderr must not fail the run
                    log(f"cddrec-infer: {stats.lines:,} lines read, {stats.served:,} users served "
                        f"({stats.served / (now - t0):,.0f}/s), {stats.bad:,} bad lines, {now - t0:.0f} s")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="user", desc="cddrec-infer", dynamic_ncols=True)
    t0 = time.perf_counter()
    last_line = [t0]  # when the last progress line was written (by the writer thread)
    it = iter(blocks)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="write") as writer_pool:
            pending = reader.submit(prepare, it)
            write_job = None
            while True:
                got = pending.result()  # re-raises reader errors (strict mode, unreadable file)
                if got is None:
                    break
                pending = reader.submit(prepare, it)  # read the next block during inference
                block, enc = got
                res = rec.infer_encoded(enc, k, batch_size)
                if write_job is not None:
                    write_job.result()
                write_job = writer_pool.submit(write, block, enc, res)
            if write_job is not None:
                write_job.result()
    finally:
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _user_at(block: RequestBlock, i: int):
    return block.users[i] if isinstance(block.users, list) else block.users[i].as_py()


def _drop(block: RequestBlock, rows: np.ndarray, reason) -> None:
    """In place: the ``rows`` (bool) of ``block`` become bad lines with ``reason(i)`` and their text."""
    block.bad.extend(BadLine(int(block.lines[i]), reason(i), block.text(int(block.lines[i])))
                     for i in np.flatnonzero(rows))
    block.bad.sort(key=lambda b: b.line)
    keep = ~rows
    block.lines = block.lines[keep]
    block.users = [u for u, kk in zip(block.users, keep) if kk] if isinstance(block.users, list) \
        else block.users.filter(pa.array(keep))
    block.histories = compact(block.histories.filter(pa.array(keep)))


def typed_users(users, keys: str) -> tuple[pa.Array | list, np.ndarray]:
    """Users as ``keys`` asks: "str" -> strings; "int" -> int64, with a mask of users that are not
    integers (canonical ASCII integers that fit int64, the key rule)."""
    n = len(users)
    if keys == "str":
        return (pa.array([str(u) for u in users], pa.string()) if isinstance(users, list)
                else users.cast(pa.string())), np.zeros(n, bool)
    if not isinstance(users, list) and pa.types.is_integer(users.type):
        return users.cast(pa.int64()), np.zeros(n, bool)
    if not isinstance(users, list):
        return int_keys(users.cast(pa.string()))
    bad = np.array([not (type(u) is int or is_int_key(u)) for u in users], dtype=bool)  # mixed keys (rare)
    return pa.array([0 if b else int(u) for u, b in zip(users, bad)], pa.int64()), bad


def errors_path_for(output_path: str | Path) -> Path:
    """``OUTPUT.errors.jsonl`` beside a file output; ``cddrec-infer.errors.jsonl`` in the current
    folder for an output that is not a file (``-``, a FIFO, a device)."""
    out = output_target(output_path)
    return out.path.with_name(out.path.name + ".errors.jsonl") if out.is_file else Path(STREAM_ERRORS_FILE)


def check_paths(input_path: Path, output_path: Path, errors_path: Path | None = None,
                model_path: Path | None = None) -> None:
    """Refuse a missing input, and an output (or its errors file) that is the input or the model, or resolves
    to one of them."""
    if not input_path.exists():
        hint = ""
        if any(c in str(input_path) for c in "*?["):
            hint = (" (a glob: one run reads one file; serve many shards with --ray local, one output per "
                    "shard, or concatenate them)")
        raise DataError(f"{input_path}: no such file{hint}")
    if input_path.is_dir():
        raise DataError(f"{input_path}: is a directory, expected a request file (a folder of shards needs --ray)")
    refuse_overwrite_inputs({"--output": output_path, "errors file": errors_path or errors_path_for(output_path)},
                            {"--batch": input_path, "--model": model_path})


def run_batch(rec: Recommender, input_path: str | Path, output_path: str | Path, *, k: int | None = None,
              batch_size: int = 256, strict: bool = False, output_format: str | None = None,
              in_format: str | None = None, check_duplicates: bool = True, progress: bool = False,
              log_options: dict | None = None, block_bytes: int | None = None, keys: str = "auto",
              errors_path: str | Path | None = None, name: str | None = None, progress_every: float = 0.0,
              log: Callable[[str], None] | None = None) -> BatchStats:
    """Serve every request of ``input_path`` into ``output_path``; returns the counts.

    ``output_path``: a file (temporary file, then rename, under the output's lock), or ``-``, a FIFO
    or a character device, written straight through (with ``strict``, only once every line is
    good). ``output_format`` jsonl | csv | parquet, by default from the output's suffix. Bad lines
    go to ``errors_path`` (default ``errors_path_for(output_path)``; removed when there are none).
    ``keys``: the type of the keys written: auto (items as the model's vocabulary: integers when
    every key is an integer; users as they came), str (every key a string) or int (every key an
    integer: the vocabulary's must be, a user that is not is a bad line). ``name`` is the input's
    name in messages (default its path). ``progress`` / ``progress_every`` / ``log``: see ``serve``."""
    input_path, output_path = Path(input_path), Path(output_path)
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if keys not in KEY_MODES:
        raise DataError(f"keys must be one of {KEY_MODES}, got {keys!r}")
    if keys == "int" and rec.info.vocab.key_type != "int":
        example = next((x for x in rec.info.vocab.keys if not is_int_key(x)), "")
        raise DataError(f"--keys int: the model's item keys are not all integers (for example {example!r}); "
                        "use --keys auto or str")
    errors_path = Path(errors_path) if errors_path else errors_path_for(output_path)
    check_paths(input_path, output_path, errors_path, rec.path)
    k = rec.check_k(k)
    fmt = input_format(input_path, in_format)
    out_fmt = writers.output_format(output_path, output_format)
    kwargs = {} if block_bytes is None else {"block_bytes": block_bytes, "block_rows": max(1, block_bytes // 128)}
    blocks = read_blocks(input_path, fmt, log_options, **kwargs)
    wkw = {}
    if out_fmt == "parquet":
        int_items = rec.info.vocab.key_type == "int" and keys != "str"
        wkw = {"user_type": pa.int64() if keys == "int" else pa.string() if keys == "str"
               else _parquet_user_type(input_path, fmt), "item_type": pa.int64() if int_items else pa.string()}
    max_history = getattr(rec, "max_history", None)  # as Recommender.recommend and the server
    with output_lock(output_path, errors_path, option="--output"), _output_file(output_path, strict) as out, \
            _output_file(errors_path, strict) as err:
        writer = WRITERS[out_fmt](out, **wkw)
        try:
            stats = serve(rec, blocks, writer, ErrorWriter(err), k=k, batch_size=batch_size, strict=strict,
                          check_duplicates=check_duplicates and fmt != "log", source=name or str(input_path),
                          progress=progress, max_history=max_history, keys=keys, progress_every=progress_every,
                          log=log)
        except BaseException:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                writer.close()
            raise
        writer.close()
        out.flush()  # a write error surfaces here, before any file of the run is put in place
        err.flush()
    if stats.bad:
        stats.errors_path = str(errors_path)
    elif output_target(errors_path).is_file:
        errors_path.unlink(missing_ok=True)
    return stats


@contextlib.contextmanager
def _output_file(path: Path, strict: bool) -> Iterator:
    """A binary file object for an output (``cddrec.io``); a stream in strict mode is spooled and
    sent only when the run succeeds, so a bad line sends nothing."""
    if strict and not output_target(path).is_file:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            yield f
    else:
        with atomic_open(path, "wb") as f:
            yield f


def _parquet_user_type(input_path: Path, fmt: str) -> pa.DataType:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        t = pq.read_schema(input_path).field("user").type
        if pa.types.is_integer(t):
            return pa.int64()
    return pa.string()
