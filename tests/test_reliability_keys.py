"""One key rule everywhere: ASCII digits only are integers (int64), everything else a string kept
byte for byte; lone surrogates and integers beyond 64 bits are bad lines (issue 19, items 2 and 4,
--keys, the errors file's text)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infer_helpers import errors, infer

from cddrec.data import from_keys
from cddrec.errors import DataError
from cddrec.readers import read_interaction_table, read_sequence_file
from cddrec.runtime.codec import KeyMapper
from cddrec.runtime.pipeline import run_batch
from cddrec.runtime.recommender import Recommender
from cddrec.vocab import Vocab, is_int_key


@pytest.fixture(scope="module")
def rec(trained_tiny_onnx):
    return Recommender.load(trained_tiny_onnx, threads=1)


# ------------------------------------------------------------------------------ the key rule
def test_only_ascii_digits_are_integer_keys():
    from cddrec.vocab import key_problem

    assert [is_int_key(k) for k in ("17", "-3", "0", str(2**63 - 1), str(-2**63))] == [True] * 5
    for k in ("²", "١٧", "١", "+5", "007", "-0", "1 ", "¹²", "٣", "𝟙", str(2**63)):
        assert not is_int_key(k), k
    assert key_problem(str(2**63)) and key_problem(2**63) and key_problem(-2**63 - 1)
    assert key_problem("x\udc00") and key_problem(True) and key_problem(1.5)
    assert key_problem("١٧") is None and key_problem("e\u0301") is None


def test_unicode_digit_keys_stay_distinct_strings():
    vocab = Vocab.build(["17", "١٧", "²", "5"])
    assert vocab.key_type == "str"
    mapper = KeyMapper(vocab)  # used to fail: int('²')
    ids = mapper.ids(pa.array(["17", "١٧", "²", "5", "x"]))
    assert ids.tolist() == [1, 2, 3, 4, 0]
    assert mapper.keys(np.array([1, 2, 3])).to_pylist() == ["17", "١٧", "²"]
    assert mapper.key_list(np.array([3, 1, 2, 1])) == ["²", "17", "١٧", "17"]
    # a vocabulary saved under the old rule (key_type "int" with "²") is read as strings
    assert Vocab.from_dict({"keys": ["17", "²"], "key_type": "int"}).key_type == "str"
    assert Vocab.from_dict({"keys": ["17", "3"], "key_type": "int"}).key(1) == 17


def test_text_keys_beyond_int64_and_unicode_space(tmp_path):
    seq = tmp_path / "s.txt"
    seq.write_text("u1 ² ١٧ 17\nu\u00a0x 5 6\n")  # NBSP is part of a key, not a separator
    users, seqs = read_sequence_file(seq)
    assert users == ["u1", "u\u00a0x"] and seqs[0] == ["²", "١٧", "17"]
    assert from_keys(users, seqs).items.key_type == "str"
    seq.write_text(f"u1 1 2\nu2 {2**64} 3\n")
    with pytest.raises(DataError, match=r"s.txt:2: item key integer 18446744073709551616 does not fit 64 bits"):
        read_sequence_file(seq)
    log = tmp_path / "l.csv"
    log.write_text("user,item,timestamp\n²,1,1\n²,2,2\n")  # a user key '²' used to abort a CSV run
    assert read_interaction_table(log) == (["²"], [["1", "2"]])


def test_lone_surrogate_and_huge_integers_are_bad_lines(tmp_path, trained_tiny_onnx):
    req = tmp_path / "s.jsonl"
    req.write_text('{"user":"ok","history":[1]}\n'
                   '{"user":"b","history":["x\\udc00"]}\n'
                   '{"user":"\\ud800","history":[1]}\n'
                   f'{{"user":"c","history":[{2**63}]}}\n'
                   f'{{"user":{2**64},"history":[1]}}\n'
                   '{"user":"ok2","history":[2]}\n')
    out = tmp_path / "o.jsonl"
    r = infer(trained_tiny_onnx, req, out)
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["user"] for x in out.read_text().splitlines()] == ["ok", "ok2"]
    errs = errors(out)
    assert [e["line"] for e in errs] == [2, 3, 4, 5]
    assert "lone surrogate" in errs[0]["reason"] and "lone surrogate" in errs[1]["reason"]
    assert "does not fit 64 bits" in errs[2]["reason"] and "does not fit 64 bits" in errs[3]["reason"]
    assert all(e["text"] for e in errs)
    r = infer(trained_tiny_onnx, req, out, "--strict")
    assert r.exit_code == 1 and "s.jsonl:2: field 'history' entry 0" in r.output


def test_uint64_beyond_int64_in_parquet_is_a_bad_row(tmp_path, trained_tiny_onnx):
    req = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": pa.array([1, 2**63, 3], pa.uint64()),
                             "history": pa.array([[1], [2], [2**64 - 1]], pa.list_(pa.uint64()))}), req)
    out = tmp_path / "o.jsonl"
    r = infer(trained_tiny_onnx, req, out)
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["user"] for x in out.read_text().splitlines()] == [1]
    assert [(e["line"], "does not fit 64 bits" in e["reason"]) for e in errors(out)] == [(2, True), (3, True)]
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": pa.array([1, 1, 2**64 - 1], pa.uint64()), "item": [1, 2, 3],
                             "timestamp": [1, 2, 3]}), log)
    r = infer(trained_tiny_onnx, log, out)
    assert r.exit_code == 0 and [e["line"] for e in errors(out)] == [4], r.output
    with pytest.raises(DataError, match=r"log.parquet:4: user key integer 18446744073709551615 does not fit"):
        read_interaction_table(log)


def test_errors_file_keeps_the_text_of_every_bad_line(tmp_path, trained_tiny_onnx):
    req = tmp_path / "r.jsonl"
    long_user = "u" * 5000
    req.write_text(json.dumps({"user": "a", "history": [1]}) + "\n" + json.dumps({"user": "a", "history": [2]}) + "\n"
                   + json.dumps({"user": long_user, "history": [1]}) + "\n"
                   + json.dumps({"user": long_user, "history": [3]}) + "\n")
    out = tmp_path / "o.jsonl"
    assert infer(trained_tiny_onnx, req, out).exit_code == 0
    errs = errors(out)
    assert [e["line"] for e in errs] == [2, 4] and "duplicate user" in errs[0]["reason"]
    assert errs[0]["text"] == '{"user": "a", "history": [2]}'
    assert errs[1]["text"].startswith('{"user": "uuu') and len(errs[1]["text"]) <= 203  # bounded
    pq.write_table(pa.table({"user": ["p", "p", None], "history": [[1], [2], [3]]}), tmp_path / "r.parquet")
    assert infer(trained_tiny_onnx, tmp_path / "r.parquet", out).exit_code == 0
    errs = errors(out)
    assert [e["line"] for e in errs] == [2, 3] and all(e["text"] for e in errs)
    assert json.loads(errs[0]["text"]) == {"user": "p", "history": [2]}


# ------------------------------------------------------------------------------ --keys
def test_keys_option_pins_the_written_types(tmp_path, trained_tiny_onnx, rec):
    keys = rec.info.vocab.keys
    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"user": "7", "history": [keys[0], keys[1]]}) + "\n"
                   + json.dumps({"user": 8, "history": [keys[2]]}) + "\n"
                   + json.dumps({"user": "x", "history": [keys[3]]}) + "\n")
    out = tmp_path / "o.jsonl"

    def rows(*extra):
        r = infer(trained_tiny_onnx, req, out, *extra)
        assert r.exit_code == 0, r.output
        return [json.loads(x) for x in out.read_text().splitlines()]

    auto = rows()
    assert [x["user"] for x in auto] == ["7", 8, "x"] and all(type(i) is int for x in auto for i in x["items"])
    as_str = rows("--keys", "str")
    assert [x["user"] for x in as_str] == ["7", "8", "x"]
    assert [x["items"] for x in as_str] == [[str(i) for i in x["items"]] for x in auto]
    as_int = rows("--keys", "int")
    assert [x["user"] for x in as_int] == [7, 8] and [x["items"] for x in as_int] == [x["items"] for x in auto[:2]]
    assert "user key 'x' is not an integer (--keys int)" in errors(out)[0]["reason"]
    for fmt in ("parquet", "csv"):
        o = tmp_path / f"o.{fmt}"
        assert infer(trained_tiny_onnx, req, o, "--keys", "str").exit_code == 0
        if fmt == "parquet":
            t = pq.read_table(o)
            assert t.schema.field("user").type == pa.string() and t.schema.field("items").type == pa.list_(pa.string())
            assert t.column("source").to_pylist() == ["model"] * 3


def test_keys_int_needs_an_integer_vocabulary(tmp_path, trained_tiny_onnx):
    import shutil

    from cddrec.export.metadata import read_metadata
    from cddrec.export.onnx_export import write_metadata

    graph = tmp_path / "str.onnx"
    shutil.copy(trained_tiny_onnx, graph)
    meta = read_metadata(graph)
    vocab = json.loads(meta["vocab"])
    meta["vocab"] = json.dumps({"keys": [f"i{k}" for k in vocab["keys"]], "key_type": "str"})
    meta["popular_topk"] = json.dumps([[f"i{k}", c] for k, c in json.loads(meta["popular_topk"])])
    write_metadata(graph, meta)
    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"user": 1, "history": ["i1"]}) + "\n")
    r = infer(graph, req, tmp_path / "o.jsonl", "--keys", "int")
    assert r.exit_code == 1 and "--keys int: the model's item keys are not all integers" in r.output, r.output
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------ the property
_CATEGORIES = ["Lu", "Ll", "Nd", "No", "Mn", "Me", "Zs", "Cc", "Cs", "So", "Po"]
_keytext = st.text(alphabet=st.characters(categories=_CATEGORIES), max_size=6)
_key = st.one_of(_keytext, st.integers(min_value=-2**66, max_value=2**66),
                 st.sampled_from(["17", "١٧", "²", "017", "-0", "e\u0301", "\u00e9", "17 ", "𝟙𝟟"]))


@st.composite
def _request_line(draw, known):
    user = draw(_key)
    hist = draw(st.lists(st.one_of(_key, st.sampled_from(known)), max_size=5))
    raw = draw(st.booleans())  # JSON escapes (\udc00) or raw UTF-8 (lone surrogates become bad bytes)
    text = json.dumps({"user": user, "history": hist}, ensure_ascii=not raw)
    return user, text.encode("utf-8", "surrogatepass")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.data())
def test_any_unicode_key_is_served_or_reported_and_never_merged(tmp_path_factory, rec, data):
    known = list(rec.info.vocab.keys[:5]) + [int(k) for k in rec.info.vocab.keys[:5]]
    lines = data.draw(st.lists(_request_line(known), min_size=1, max_size=20))
    keys_mode = data.draw(st.sampled_from(["auto", "str"]))
    d = tmp_path_factory.mktemp("keys")
    req = d / "req.jsonl"
    req.write_bytes(b"".join(t + b"\n" for _, t in lines))
    out = d / "o.jsonl"
    stats = run_batch(rec, req, out, block_bytes=data.draw(st.sampled_from([64, 1 << 20])), keys=keys_mode)
    served = [json.loads(x) for x in out.read_bytes().split(b"\n") if x]  # JSONL lines end at \n only (not at U+0085)
    errs = [json.loads(x) for x in (d / "o.jsonl.errors.jsonl").read_bytes().split(b"\n") if x] if stats.bad else []
    assert stats.served + stats.bad == len(lines) == stats.lines
    bad_lines = [e["line"] for e in errs]
    assert bad_lines == sorted(set(bad_lines)) and set(bad_lines) <= set(range(1, len(lines) + 1))
    good = [lines[i - 1][0] for i in range(1, len(lines) + 1) if i not in set(bad_lines)]
    assert len(served) == len(good)
    for row, user in zip(served, good):  # each served line is written with its own key, byte for byte
        assert row["user"] == (str(user) if keys_mode == "str" else user)
        assert json.dumps(row["user"]).encode() == json.dumps(row["user"]).encode("utf-8")
    written = [str(r["user"]) for r in served]
    assert len(set(written)) == len(written)  # no two distinct keys written as the same key
    for e in errs:  # a duplicate is the same key (as text) as an earlier line, never a look-alike
        if e["reason"].startswith("duplicate user"):
            first = int(e["reason"].rsplit("line ", 1)[1].rstrip(")"))
            assert str(lines[e["line"] - 1][0]) == str(lines[first - 1][0])


@pytest.mark.parametrize("keys", [["17", "١٧", "²", "5"], ["17", "3", "-2", str(2**62)]])
def test_key_list_is_keys_as_python_objects_on_both_paths(keys, monkeypatch):
    mapper = KeyMapper(Vocab.build(keys))
    ids = np.random.default_rng().integers(1, len(keys) + 1, size=50)
    want = mapper.keys(ids).to_pylist()
    assert mapper.key_list(ids) == want  # a few: list lookups
    monkeypatch.setattr(KeyMapper, "SMALL", 10)
    assert mapper.key_list(ids) == want  # many: pyarrow
    assert all(type(k) is (int if mapper.is_int else str) for k in want)


@pytest.mark.parametrize("keys", [["17", "١٧", "²", "5"], ["17", "3", "-2", str(2**62)]])
def test_ids_of_a_python_list_are_the_ids_of_its_arrow_array_on_both_paths(keys, monkeypatch):
    """A server's request and ``encode_histories`` give keys as Python objects (ints or strings, 17 and "17"
    being the same item); a few go straight to the vocabulary's dict, many through Arrow."""
    mapper = KeyMapper(Vocab.build(keys))
    rng = np.random.default_rng()
    pool = keys + [int(k) for k in keys if k.lstrip("-").isascii() and k.lstrip("-").isdigit()] + ["x", 4, "-0"]
    values = [pool[i] for i in rng.integers(0, len(pool), size=60)]
    want = mapper.ids(pa.array([str(v) for v in values], pa.string())).tolist()
    assert mapper.ids(values).tolist() == want
    monkeypatch.setattr(KeyMapper, "SMALL", 10)
    assert mapper.ids(values).tolist() == want
    assert 0 in want and any(w > 0 for w in want)
