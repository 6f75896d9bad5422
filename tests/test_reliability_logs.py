"""One log reader for training, evaluation and serving: CSV edge cases, Parquet timestamps at any
date, float item columns, Parquet request column types, the popularity-fallback warning (issue 19,
items 6, 7, 11, 12)."""

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from infer_helpers import errors, infer

from cddrec.app.evaluate import main as eval_main
from cddrec.app.train import main as train_main
from cddrec.errors import DataError
from cddrec.readers import read_interaction_table
from cddrec.runtime.pipeline import run_batch
from cddrec.runtime.recommender import Recommender


@pytest.fixture(scope="module")
def rec(trained_tiny_onnx):
    return Recommender.load(trained_tiny_onnx, threads=1)


def _rows(out):
    return [json.loads(x) for x in out.read_text().splitlines()]


# ------------------------------------------------------------------------------ CSV
BAD_CSV = {  # name: (file bytes, line of the bad row, words of the reason)
    "stray CR": (b"user,item,timestamp\nu1,1,1\nu9,7\r8,1\nu1,2,2\n", 3, "carriage return"),
    "long field": (b"user,item,timestamp\nu1,1,1\nu9," + b"7" * 140000 + b",1\nu1,2,2\n", 3, "a field over"),
    "open quote": (b'user,item,timestamp\nu1,1,1\nu9,"7,1\nu1,2,2\nu1,3,3\n', 3, "never closed"),
    "quote then text": (b'user,item,timestamp\nu1,1,1\nu9,"7"x,1\nu1,2,2\n', 3, "not a valid CSV row"),
    "field count": (b"user,item,timestamp\nu1,1,1\nu9,7\nu1,2,2\n", 3, "expected 3 fields"),
    "not utf-8": (b"user,item,timestamp\nu1,1,1\nu9,\xff,1\nu1,2,2\n", 3, "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_CSV))
def test_one_csv_behaviour_for_train_eval_andinfer(tmp_path, trained_tiny, trained_tiny_onnx, name):
    body, line, words = BAD_CSV[name]
    log = tmp_path / "log.csv"
    log.write_bytes(body)
    with pytest.raises(DataError, match=rf"log.csv:{line}: .*{words}"):
        read_interaction_table(log)
    for cmd, args in ((train_main, [str(log), "-o", str(tmp_path / "m.pt"), "--quiet"]),
                      (eval_main, [str(trained_tiny), str(log)])):
        r = CliRunner().invoke(cmd, args)
        assert r.exit_code == 1 and f"log.csv:{line}: " in r.output and words in r.output, r.output
        assert r.output.startswith("Error") and len(r.output.strip().splitlines()) == 1
    out = tmp_path / "o.jsonl"
    r = infer(trained_tiny_onnx, log, out)
    assert r.exit_code == 0, r.output
    errs = errors(out)
    assert [e["line"] for e in errs] == [line] and words in errs[0]["reason"] and errs[0]["text"]
    assert [x["user"] for x in _rows(out)] == ["u1"]


def test_unclosed_quote_resumes_on_the_next_line(tmp_path):
    from cddrec.readers import read_log

    log = tmp_path / "log.csv"
    log.write_bytes(b'user,item,timestamp\nu1,1,1\nu2,"7,1\nu3,2,2\nu1,3,3\n')
    rows = read_log(log)
    assert [b.line for b in rows.bad] == [3] and rows.users == ["u1", "u3", "u1"] and rows.lines == [2, 4, 5]
    log.write_bytes(b'user,item,timestamp\nu1,"a\nb",1\nu2,2,2\n')  # a quoted field over two lines is fine
    rows = read_log(log)
    assert rows.bad == [] and rows.items == ["a\nb", "2"] and rows.lines == [2, 4]


def test_cr_only_and_crlf_files(tmp_path, trained_tiny_onnx):
    want = (["u1", "u2"], [["1", "2"], ["3"]])
    for sep in (b"\r", b"\r\n", b"\n"):
        log = tmp_path / "log.csv"
        log.write_bytes(sep.join([b"user,item,timestamp", b"u1,2,2", b"u1,1,1", b"u2,3,1"]) + sep)
        assert read_interaction_table(log) == want, sep
        out = tmp_path / "o.jsonl"
        r = infer(trained_tiny_onnx, log, out)
        assert r.exit_code == 0 and "served 2 users" in r.output, (sep, r.output)


def test_duplicate_column_names_are_refused(tmp_path, trained_tiny_onnx):
    log = tmp_path / "log.csv"
    log.write_text("user,item,item,timestamp\nu1,1,2,1\n")
    with pytest.raises(DataError, match=r"log.csv:1: column\(s\) \['item'\] appear more than once"):
        read_interaction_table(log)
    r = infer(trained_tiny_onnx, log, tmp_path / "o.jsonl")
    assert r.exit_code == 1 and "appear more than once" in r.output
    log.write_text("user,item,x,x,timestamp\nu1,1,2,3,1\nu1,2,2,3,2\n")  # unused duplicates are harmless
    assert read_interaction_table(log) == (["u1"], [["1", "2"]])
    t = pa.table([pa.array(["a"]), pa.array([1]), pa.array([2]), pa.array([1])], names=["user", "item", "item",
                                                                                       "timestamp"])
    pq.write_table(t, tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"log.parquet: column\(s\) \['item'\] appear more than once"):
        read_interaction_table(tmp_path / "log.parquet")


# ------------------------------------------------------------------------------ Parquet logs
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_parquet_timestamps_at_any_date(tmp_path, unit):
    """9999-12-31 (a sentinel) and 1600 are beyond 2^53 microseconds: read exactly, in order."""
    far = [dt.datetime(9999, 12, 31), dt.datetime(1600, 1, 1), dt.datetime(2024, 1, 1)]
    if unit == "ns":  # int64 nanoseconds reach 1677..2262
        far = [dt.datetime(2262, 1, 1), dt.datetime(1678, 1, 1), dt.datetime(2024, 1, 1)]
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": ["a", "a", "a"], "item": ["late", "early", "mid"],
                             "timestamp": pa.array(far, pa.timestamp(unit))}), log)
    assert read_interaction_table(log) == (["a"], [["early", "mid", "late"]])
    pq.write_table(pa.table({"user": ["a", "a"], "item": ["x", "y"],
                             "timestamp": pa.array([dt.date(9999, 12, 31), dt.date(1, 1, 1)], pa.date32())}), log)
    assert read_interaction_table(log) == (["a"], [["y", "x"]])


