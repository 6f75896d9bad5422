"""Readers of user data files (torch-free), one behaviour for training, evaluation and serving.

``.txt`` sequence files hold ``user item item ...`` lines in time order (fields split at ASCII
whitespace only); ``.csv``/``.tsv``/``.parquet`` interaction logs hold user, item and timestamp
columns. :func:`read_log` reads a log into rows and bad rows (each with its line and reason):
training and evaluation refuse a file at its first bad row, ``cddrec-infer`` reports the bad rows
and serves the rest. Keys follow the one key rule of :mod:`cddrec.vocab`.

CSV rules: lines end at ``\\n`` (``\\r\\n`` alike), or at ``\\r`` in a file without any ``\\n``
(classic Mac); a ``\\r`` elsewhere outside quotes, an unclosed quote, a field over 128 KB, a
row with another number of fields than the header, or bytes that are not UTF-8 make that row bad
(an unclosed quote is reported on the line where it opens, and reading resumes on the next
line). A header naming a needed column twice is refused. Parquet: integral floats are integer
keys (pandas stores nullable ints as float), NaN or null values make a row bad, and typed
timestamps are read exactly at any date.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import DataError, first_line
from .vocab import key_problem

SEQUENCE_SUFFIXES = (".txt", ".seq")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
PARQUET_SUFFIXES = (".parquet", ".pq")
BOM = b"\xef\xbb\xbf"
TEXT_LIMIT = 200  # characters of a bad line kept in reports
_ASCII_SPACE = re.compile(r"[ \t\n\r\f\v]+")


@dataclass
class BadLine:
    """A line (or Parquet row: row + 1, the header counting as line 1) that cannot be used."""

    line: int
    reason: str
    text: str = ""


def shown(text: str) -> str:
    """The text of a bad line as reports keep it: at most ``TEXT_LIMIT`` characters."""
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + "..."


def read_sequence_file(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read ``user item item ...`` lines (time order). Blank lines are skipped."""
    path = Path(path)
    users: list[str] = []
    seqs: list[list[str]] = []
    seen: dict[str, int] = {}
    for lineno, line in _lines(path):
        parts = [p for p in _ASCII_SPACE.split(line) if p]
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'user item [item ...]' (a user key and at "
                            f"least one item key), got 1 field: {line.strip()[:80]!r}")
        for what, key in [("user", parts[0])] + [("item", p) for p in parts[1:]]:
            problem = key_problem(key)
            if problem:
                raise DataError(f"{path}:{lineno}: {what} key {problem}")
        u = parts[0]
        if u in seen:
            raise DataError(f"{path}:{lineno}: user {u!r} appears again (first on line {seen[u]}); "
                            "the sequence format needs one line per user")
        seen[u] = lineno
        users.append(u)
        seqs.append(parts[1:])
    if not users:
        raise DataError(f"{path}: no sequences found (expected lines 'user item item ...')")
    return users, seqs


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered text lines, decoded one by one so a byte that is not UTF-8 names its line; a UTF-8
    byte-order mark at the start of the file is skipped."""
    _check_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]  # a UTF-8 byte-order mark (Excel "CSV UTF-8") is not data
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1}: {e.reason})") from None


# ------------------------------------------------------------------------- interaction logs
@dataclass
class LogRows:
    """The good rows of a log (file order) and its bad rows (line order)."""

    lines: list[int] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)

    def raise_first_bad(self, path: Path) -> None:
        """Training and evaluation refuse a log at its first bad row."""
        if self.bad:
            b = min(self.bad, key=lambda x: x.line)
            more = f" (and {len(self.bad) - 1} more bad rows)" if len(self.bad) > 1 else ""
            raise DataError(f"{path}:{b.line}: {b.reason}{more}")


def read_log(path: str | Path, user_col: str = "user", item_col: str = "item", time_col: str | None = "timestamp",
             sep: str | None = None) -> LogRows:
    """Every row of a CSV/TSV/Parquet log checked: user and item keys (the key rule) and the time
    (a number of unix seconds, or a typed Parquet timestamp/date); bad rows keep their line."""
    path = Path(path)
    cols = [user_col, item_col] + ([time_col] if time_col else [])
    if path.suffix.lower() in PARQUET_SUFFIXES:
        raw = parquet_log_rows(path, cols)
    else:
        raw = csv_log_rows(path, cols, sep)
    out = LogRows(bad=raw.bad)
    for ln, rec, text in zip(raw.lines, raw.values, raw.texts):
        problem = _row_problem(rec, cols, time_col)
        if isinstance(problem, str):
            out.bad.append(BadLine(ln, problem, text))
            continue
        out.lines.append(ln)
        out.users.append(rec[0])
        out.items.append(rec[1])
        out.times.append(problem)
    out.bad.sort(key=lambda b: b.line)
    return out


def _row_problem(rec: list, cols: list[str], time_col: str | None) -> str | float:
    """Why a row is bad, or its time (0.0 without a time column)."""
    for what, v, col in (("user", rec[0], cols[0]), ("item", rec[1], cols[1])):
        if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
            return f"empty {what} value (column {col!r})"
        if isinstance(v, float):
            return f"{what} key {v!r} in column {col!r} is not an integer"
        if isinstance(v, bytes):
            return f"{what} key in column {col!r} is not UTF-8 text"
        problem = key_problem(v)
        if problem:
            return f"{what} key {problem}"
    if not time_col:
        return 0.0
    v = rec[2]
    try:
        t = float(v)
    except (TypeError, ValueError):
        return f"column {time_col!r} must be a number (unix time), got {'nothing' if v is None else repr(v)}"
    if math.isnan(t):
        return f"column {time_col!r} is NaN"
    return t


def read_interaction_table(path: str | Path, user_col: str = "user", item_col: str = "item",
                           time_col: str | None = "timestamp", sep: str | None = None
                           ) -> tuple[list[str], list[list[str]]]:
    """Read a CSV, TSV or Parquet log with user, item and timestamp columns; a bad row is a
    ``DataError`` naming its line (the first one).

    Interactions are stably sorted by time within each user (ties keep file order); with
    ``time_col=None`` file order is time order. Returns users in order of first appearance.
    """
    path = Path(path)
    rows = read_log(path, user_col, item_col, time_col, sep)
    rows.raise_first_bad(path)
    per_user: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for ln, u, it, t in zip(rows.lines, rows.users, rows.items, rows.times):
        per_user[u].append((t, ln, it))
    if not per_user:
        raise DataError(f"{path}: no interactions found")
    users = list(per_user)
    seqs = [[it for _, _, it in sorted(per_user[u], key=lambda r: (r[0], r[1]))] for u in users]
    return users, seqs


@dataclass
class RawRows:
    """Rows of a log as read: line numbers, the needed columns' values, the row texts; bad rows."""

    lines: list[int] = field(default_factory=list)
    values: list[list] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)


