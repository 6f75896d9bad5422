"""Reading and validating request files in columnar blocks (torch-free).

Inputs, all streamed in blocks except logs:

- JSONL, one request per line: ``{"user": key, "history": [item keys, oldest first]}``. A block of
  lines is parsed by pyarrow's JSON reader; a block it rejects (or that holds anything but a
  string/integer user and a list of strings or integers) is re-parsed line by line with
  :func:`parse_line`, so each bad line is reported with its number and reason and the good lines of
  the block are still served. A UTF-8 byte-order mark before line 1 is skipped.
- Parquet with a ``user`` column and a list column ``history``: requests, row N is "line" N.
- Interaction logs (CSV/TSV, or Parquet without a list column ``history``): columns user, item,
  timestamp, grouped per user in memory (interactions stably sorted by time, users in order of
  first appearance); a bad row is reported with its line and the rest are served.

Every block is a :class:`RequestBlock`: line numbers, users, histories (an Arrow list array of item
keys) and the bad lines among them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from cddrec.errors import DataError
from cddrec.readers import column_indices, parquet_log_columns
from cddrec.vocab import typed_key

from .codec import is_key

LOG_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
BLOCK_BYTES = 4 << 20  # JSONL bytes per block
BLOCK_ROWS = 32768  # Parquet rows per block
BOM = b"\xef\xbb\xbf"


@dataclass
class BadLine:
    line: int
    reason: str
    text: str


@dataclass
class RequestBlock:
    """Good requests of a block (in input order) and its bad lines."""

    lines: np.ndarray  # (n,) int64 line numbers of the good requests
    users: pa.Array | list  # n user keys: an int64 or string array, or a list of mixed keys
    histories: pa.ListArray  # n lists of item keys (int64 or string), oldest first
    bad: list[BadLine] = field(default_factory=list)
    n_lines: int = 0  # lines the block covers, good and bad

    def __len__(self) -> int:
        return len(self.lines)


# --------------------------------------------------------------------------- one line (slow path)
def parse_line(text: str, lineno: int) -> tuple[object, list] | BadLine:
    """(user, history) of a JSONL request line, or why it is bad. Never raises."""
    shown = text.strip()[:200]
    if not text.strip():
        return BadLine(lineno, "blank line", "")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(lineno, f"invalid JSON: {e.msg} (column {e.colno})", shown)
    except RecursionError:
        return BadLine(lineno, "invalid JSON: nested too deeply", shown)
    except ValueError as e:  # integers over the int-string conversion limit
        return BadLine(lineno, f"invalid JSON: {str(e).splitlines()[0][:120]}", shown)
    if not isinstance(obj, dict):
        return BadLine(lineno, f"expected a JSON object, got {type(obj).__name__}", shown)
    if "user" not in obj:
        return BadLine(lineno, "missing field 'user'", shown)
    if not is_key(obj["user"]):
        return BadLine(lineno, f"field 'user' must be a string or integer, got {type(obj['user']).__name__}", shown)
    if "history" not in obj:
        return BadLine(lineno, "missing field 'history'", shown)
    hist = obj["history"]
    if not isinstance(hist, list):
        return BadLine(lineno, f"field 'history' must be a list of item keys, got {type(hist).__name__}", shown)
    for j, item in enumerate(hist):
        if not is_key(item):
            return BadLine(lineno, f"field 'history' entry {j} must be a string or integer, "
                                   f"got {type(item).__name__}", shown)
    return obj["user"], hist


def block_from_pairs(lines: list[int], users: list, hists: list[list], bad: list[BadLine], n_lines: int
                     ) -> RequestBlock:
    """A RequestBlock from Python values (the slow paths). Item keys become strings unless all are ints."""
    flat = [x for h in hists for x in h]
    offsets = np.zeros(len(hists) + 1, dtype=np.int32)
    np.cumsum([len(h) for h in hists], out=offsets[1:])
    values = _key_array(flat)
    hist_arr = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
    return RequestBlock(np.asarray(lines, dtype=np.int64), _user_array(users), hist_arr, bad, n_lines)


def _key_array(keys: list) -> pa.Array:
    if all(type(k) is int and -2**63 <= k < 2**63 for k in keys):
        return pa.array(keys, pa.int64())
    return pa.array([str(k) for k in keys], pa.string())


def _user_array(users: list) -> pa.Array | list:
    if all(type(u) is str for u in users):
        return pa.array(users, pa.string())
    if all(type(u) is int and -2**63 <= u < 2**63 for u in users):
        return pa.array(users, pa.int64())
    return list(users)  # mixed (or huge) keys: written run by run


# --------------------------------------------------------------------------- JSONL
_USER_TYPES = (pa.int64(), pa.string())
_ITEM_TYPES = (pa.int64(), pa.string(), pa.null())


def _fast_block(buf: bytes, first_line: int, n_lines: int, schema: list) -> RequestBlock | None:
    """Parse a block of whole lines with pyarrow; None where the block needs the line-by-line path."""
    try:
        return _arrow_block(buf, first_line, n_lines, schema)
    except pa.ArrowException:  # anything unexpected: the line-by-line path decides
        return None


def _arrow_block(buf: bytes, first_line: int, n_lines: int, schema: list) -> RequestBlock | None:
    import pyarrow.json as pj

    try:
        buf.decode("utf-8")  # pyarrow would let some invalid bytes through
    except UnicodeDecodeError:
        return None
    ropts = pj.ReadOptions(use_threads=False, block_size=max(len(buf) + 1, 1 << 16))
    table = None
    if schema[0] == "mixed":
        block = _mixed_block(buf, first_line, n_lines, ropts)
        if block is not None:
            return block
    elif schema[0] is not None:
        try:
            table = pj.read_json(pa.BufferReader(buf), read_options=ropts, parse_options=pj.ParseOptions(
                explicit_schema=schema[0], unexpected_field_behavior="ignore"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            table = None
    if table is None:
        try:
            table = pj.read_json(pa.BufferReader(buf), read_options=ropts)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            block = _mixed_block(buf, first_line, n_lines, ropts) if schema[0] != "mixed" else None
            if block is not None:
                schema[0] = "mixed"
            return block
    if table.num_rows != n_lines or "user" not in table.column_names or "history" not in table.column_names:
        return None  # blank lines (skipped by pyarrow), two objects on a line, missing fields
    users, hist = table.column("user"), table.column("history")
    if users.type not in _USER_TYPES or not pa.types.is_list(hist.type) or hist.type.value_type not in _ITEM_TYPES:
        return None
    users, hist = users.combine_chunks(), hist.combine_chunks()
    if users.null_count or hist.null_count or hist.values.null_count:
        return None
    if hist.type.value_type == pa.null():
        offs = np.asarray(hist.offsets)
        if offs[-1] != offs[0]:  # nulls as items
            return None
        hist = pa.ListArray.from_arrays(pa.array(offs - offs[0], pa.int32()), pa.array([], pa.int64()))
    hist = _zero_based(hist)
    schema[0] = pa.schema([("user", users.type), ("history", pa.list_(hist.type.value_type))])
    return RequestBlock(np.arange(first_line, first_line + n_lines, dtype=np.int64), users, hist, [], n_lines)


def _zero_based(hist) -> pa.ListArray:
    offs = np.asarray(hist.offsets, dtype=np.int64)
    if offs[0] == 0 and not hist.offset and isinstance(hist, pa.ListArray) and not hist.values.offset \
            and len(hist.values) == offs[-1]:
        return hist
    vals = hist.flatten()
    if pa.types.is_large_string(vals.type):
        vals = vals.cast(pa.string())
    return pa.ListArray.from_arrays(pa.array((offs - offs[0]).astype(np.int32)), vals)


def _mixed_block(buf: bytes, first_line: int, n_lines: int, ropts) -> RequestBlock | None:
    """Histories that mix integer and string keys: users by pyarrow, histories by polars as strings.

    Polars turns any JSON scalar into a string, so a block goes this way only when its bytes can
    hold no float, boolean, null or nested value (anything that looks like one takes the
    line-by-line path, which reports it)."""
    import polars as pl
    import pyarrow.json as pj

    if b"true" in buf or b"false" in buf or b"null" in buf or buf.count(b"{") != n_lines \
            or buf.count(b"[") != n_lines:
        return None
    arr = np.frombuffer(buf, dtype=np.uint8)
    digit = (arr[:-1] >= 48) & (arr[:-1] <= 57)
    nxt = arr[1:]
    if (digit & ((nxt == 46) | (nxt == 101) | (nxt == 69))).any():  # 1.5, 1e5, 1E5
        return None
    users = None
    for utype in _USER_TYPES:
        try:
            users = pj.read_json(pa.BufferReader(buf), read_options=ropts, parse_options=pj.ParseOptions(
                explicit_schema=pa.schema([("user", utype)]), unexpected_field_behavior="ignore")).column("user")
            break
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    if users is None or len(users) != n_lines or users.null_count:
        return None
    try:
        df = pl.read_ndjson(io.BytesIO(buf), schema={"history": pl.List(pl.String)})
    except Exception:  # noqa: BLE001 - polars raises several types
        return None
    hist = df["history"].to_arrow()
    if isinstance(hist, pa.ChunkedArray):
        hist = hist.combine_chunks()
    if len(hist) != n_lines or hist.null_count or hist.values.null_count:
        return None
    return RequestBlock(np.arange(first_line, first_line + n_lines, dtype=np.int64), users.combine_chunks(),
                        _zero_based(hist), [], n_lines)


def _slow_block(buf: bytes, first_line: int) -> RequestBlock:
    lines, users, hists, bad = [], [], [], []
    raw_lines = buf.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    for i, raw in enumerate(raw_lines):
        lineno = first_line + i
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadLine(lineno, f"not UTF-8 text (byte {e.start + 1}: {e.reason})", ""))
            continue
        parsed = parse_line(text, lineno)
        if isinstance(parsed, BadLine):
            bad.append(parsed)
        else:
            lines.append(lineno)
            users.append(parsed[0])
            hists.append(parsed[1])
    return block_from_pairs(lines, users, hists, bad, len(raw_lines))


def read_jsonl_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[RequestBlock]:
    schema: list = [None]  # the last schema that parsed, tried first on the next block
    line = 1
    rest = b""
    with open(path, "rb") as f:
        first = True
        while True:
            chunk = f.read(block_bytes)
            if first:
                first = False
                if chunk.startswith(BOM):
                    chunk = chunk[len(BOM):]
            if not chunk:
                buf, rest = rest, b""
            else:
                data = rest + chunk
                cut = data.rfind(b"\n")
                if cut < 0:  # a line longer than the block: keep reading
                    rest = data
                    continue
                buf, rest = data[:cut + 1], data[cut + 1:]
            if not buf:
                break
            n_lines = buf.count(b"\n") + (not buf.endswith(b"\n"))
            block = _fast_block(buf, line, n_lines, schema) or _slow_block(buf, line)
            line += n_lines
            yield block
            if not chunk:
                break


# --------------------------------------------------------------------------- Parquet requests
def parquet_is_requests(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    t = schema.field("history").type if "history" in schema.names else None
    return t is not None and (pa.types.is_list(t) or pa.types.is_large_list(t))


def read_parquet_blocks(path: Path, block_rows: int = BLOCK_ROWS) -> Iterator[RequestBlock]:
    """Requests from a Parquet file with ``user`` and list ``history`` columns; row N is line N."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:160]}); "
                        "is --input-format right?") from None
    if "user" not in pf.schema_arrow.names:
        raise DataError(f"{path}: Parquet requests need a 'user' column; found {pf.schema_arrow.names}")
    utype = pf.schema_arrow.field("user").type
    if not (pa.types.is_integer(utype) or pa.types.is_string(utype) or pa.types.is_large_string(utype)):
        raise DataError(f"{path}: column 'user' must hold strings or integers, got {utype}")
    line = 1
    for batch in pf.iter_batches(batch_size=block_rows, columns=["user", "history"]):
        n = batch.num_rows
        users = batch.column("user")
        hist = batch.column("history")
        users = users.cast(pa.int64()) if pa.types.is_integer(users.type) else users.cast(pa.string())
        hist = hist.cast(pa.list_(hist.type.value_type))
        bad: list[BadLine] = []
        ok = np.ones(n, dtype=bool)
        vtype = hist.type.value_type
        if not (pa.types.is_integer(vtype) or pa.types.is_string(vtype) or pa.types.is_large_string(vtype)
                or pa.types.is_null(vtype)):
            raise DataError(f"{path}: column 'history' must be a list of strings or integers, got {hist.type}")
        if users.null_count or hist.null_count or hist.flatten().null_count:
            null_item = _rows_with_null_items(hist)
            for i in np.flatnonzero(np.asarray(users.is_null()) | np.asarray(hist.is_null()) | null_item):
                what = ("missing 'user'" if not users[i].is_valid else "missing 'history'" if not hist[i].is_valid
                        else "'history' holds a null item")
                bad.append(BadLine(line + int(i), what, ""))
                ok[i] = False
        lines = np.arange(line, line + n, dtype=np.int64)
        if not ok.all():
            keep = pa.array(ok)
            users, lines = users.filter(keep), lines[ok]
            hist = hist.filter(keep)
            hist = hist.cast(pa.list_(pa.string())) if vtype == pa.null() else hist
        vals = hist.flatten()
        vals = vals.cast(pa.int64()) if pa.types.is_integer(vals.type) else vals.cast(pa.string())
        offs = np.asarray(hist.offsets)
        hist = pa.ListArray.from_arrays(pa.array(offs - offs[0], pa.int32()), vals)
        yield RequestBlock(lines, users, hist, bad, n)
        line += n