def test_float_item_column_reads_integral_floats_as_integers(tmp_path, rec, trained_tiny_onnx):
    keys = [int(k) for k in rec.info.vocab.keys[:4]]
    log = tmp_path / "log.parquet"
    items = pa.array([float(keys[0]), float(keys[1]), np.nan, 2.5, float(keys[2])], pa.float64())
    pq.write_table(pa.table({"user": pa.array([1.0, 1.0, 2.0, 2.0, 3.0]), "item": items,
                             "timestamp": [1, 2, 3, 4, 5]}), log)
    with pytest.raises(DataError, match=r"log.parquet:4: empty item value"):
        read_interaction_table(log)
    out = tmp_path / "o.jsonl"
    r = infer(trained_tiny_onnx, log, out)
    assert r.exit_code == 0, r.output
    errs = errors(out)
    assert [e["line"] for e in errs] == [4, 5] and "is not an integer" in errs[1]["reason"]
    rows = _rows(out)
    assert [x["user"] for x in rows] == [1, 3] and [x["source"] for x in rows] == ["model", "model"]
    want = rec.recommend([[keys[0], keys[1]], [keys[2]]])
    assert [x["items"] for x in rows] == [w.items for w in want]


def test_mostly_fallback_run_says_so_and_exits_4(tmp_path, rec, trained_tiny_onnx):
    keys = rec.info.vocab.keys
    req = tmp_path / "r.jsonl"
    req.write_text("".join(json.dumps({"user": i, "history": [f"{keys[i]}.0"]}) + "\n" for i in range(3))
                   + json.dumps({"user": 9, "history": [keys[0]]}) + "\n")
    r = infer(trained_tiny_onnx, req, tmp_path / "o.jsonl")
    assert r.exit_code == 4 and "problem: 3 of 4 users (75%)" in r.output, r.output
    assert [x["source"] for x in _rows(tmp_path / "o.jsonl")] == ["popularity"] * 3 + ["model"]
    req.write_text("".join(json.dumps({"user": i, "history": [keys[i]]}) + "\n" for i in range(3))
                   + json.dumps({"user": 9, "history": ["nope"]}) + "\n")
    r = infer(trained_tiny_onnx, req, tmp_path / "o.jsonl")
    assert r.exit_code == 0 and "problem" not in r.output