_CSV_REASONS = (
    ("new-line character seen in unquoted field", "a carriage return (\\r) inside an unquoted field"),
    ("unexpected end of data", "a quote opened on this line is never closed"),
    ("field larger than field limit", "a field over {limit} bytes (a quote opened on this line and never closed?)"),
)


def _csv_reason(e: csv.Error, kind: str) -> str:
    msg = str(e)
    for needle, reason in _CSV_REASONS:
        if needle in msg:
            return reason.format(limit=csv.field_size_limit())
    return f"not a valid {kind} row: {msg}"


def csv_log_rows(path: Path, cols: list[str], sep: str | None) -> RawRows:
    """The ``cols`` of every row of a CSV/TSV log, as strings (stripped), with bad rows."""
    _check_file(path)
    if sep is None:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
    kind = "TSV" if sep == "\t" else "CSV"
    out = RawRows()
    entries = _text_lines(path, out.bad)
    records = _csv_records(entries, sep, kind, out.bad)
    header = next(records, None)
    if header is None:
        raise DataError(f"{path}: empty file, expected a header line with {cols}")
    idx, width = column_indices(path, header[1], cols, header[0])
    for lineno, rec in records:
        if not rec or all(not x.strip() for x in rec):
            continue
        text = sep.join(rec)
        if len(rec) != width:
            out.bad.append(BadLine(lineno, f"expected {width} fields as in the header, got {len(rec)}", shown(text)))
            continue
        out.lines.append(lineno)
        out.values.append([rec[i].strip() for i in idx])
        out.texts.append(shown(text))
    return out


def _text_lines(path: Path, bad: list[BadLine]) -> list[tuple[int, str]]:
    """(line number, text) of every line that decodes; the others go to ``bad``. Lines end at \\n
    (a \\r before it is dropped), or at \\r in a file that has no \\n at all."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(BOM):
        data = data[len(BOM):]
    cr_only = b"\n" not in data and b"\r" in data
    raws = data.split(b"\r" if cr_only else b"\n")
    if raws and raws[-1] == b"":
        raws.pop()
    entries = []
    for lineno, raw in enumerate(raws, 1):
        if not cr_only and raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            entries.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            bad.append(BadLine(lineno, f"not UTF-8 text (byte {e.start + 1}: {e.reason})",
                               shown(raw.decode("utf-8", "backslashreplace"))))
    return entries


def _csv_records(entries: list[tuple[int, str]], sep: str, kind: str, bad: list[BadLine]
                 ) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each CSV record; a record the csv module rejects is a bad row at the
    line it starts on, and reading resumes on the next line."""
    pos = 0

    def feed():
        nonlocal pos
        while pos < len(entries):
            pos += 1
            yield entries[pos - 1][1] + "\n"  # a quoted field over several lines keeps its line breaks

    reader = csv.reader(feed(), delimiter=sep, strict=True)
    while pos < len(entries):
        start = pos
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            bad.append(BadLine(entries[start][0], _csv_reason(e, kind), shown(entries[start][1])))
            pos = start + 1
            reader = csv.reader(feed(), delimiter=sep, strict=True)
            continue
        yield entries[start][0], rec