def _rows_with_null_items(hist: pa.ListArray) -> np.ndarray:
    n = len(hist)
    if hist.values.null_count == 0:
        return np.zeros(n, dtype=bool)
    offs = np.asarray(hist.offsets)
    rows = np.repeat(np.arange(n), np.diff(offs))
    nulls = np.asarray(hist.values.is_null())[offs[0]:offs[-1]]
    return np.bincount(rows[nulls], minlength=n) > 0


# --------------------------------------------------------------------------- interaction logs
def read_log_block(path: Path, user_col: str = "user", item_col: str = "item", time_col: str | None = "timestamp",
                   sep: str | None = None) -> RequestBlock:
    """A CSV/TSV/Parquet log grouped per user (in memory); bad rows are reported, the rest served.

    "Lines" of the good requests are the users' ordinal numbers (1 = first user to appear); bad
    rows carry their file line (Parquet: row + 1, the header counting as line 1).
    """
    import polars as pl

    cols = [user_col, item_col] + ([time_col] if time_col else [])
    lines, rows, bad = _log_rows(path, cols, sep)
    ok_lines, us, its, ts = [], [], [], []
    for ln, rec in zip(lines, rows):
        u, it = rec[0], rec[1]
        if u == "" or it == "":
            bad.append(BadLine(ln, f"empty {'user' if u == '' else 'item'} value", ""))
            continue
        t = 0.0
        if time_col:
            try:
                t = float(rec[2])
            except (TypeError, ValueError):
                bad.append(BadLine(ln, f"column {time_col!r} must be a number (unix time), got {rec[2]!r}", ""))
                continue
            if math.isnan(t):
                bad.append(BadLine(ln, f"column {time_col!r} is NaN", ""))
                continue
        ok_lines.append(ln)
        us.append(u)
        its.append(it)
        ts.append(t)
    if not ok_lines and not bad:
        raise DataError(f"{path}: no interactions found")
    df = pl.DataFrame({"line": np.asarray(ok_lines, dtype=np.int64), "u": pl.Series(us, dtype=pl.String),
                       "i": pl.Series(its, dtype=pl.String), "t": np.asarray(ts, dtype=np.float64)})
    grouped = (df.with_columns(first=pl.col("line").min().over("u"))
               .sort(["first", "t", "line"])
               .group_by("first", maintain_order=True)
               .agg(pl.col("u").first(), pl.col("i")))
    users = [typed_key(u) for u in grouped["u"].to_list()]
    hist = grouped["i"].to_arrow()
    if isinstance(hist, pa.ChunkedArray):
        hist = hist.combine_chunks()
    hist = hist.cast(pa.list_(pa.string()))
    bad.sort(key=lambda b: b.line)
    return RequestBlock(np.arange(1, len(users) + 1, dtype=np.int64), _user_array(users), hist, bad, len(users))


