"""Batch serving: stream a file of user histories through a ``Recommender``.

Input: JSONL lines ``{"user": key, "history": [item keys, oldest first]}``, or an interaction
log (CSV/TSV/Parquet with user, item, timestamp columns) grouped per user. Output: JSONL
``{"user": key, "items": [...], "scores": [...]}`` (plus ``"fallback": "popular"`` where no
history item is known) in input order, or CSV rows ``user,rank,item,score,fallback``.

JSONL input streams: lines are read, parsed and encoded one batch ahead on a reader thread
and written on a writer thread while the backend runs the current batch, so a 10-million-line
file never sits in memory (only a 64-bit hash per user, to catch duplicates). Logs are
grouped in memory. Bad lines go to ``OUTPUT.errors.jsonl`` with their line number and reason;
``strict`` stops at the first one with no output. Outputs are written to temporary files and
renamed at the end, so a crash never leaves a truncated file that looks complete.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cddrec.errors import DataError
from cddrec.io import atomic_open
from cddrec.readers import read_interaction_table
from cddrec.vocab import typed_key

from .recommender import Recommender

LOG_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


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

    def summary(self) -> str:
        rate = self.served / self.seconds if self.seconds else 0.0
        return (f"served {self.served} users ({rate:,.0f} users/s), bad lines {self.bad}, unknown items dropped "
                f"{self.unknown_items}, popularity fallbacks {self.fallbacks}")


@dataclass
class Request:
    line: int
    user: object
    ids: np.ndarray
    unknown: int


@dataclass
class BadLine:
    line: int
    reason: str
    text: str


def _key_ok(v) -> bool:
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def parse_line(text: str, lineno: int) -> tuple[object, list] | BadLine:
    """(user, history) of a JSONL request line, or why it is bad."""
    shown = text.strip()[:200]
    if not text.strip():
        return BadLine(lineno, "blank line", "")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(lineno, f"invalid JSON: {e.msg} (column {e.colno})", shown)
    if not isinstance(obj, dict):
        return BadLine(lineno, f"expected a JSON object, got {type(obj).__name__}", shown)
    if "user" not in obj:
        return BadLine(lineno, "missing field 'user'", shown)
    if not _key_ok(obj["user"]):
        return BadLine(lineno, f"field 'user' must be a string or integer, got {type(obj['user']).__name__}", shown)
    if "history" not in obj:
        return BadLine(lineno, "missing field 'history'", shown)
    hist = obj["history"]
    if not isinstance(hist, list):
        return BadLine(lineno, f"field 'history' must be a list of item keys, got {type(hist).__name__}", shown)
    for j, item in enumerate(hist):
        if not _key_ok(item):
            return BadLine(lineno, f"field 'history' entry {j} must be a string or integer, "
                                   f"got {type(item).__name__}", shown)
    return obj["user"], hist


def iter_requests(path: Path, fmt: str, log_options: dict) -> Iterator[tuple[int, object]]:
    """(line number, parsed (user, history) or BadLine) for every input line or logged user."""
    if fmt == "log":
        users, seqs = read_interaction_table(path, **log_options)
        for n, (u, s) in enumerate(zip(users, seqs), 1):
            yield n, (typed_key(u), s)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadLine(lineno, f"not UTF-8 text ({e.reason})", "")
                continue
            yield lineno, parse_line(text, lineno)


def input_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "log" if path.suffix.lower() in LOG_SUFFIXES else "jsonl"


def run_batch(rec: Recommender, input_path: str | Path, output_path: str | Path, *, k: int | None = None,
              batch_size: int = 256, strict: bool = False, output_format: str = "jsonl", in_format: str | None = None,
              check_duplicates: bool = True, progress: bool = False, log_options: dict | None = None) -> BatchStats:
    """Serve every request of ``input_path`` into ``output_path``; returns the counts."""
    import time

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise DataError(f"{input_path}: no such file")
    k = rec.check_k(k)
    fmt = input_format(input_path, in_format)
    stats = BatchStats()
    seen: dict[int, int] = {}
    errors_path = output_path.with_name(output_path.name + ".errors.jsonl")

    def batches() -> Iterator[tuple[list[Request], list[BadLine]]]:
        reqs: list[Request] = []
        bad: list[BadLine] = []
        for lineno, parsed in iter_requests(input_path, fmt, log_options or {}):
            stats.lines += 1
            if not isinstance(parsed, BadLine) and check_duplicates:
                h = hash(str(parsed[0]))
                first = seen.setdefault(h, lineno)
                if first != lineno:
                    parsed = BadLine(lineno, f"duplicate user {parsed[0]!r} (first on line {first})", "")
            if isinstance(parsed, BadLine):
                if strict:
                    raise BadInput(f"{input_path}:{parsed.line}: {parsed.reason}")
                bad.append(parsed)
                continue
            ids, unknown = rec.encode(parsed[1])
            reqs.append(Request(lineno, parsed[0], ids, unknown))
            if len(reqs) == batch_size:
                yield reqs, bad
                reqs, bad = [], []
        if reqs or bad:
            yield reqs, bad

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="user", desc="cddrec-infer", dynamic_ncols=True)
    t0 = time.perf_counter()
    with atomic_open(output_path, "w", encoding="utf-8") as out, \
            atomic_open(errors_path, "w", encoding="utf-8") as err, \
            ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        if output_format == "csv":
            out.write("user,rank,item,score,fallback\n")
        it = batches()
        sentinel = object()
        pending = reader.submit(next, it, sentinel)
        write_job = None
        while True:
            item = pending.result()  # re-raises reader errors (strict mode, unreadable file)
            if item is sentinel:
                break
            pending = reader.submit(next, it, sentinel)  # read the next batch during inference
            reqs, bad = item
            recs = rec.recommend_encoded([r.ids for r in reqs], k, [r.unknown for r in reqs]) if reqs else []
            if write_job is not None:
                write_job.result()
            write_job = writer.submit(_write, out, err, reqs, recs, bad, output_format, stats)
            if bar is not None:
                bar.update(len(reqs))
        if write_job is not None:
            write_job.result()
        stats.seconds = time.perf_counter() - t0
    if stats.bad:
        stats.errors_path = str(errors_path)
    else:
        errors_path.unlink(missing_ok=True)
    if bar is not None:
        bar.close()
    return stats


def _write(out, err, reqs: list[Request], recs, bad: list[BadLine], output_format: str, stats: BatchStats) -> None:
    for b in bad:
        err.write(json.dumps(asdict(b)) + "\n")
    stats.bad += len(bad)
    lines = []
    for r, rec in zip(reqs, recs):
        stats.served += 1
        stats.unknown_items += r.unknown
        if rec.fallback:
            stats.fallbacks += 1
        if output_format == "csv":
            for rank, (item, score) in enumerate(zip(rec.items, rec.scores), 1):
                lines.append(f"{_csv(r.user)},{rank},{_csv(item)},{score:.6g},{rec.fallback or ''}\n")
        else:
            line = {"user": r.user, "items": rec.items, "scores": [round(s, 6) for s in rec.scores]}
            if rec.fallback:
                line["fallback"] = rec.fallback
            lines.append(json.dumps(line) + "\n")
    out.write("".join(lines))


def _csv(v) -> str:
    s = str(v)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s
