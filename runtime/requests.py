"""Reading and validating request files in columnar blocks (torch-free).

Inputs, all streamed in blocks except logs:

- JSONL, one request per line: ``{"user": key, "history": [item keys, oldest first]}``. A block of
  lines is parsed by pyarrow's JSON reader; a block it rejects (or that holds anything but a
  string/integer user and a list of strings or integers) is re-parsed line by line with
  :func:`parse_line`, so each bad line is reported with its number and reason and the good lines of
  the block are still served. A UTF-8 byte-order mark before line 1 is skipped.
- Parquet with a ``user`` column and a ``history`` column: requests, row N is "line" N. ``history``
  may be any Arrow list (list, large, fixed-size, view; values plain or dictionary-encoded) of
  strings, integers or integral floats; ``user`` a string, an integer or an integral float
  (plain or dictionary-encoded, as pandas categoricals are).
- Interaction logs (CSV/TSV, or Parquet without a ``history`` column): columns user, item,
  timestamp (:func:`cddrec.readers.read_log`, the reader training uses), grouped per user in
  memory (interactions stably sorted by time, users in order of first appearance); a bad row is
  reported with its line and the rest are served.

Lines follow the one request rule (:func:`cddrec.runtime.codec.request_problem`); keys the one
key rule (:func:`cddrec.vocab.key_problem`): a string (valid Unicode, kept
byte for byte) or an integer that fits int64; anything else makes its line bad. Every block is a
:class:`RequestBlock`: line numbers, users, histories (an Arrow list array of item keys), the bad
lines among them and the text of any of its lines (for the errors file).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from cddrec.errors import DataError, first_line
from cddrec.readers import PARQUET_SUFFIXES, BadLine, read_log, shown
from cddrec.vocab import INT64_MAX, typed_key

from .codec import request_problem

LOG_SUFFIXES = (".csv", ".tsv")
BLOCK_BYTES = 4 << 20  # JSONL bytes per block
BLOCK_ROWS = 32768  # Parquet rows per block
BOM = b"\xef\xbb\xbf"

__all__ = ["BadLine", "RequestBlock", "parse_line", "read_blocks", "input_format"]


@dataclass
class RequestBlock:
    """Good requests of a block (in input order) and its bad lines."""

    lines: np.ndarray  # (n,) int64 line numbers of the good requests
    users: pa.Array | list  # n user keys: an int64 or string array, or a list of mixed keys
    histories: pa.ListArray  # n lists of item keys (int64 or string), oldest first
    bad: list[BadLine] = field(default_factory=list)
    n_lines: int = 0  # lines the block covers, good and bad
    text_of: Callable[[int], str] | None = field(default=None, repr=False)  # line number -> its text

    def __len__(self) -> int:
        return len(self.lines)

    def text(self, line: int) -> str:
        """The text of one of the block's lines, at most ``TEXT_LIMIT`` characters ("" if unknown)."""
        if self.text_of is None:
            return ""
        try:
            return shown(self.text_of(line))
        except Exception:  # noqa: BLE001 - a report must never end the run
            return ""


def _buffer_lines(buf: bytes, first_line: int) -> Callable[[int], str]:
    """line number -> text of that line of a block of JSONL bytes (line starts found on first use)."""
    starts: list = []

    def text_of(line: int) -> str:
        if not starts:
            nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10)
            starts.append(np.concatenate([[0], nl + 1]))
        st = starts[0]
        i = line - first_line
        end = st[i + 1] - 1 if i + 1 < len(st) else len(buf)
        return bytes(buf[st[i]:end]).decode("utf-8", "backslashreplace")

    return text_of


# --------------------------------------------------------------------------- one line (slow path)
def parse_line(text: str, lineno: int) -> tuple[object, list] | BadLine:
    """(user, history) of a JSONL request line, or why it is bad. Never raises."""
    text_shown = shown(text.strip())
    if not text.strip():
        return BadLine(lineno, "blank line", "")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(lineno, f"invalid JSON: {e.msg} (column {e.colno})", text_shown)
    except RecursionError:
        return BadLine(lineno, "invalid JSON: nested too deeply", text_shown)
    except ValueError as e:  # integers over the int-string conversion limit
        return BadLine(lineno, f"invalid JSON: {first_line(e, 120)}", text_shown)
    problem = request_problem(obj)
    if problem:
        return BadLine(lineno, problem, text_shown)
    return obj["user"], obj["history"]