# ------------------------------------------------------------------------------ Parquet requests
def _history_arrays(hist):
    n = len(hist)
    width = len(hist[0])
    flat = [x for h in hist for x in h]
    return {
        "list": pa.array(hist, pa.list_(pa.int64())),
        "large_list": pa.array(hist, pa.large_list(pa.int64())),
        "fixed_size_list": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int64()), width),
        "list_view": pa.ListViewArray.from_arrays(pa.array(np.arange(n) * width, pa.int32()),
                                                  pa.array([width] * n, pa.int32()), pa.array(flat, pa.int64())),
        "dictionary_values": pa.array([[str(x) for x in h] for h in hist],
                                      pa.list_(pa.dictionary(pa.int32(), pa.string()))),
        "float_values": pa.array([[float(x) for x in h] for h in hist], pa.list_(pa.float64())),
    }


@pytest.mark.parametrize("kind", ["list", "large_list", "fixed_size_list", "list_view", "dictionary_values",
                                  "float_values"])
def test_parquet_request_columns_of_every_list_type(tmp_path, rec, kind):
    keys = [int(k) for k in rec.info.vocab.keys[:6]]
    hist = [[keys[0], keys[1]], [keys[2], keys[3]], [keys[4], keys[5]]]
    users = pa.array(["a", "b", "a2"]).dictionary_encode()  # a pandas categorical
    req = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": users, "history": _history_arrays(hist)[kind]}), req)
    out = tmp_path / "o.jsonl"
    stats = run_batch(rec, req, out, k=5)
    assert stats.served == 3 and stats.bad == 0
    assert [x["items"] for x in _rows(out)] == [w.items for w in rec.recommend(hist, k=5)]
    assert [x["user"] for x in _rows(out)] == ["a", "b", "a2"]


def test_parquet_history_of_another_type_names_the_column(tmp_path, trained_tiny_onnx):
    req = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": ["a"], "history": ["[1, 2]"]}), req)
    r = infer(trained_tiny_onnx, req, tmp_path / "o.jsonl")
    assert r.exit_code == 1 and "column 'history' must be a list of item keys" in r.output and "string" in r.output
    pq.write_table(pa.table({"user": ["a"], "history": pa.array([[True]], pa.list_(pa.bool_()))}), req)
    r = infer(trained_tiny_onnx, req, tmp_path / "o.jsonl")
    assert r.exit_code == 1 and "bool" in r.output, r.output


def test_a_glob_or_folder_without_ray_says_how(tmp_path, trained_tiny_onnx):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text(json.dumps({"user": "a", "history": [1]}) + "\n")
    r = infer(trained_tiny_onnx, shards / "*.jsonl", tmp_path / "o.jsonl")
    assert r.exit_code == 1 and "a glob: one run reads one file" in r.output and "--ray local" in r.output
    r = infer(trained_tiny_onnx, shards, tmp_path / "o.jsonl")
    assert r.exit_code == 1 and "is a directory" in r.output and "--ray" in r.output