def _log_rows(path: Path, cols: list[str], sep: str | None) -> tuple[list[int], list[list[str]], list[BadLine]]:
    """(line numbers, [user, item(, time)] strings, bad rows) of a log file."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        columns = parquet_log_columns(path, cols)
        n = len(columns[0]) if columns else 0
        return list(range(2, n + 2)), [list(r) for r in zip(*columns)], []
    if sep is None:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
    bad: list[BadLine] = []
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(BOM):
        data = data[len(BOM):]
    texts = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad.append(BadLine(lineno, f"not UTF-8 text (byte {e.start + 1}: {e.reason})", ""))
            texts.append("")
    reader = csv.reader(io.StringIO("\n".join(texts)), delimiter=sep)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        raise DataError(f"{path}: empty file, expected a header line with {cols}") from None
    idx, width = column_indices(path, header, cols)
    lines, rows = [], []
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            bad.append(BadLine(reader.line_num, f"not a valid {'TSV' if sep == chr(9) else 'CSV'} row: {e}", ""))
            continue
        lineno = reader.line_num
        if not rec or all(not x.strip() for x in rec):
            continue
        if len(rec) != width:
            bad.append(BadLine(lineno, f"expected {width} fields as in the header, got {len(rec)}",
                               sep.join(rec)[:200]))
            continue
        lines.append(lineno)
        rows.append([rec[i].strip() for i in idx])
    return lines, rows, bad


# --------------------------------------------------------------------------- dispatch
def input_format(path: Path, fmt: str | None) -> str:
    """jsonl | parquet (requests) | log: as asked, else by the suffix (and a Parquet file's columns)."""
    if fmt:
        return fmt
    suffix = path.suffix.lower()
    if suffix in LOG_SUFFIXES:
        return "log"
    if suffix in PARQUET_SUFFIXES:
        return "parquet" if parquet_is_requests(path) else "log"
    return "jsonl"


def read_blocks(path: Path, fmt: str, log_options: dict | None = None, block_bytes: int = BLOCK_BYTES,
                block_rows: int = BLOCK_ROWS) -> Iterator[RequestBlock]:
    if fmt == "log":
        yield read_log_block(path, **(log_options or {}))
    elif fmt == "parquet":
        yield from read_parquet_blocks(path, block_rows)
    else:
        yield from read_jsonl_blocks(path, block_bytes)