def block_from_pairs(lines: list[int], users: list, hists: list[list], bad: list[BadLine], n_lines: int,
                     text_of: Callable[[int], str] | None = None) -> RequestBlock:
    """A RequestBlock from Python values (the slow paths). Item keys become strings unless all are ints."""
    flat = [x for h in hists for x in h]
    offsets = np.zeros(len(hists) + 1, dtype=np.int32)
    np.cumsum([len(h) for h in hists], out=offsets[1:])
    values = _key_array(flat)
    hist_arr = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
    return RequestBlock(np.asarray(lines, dtype=np.int64), _user_array(users), hist_arr, bad, n_lines, text_of)


def _key_array(keys: list) -> pa.Array:
    """Item keys (checked: strings and int64 integers) as one array: int64 if all are ints, else strings."""
    if all(type(k) is int for k in keys):
        return pa.array(keys, pa.int64())
    return pa.array([str(k) for k in keys], pa.string())


def _user_array(users: list) -> pa.Array | list:
    if all(type(u) is str for u in users):
        return pa.array(users, pa.string())
    if all(type(u) is int for u in users):
        return pa.array(users, pa.int64())
    return list(users)  # mixed keys: written run by run


# --------------------------------------------------------------------------- JSONL
_USER_TYPES = (pa.int64(), pa.string())
_ITEM_TYPES = (pa.int64(), pa.string(), pa.null())


# A line whose first character (after spaces) does not open an object. pyarrow's JSON reader is given
# only blocks of objects: a block that starts with a bare null ("null", "\tnull", "nullx") kills the
# process (SIGSEGV in pyarrow 26.0.1's read_json), and every other non-object is a bad line anyway, which
# the line-by-line path reports with its number.
_NOT_AN_OBJECT = re.compile(rb"(?:^|\n)[ \t\r]*[^{\s]")


def _not_all_objects(buf: bytes) -> bool:
    """True if a line of ``buf`` (whole lines) holds something other than a JSON object: each line's first
    byte by numpy (0.3 ms/MB), the exact rule by ``_NOT_AN_OBJECT`` (11 ms/MB) only for a block where some
    line does not start with ``{`` (blank lines, leading spaces, or not an object)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    if not len(arr):
        return False
    starts = np.flatnonzero(arr[:-1] == 10) + 1  # (lines - 1,) the byte after each inner newline
    if arr[0] == 123 and (arr[starts] == 123).all():  # b"{"
        return False
    return _NOT_AN_OBJECT.search(buf) is not None


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
    if _not_all_objects(buf):  # pyarrow reads objects only; a first value of null crashes it
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
    hist = compact(hist)
    schema[0] = pa.schema([("user", users.type), ("history", pa.list_(hist.type.value_type))])
    return RequestBlock(np.arange(first_line, first_line + n_lines, dtype=np.int64), users, hist, [], n_lines,
                        _buffer_lines(buf, first_line))


def compact(hist) -> pa.ListArray:
    """``hist`` as a list array with int32 offsets from 0 over its own values (string values, not large);
    ``hist`` itself when it already is one."""
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
                        compact(hist), [], n_lines, _buffer_lines(buf, first_line))


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
            bad.append(BadLine(lineno, f"not UTF-8 text (byte {e.start + 1}: {e.reason})",
                               shown(raw.decode("utf-8", "backslashreplace").strip())))
            continue
        parsed = parse_line(text, lineno)
        if isinstance(parsed, BadLine):
            bad.append(parsed)
        else:
            lines.append(lineno)
            users.append(parsed[0])
            hists.append(parsed[1])
    return block_from_pairs(lines, users, hists, bad, len(raw_lines), _buffer_lines(buf, first_line))


NOT_TEXT_MIN_BYTES = 256  # a shorter file is judged line by line


def _not_text(head: bytes) -> bool:
    """A file whose start (at least NOT_TEXT_MIN_BYTES) is not UTF-8 text of lines: many NUL bytes (UTF-16,
    archives), or several NUL bytes and invalid UTF-8 together (binaries); a corrupt line or two among good
    ones stay bad lines, and so does every line of a short file (an empty one has no requests)."""
    zeros = head.count(b"\x00")
    if len(head) < NOT_TEXT_MIN_BYTES or zeros < 8 and zeros * 10 < len(head):
        return False
    if zeros * 10 >= len(head):
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 3  # not just a character cut at the block's end
    return False


def _binary_kind(head: bytes) -> str:
    if head.startswith(b"PAR1"):
        return "a Parquet file: name it .parquet or pass --input-format parquet"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or head[1:2] == b"\x00" or head[:1] == b"\x00":
        return "UTF-16 text, perhaps: save it as UTF-8"
    return "binary data"


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
                if _not_text(chunk[:4096]):
                    raise DataError(f"{path}: not JSONL requests: it holds NUL bytes ({_binary_kind(chunk)}); "
                                    "expected UTF-8 text, one JSON object per line")
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
    """A Parquet file with a ``history`` column holds requests (a log has none)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e, 160)})") from None
    return "history" in schema.names