def column_indices(path: Path, header: list[str], cols: list[str], line: int = 1) -> tuple[list[int], int]:
    """Positions of ``cols`` in a CSV/TSV header, and the header's width; a DataError naming the
    missing columns, or a needed column named twice, otherwise."""
    header = [h.strip() for h in header]
    missing = [c for c in cols if c not in header]
    if missing:
        raise DataError(f"{path}:{line}: missing column(s) {missing} in header {header} "
                        "(set --user-col/--item-col/--time-col)")
    twice = [c for c in dict.fromkeys(cols) if header.count(c) > 1]
    if twice:
        raise DataError(f"{path}:{line}: column(s) {twice} appear more than once in header {header}; "
                        "rename them so each column is named once")
    return [header.index(c) for c in cols], len(header)


# ------------------------------------------------------------------------------- Parquet logs
def parquet_log_rows(path: Path, cols: list[str]) -> RawRows:
    """The ``cols`` of a Parquet log, row N being line N + 1: keys as text (integral floats as
    integers), times as unix seconds (typed timestamps and dates exactly, at any date); a value
    that cannot be a key or a time is None or text that the row check rejects."""
    table = read_parquet_table(path, cols)
    columns = [_parquet_values(table.column(c), c, i == 2) for i, c in enumerate(cols)]
    n = table.num_rows
    out = RawRows(lines=list(range(2, n + 2)), values=[list(r) for r in zip(*columns)])
    out.texts = [shown(", ".join(f"{c}={v!r}" for c, v in zip(cols, r))) for r in out.values]
    return out


def read_parquet_table(path: Path, cols: list[str]):
    """The ``cols`` of a Parquet file as an Arrow table; one-line errors for an unreadable file,
    missing columns or a needed column named twice."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    _check_file(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e, 160)})") from None
    names = schema.names
    missing = [c for c in cols if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {names} (set --user-col/--item-col/--time-col)")
    twice = [c for c in dict.fromkeys(cols) if names.count(c) > 1]
    if twice:
        raise DataError(f"{path}: column(s) {twice} appear more than once; rename them so each column is named once")
    try:
        return pq.read_table(path, columns=list(dict.fromkeys(cols)))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e, 160)})") from None


def _parquet_values(col, name: str, is_time: bool) -> list:
    """Python values of one Parquet column: keys as text, times as numbers (see parquet_log_rows)."""
    import numpy as np
    import pyarrow as pa

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if is_time and (pa.types.is_timestamp(t) or pa.types.is_date(t)):
        unit_seconds = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}
        if pa.types.is_date32(t):
            raw, scale = col.cast(pa.int32()).cast(pa.int64()), 1 / 86400
        elif pa.types.is_date64(t):
            raw, scale = col.cast(pa.int64()), 1e3
        else:
            raw, scale = col.cast(pa.int64()), unit_seconds[t.unit]
        valid = np.asarray(raw.is_valid())
        secs = raw.fill_null(0).to_numpy().astype(np.float64) / scale  # exact int64 -> float: any date
        return [float(s) if ok else None for s, ok in zip(secs, valid)]
    if pa.types.is_floating(t):
        vals = col.to_pylist()
        if is_time:
            return vals
        return [None if v is None else _float_key(v) for v in vals]
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        raw = col.cast(pa.large_binary()) if not pa.types.is_large_binary(t) else col
        return [None if v is None else _decode(v) for v in raw.to_pylist()]
    if pa.types.is_integer(t):
        return [None if v is None else (v if is_time else str(v)) for v in col.to_pylist()]
    return [None if v is None else str(v) for v in col.to_pylist()]


def _float_key(v: float) -> str | float:
    """An integral float as integer text (781.0 -> "781"); NaN and fractions stay floats, which the
    row check rejects as keys."""
    if math.isfinite(v) and v == int(v):
        return str(int(v))
    return v


def _decode(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw  # the row check rejects it: not a string key


def kcore_filter(users: list[str], seqs: list[list[str]], k: int) -> tuple[list[str], list[list[str]]]:
    """Keep users and items with at least k interactions, repeated until both hold."""
    if k <= 1:
        return users, seqs
    while True:
        counts = Counter(it for s in seqs for it in s)
        new = [[it for it in s if counts[it] >= k] for s in seqs]
        keep = [i for i, s in enumerate(new) if len(s) >= k]
        changed = len(keep) != len(seqs) or any(len(new[i]) != len(seqs[i]) for i in keep)
        users, seqs = [users[i] for i in keep], [new[i] for i in keep]
        if not changed:
            return users, seqs
