"""Readers of user data files (torch-free).

``.txt`` sequence files hold ``user item item ...`` lines in time order; ``.csv``/``.tsv``/
``.parquet`` interaction logs hold user, item and timestamp columns. Errors name the file, the
line and what was expected.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

from .errors import DataError

SEQUENCE_SUFFIXES = (".txt", ".seq")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
BOM = b"\xef\xbb\xbf"


def read_sequence_file(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read ``user item item ...`` lines (time order). Blank lines are skipped."""
    path = Path(path)
    users: list[str] = []
    seqs: list[list[str]] = []
    seen: dict[str, int] = {}
    for lineno, line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'user item [item ...]' (a user key and at "
                            f"least one item key), got 1 field: {line.strip()[:80]!r}")
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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered text lines, decoded one by one so a byte that is not UTF-8 names its line; a UTF-8
    byte-order mark at the start of the file is skipped."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]  # a UTF-8 byte-order mark (Excel "CSV UTF-8") is not data
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1}: {e.reason})") from None


def read_interaction_table(path: str | Path, user_col: str = "user", item_col: str = "item",
                           time_col: str | None = "timestamp", sep: str | None = None
                           ) -> tuple[list[str], list[list[str]]]:
    """Read a CSV, TSV or Parquet log with user, item and timestamp columns.

    Interactions are stably sorted by time within each user (ties keep file order); with
    ``time_col=None`` file order is time order. Returns users in order of first appearance.
    """
    path = Path(path)
    rows = _table_rows(path, [user_col, item_col] + ([time_col] if time_col else []), sep)
    per_user: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for lineno, rec in rows:
        u, it = rec[0], rec[1]
        if u == "" or it == "":
            raise DataError(f"{path}:{lineno}: empty {'user' if u == '' else 'item'} value")
        if time_col:
            try:
                t = float(rec[2])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{lineno}: column {time_col!r} must be a number "
                                f"(unix time), got {rec[2]!r}") from None
            if math.isnan(t):
                raise DataError(f"{path}:{lineno}: column {time_col!r} is NaN")
        else:
            t = 0.0
        per_user[u].append((t, lineno, it))
    if not per_user:
        raise DataError(f"{path}: no interactions found")
    users = list(per_user)
    seqs = [[it for _, _, it in sorted(per_user[u], key=lambda r: (r[0], r[1]))] for u in users]
    return users, seqs


def _table_rows(path: Path, cols: list[str], sep: str | None) -> Iterator[tuple[int, list[str]]]:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        columns = parquet_log_columns(path, cols)
        for i, rec in enumerate(zip(*columns)):
            yield i + 2, list(rec)  # "line" = row + header
        return
    if sep is None:
        sep = "\t" if suffix == ".tsv" else ","
    reader = csv.reader((line for _, line in _lines(path)), delimiter=sep)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file, expected a header line with {cols}") from None
    idx, width = column_indices(path, header, cols)
    for rec in reader:
        lineno = reader.line_num
        if not rec or all(not x.strip() for x in rec):
            continue
        if len(rec) != width:
            raise DataError(f"{path}:{lineno}: expected {width} fields as in the header, got {len(rec)}")
        yield lineno, [rec[i].strip() for i in idx]


def parquet_log_columns(path: Path, cols: list[str]) -> list[list[str]]:
    """The ``cols`` of a Parquet log as strings ("" for null); Arrow timestamp and date columns become
    unix seconds, so a typed time column sorts as a number."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        table = pq.read_table(path, columns=None)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {table.column_names} "
                        "(set --user-col/--item-col/--time-col)")
    out = []
    for c in cols:
        col = table.column(c)
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            col = pc.divide(col.cast(pa.timestamp("us")).cast(pa.int64()).cast(pa.float64()), 1e6)  # unix seconds
        out.append(["" if v is None else str(v) for v in col.to_pylist()])
    return out


def column_indices(path: Path, header: list[str], cols: list[str]) -> tuple[list[int], int]:
    """Positions of ``cols`` in a CSV/TSV header, and the header's width; a DataError naming the
    missing columns otherwise."""
    header = [h.strip() for h in header]
    missing = [c for c in cols if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {missing} in header {header} "
                        "(set --user-col/--item-col/--time-col)")
    return [header.index(c) for c in cols], len(header)


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