def _is_key_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_floating(t) or pa.types.is_null(t))


def _is_list_type(t: pa.DataType) -> bool:
    return any(f(t) for f in (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list,
                              pa.types.is_list_view, pa.types.is_large_list_view))


def _check_request_schema(path: Path, schema: pa.Schema) -> None:
    for name in ("user", "history"):
        if name not in schema.names:
            raise DataError(f"{path}: Parquet requests need columns 'user' and 'history'; found {schema.names}")
        if schema.names.count(name) > 1:
            raise DataError(f"{path}: column {name!r} appears more than once; rename them so each column is named once")
    utype = schema.field("user").type
    if not _is_key_type(utype):
        raise DataError(f"{path}: column 'user' must hold strings or integers, got {utype}")
    htype = schema.field("history").type
    if not (_is_list_type(htype) and _is_key_type(htype.value_type)):
        raise DataError(f"{path}: column 'history' must be a list of item keys (strings or integers), got {htype}")


def _keys(arr: pa.Array) -> tuple[pa.Array, dict[int, str]]:
    """A column of keys as int64 or string, and why entries are bad ({index: reason}); nulls stay null.

    Integers beyond int64 and floats that are not integral are bad; integral floats are integers."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    bad: dict[int, str] = {}
    if pa.types.is_null(t):
        return arr.cast(pa.string()), bad
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = arr.cast(pa.string())
        try:
            arr.validate(full=True)
        except pa.ArrowInvalid:  # bytes that are not UTF-8 in a string column
            for i, v in enumerate(arr.cast(pa.binary()).to_pylist()):
                if v is not None:
                    try:
                        v.decode("utf-8")
                    except UnicodeDecodeError:
                        bad[i] = "is not UTF-8 text"
            arr = pa.array([None if i in bad else v for i, v in enumerate(arr.cast(pa.binary()).to_pylist())],
                           pa.binary()).cast(pa.string())
        return arr, bad
    if pa.types.is_integer(t):
        if t == pa.uint64():
            v = arr.fill_null(0).to_numpy()
            for i in np.flatnonzero(v > INT64_MAX):
                bad[int(i)] = f"integer {int(v[i])} does not fit 64 bits"
            if bad:
                arr = pa.array(np.where(v > INT64_MAX, 0, v).astype(np.int64), mask=~np.asarray(arr.is_valid()))
        return arr.cast(pa.int64()), bad
    v = arr.to_numpy(zero_copy_only=False).astype(np.float64)  # floating: NaN where null
    valid = np.asarray(arr.is_valid())
    with np.errstate(invalid="ignore"):
        integral = np.isfinite(v) & (v == np.floor(v)) & (np.abs(v) < 2.0 ** 63)
    for i in np.flatnonzero(valid & ~integral):
        bad[int(i)] = "is NaN" if np.isnan(v[i]) else f"{v[i]!r} is not an integer"
    ok = valid & integral
    return pa.array(np.where(ok, v, 0).astype(np.int64), mask=~ok), bad


def _as_list(hist: pa.Array) -> pa.ListArray:
    """Any Arrow list (large, fixed-size, view) as a list with int32 offsets, nulls kept."""
    if pa.types.is_dictionary(hist.type):
        hist = hist.dictionary_decode()
    lens = hist.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), hist.flatten(), mask=hist.is_null())


def _parquet_text(users: pa.Array, hist: pa.ListArray, row: int) -> str:
    return json.dumps({"user": users[row].as_py(), "history": hist[row].as_py()}, default=str)


def read_parquet_blocks(path: Path, block_rows: int = BLOCK_ROWS) -> Iterator[RequestBlock]:
    """Requests from a Parquet file with ``user`` and ``history`` columns; row N is line N."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e, 160)}); "
                        "is --input-format right?") from None
    _check_request_schema(path, pf.schema_arrow)
    line = 1
    batches = pf.iter_batches(batch_size=block_rows, columns=["user", "history"])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file after row {line - 1} "
                            f"({first_line(e, 160)})") from None
        if batch is None:
            return
        yield _parquet_block(batch, line)
        line += batch.num_rows


def _parquet_block(batch: pa.RecordBatch, line: int) -> RequestBlock:
    n = batch.num_rows
    raw_users, raw_hist = batch.column("user"), _as_list(batch.column("history"))
    users, ubad = _keys(raw_users)
    vals, vbad = _keys(raw_hist.flatten())
    offs = np.asarray(raw_hist.offsets, dtype=np.int64)
    offs = offs - offs[0]
    reasons: dict[int, str] = {i: f"'user' {r}" for i, r in ubad.items()}
    row_of = np.repeat(np.arange(n), np.diff(offs))
    for j, r in vbad.items():
        reasons.setdefault(int(row_of[j]), f"'history' entry {j - offs[row_of[j]]} {r}")
    for i in np.flatnonzero(np.asarray(users.is_null())):
        reasons.setdefault(int(i), "missing 'user'")
    for i in np.flatnonzero(np.asarray(raw_hist.is_null())):
        reasons.setdefault(int(i), "missing 'history'")
    null_vals = np.asarray(vals.is_null()) if vals.null_count else np.zeros(len(vals), bool)
    for j in np.flatnonzero(null_vals):
        reasons.setdefault(int(row_of[j]), f"'history' entry {j - offs[row_of[j]]} is null")

    def text_of(ln: int) -> str:
        return _parquet_text(raw_users, raw_hist, ln - line)

    probe = RequestBlock(np.zeros(0, np.int64), [], None, text_of=text_of)
    bad = [BadLine(line + i, reasons[i], probe.text(line + i)) for i in sorted(reasons)]
    ok = np.ones(n, dtype=bool)
    ok[list(reasons)] = False
    lines = np.arange(line, line + n, dtype=np.int64)
    if pa.types.is_null(vals.type):
        vals = vals.cast(pa.string())
    hist = pa.ListArray.from_arrays(pa.array(offs.astype(np.int32)), vals)
    if not ok.all():
        keep = pa.array(ok)
        users, lines, hist = users.filter(keep), lines[ok], compact(hist.filter(keep))
    return RequestBlock(lines, users, hist, bad, n, text_of)


# --------------------------------------------------------------------------- interaction logs
def read_log_block(path: Path, user_col: str = "user", item_col: str = "item", time_col: str | None = "timestamp",
                   sep: str | None = None) -> RequestBlock:
    """A CSV/TSV/Parquet log grouped per user (in memory); bad rows are reported, the rest served.

    Rows are read and checked by :func:`cddrec.readers.read_log`, as training reads them. "Lines" of
    the good requests are the users' ordinal numbers (1 = first user to appear); bad rows carry
    their file line (Parquet: row + 1, the header counting as line 1).
    """
    import polars as pl

    rows = read_log(path, user_col, item_col, time_col, sep)
    if not rows.lines and not rows.bad:
        raise DataError(f"{path}: no interactions found")
    df = pl.DataFrame({"line": np.asarray(rows.lines, dtype=np.int64), "u": pl.Series(rows.users, dtype=pl.String),
                       "i": pl.Series(rows.items, dtype=pl.String), "t": np.asarray(rows.times, dtype=np.float64)})
    grouped = (df.with_columns(first=pl.col("line").min().over("u"))
               .sort(["first", "t", "line"])
               .group_by("first", maintain_order=True)
               .agg(pl.col("u").first(), pl.col("i")))
    users = [typed_key(u) for u in grouped["u"].to_list()]
    hist = grouped["i"].to_arrow()
    if isinstance(hist, pa.ChunkedArray):
        hist = hist.combine_chunks()
    hist = hist.cast(pa.list_(pa.string()))
    firsts = grouped["first"].to_list()
    return RequestBlock(np.arange(1, len(users) + 1, dtype=np.int64), _user_array(users), hist, rows.bad, len(users),
                        lambda n: f"user {users[n - 1]!r} (first on line {firsts[n - 1]})")


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
