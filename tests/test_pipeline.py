"""The columnar serving pipeline: parity with Recommender.recommend, formats, bad input, reliability."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cddrec.app.infer import main as infer_main
from cddrec.io import output_lock
from cddrec.runtime.codec import KeyMapper, encode_flat, encode_one, left_pad
from cddrec.runtime.pipeline import SeenUsers, run_batch
from cddrec.runtime.recommender import Recommender
from cddrec.vocab import Vocab


@pytest.fixture(scope="module")
def rec(trained_tiny_onnx):
    return Recommender.load(trained_tiny_onnx, threads=1)


def random_requests(keys, n, seed, max_len=20):
    """Fresh random requests: int and string item keys, unknown keys, empty and all-unknown histories."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hist = [int(keys[j]) if g.random() < 0.7 else str(keys[j])
                for j in g.integers(0, len(keys), size=int(g.integers(0, max_len)))]
        if g.random() < 0.1:
            hist.insert(int(g.integers(0, len(hist) + 1)), f"unknown-{i}")
        if g.random() < 0.05:
            hist = ["nope"]
        user = i if g.random() < 0.5 else f"u{i}"
        out.append({"user": user, "history": hist})
    return out


def reference(rec, reqs, k):
    """The plain path: Recommender.recommend on each request."""
    recs = rec.recommend([r["history"] for r in reqs], k=k)
    return {json.dumps(r["user"]): x for r, x in zip(reqs, recs)}


def check_same(rows, ref):
    assert len(rows) == len(ref)
    for row in rows:
        want = ref[json.dumps(row["user"])]
        assert row["items"] == want.items
        assert np.allclose(row["scores"], want.scores, atol=1e-6)
        assert row["source"] == want.source


@pytest.mark.parametrize("block_bytes", [300, 1 << 20])
def test_columnar_matches_recommend(tmp_path, rec, block_bytes):
    keys = rec.info.vocab.keys
    for seed in (1, 2):
        reqs = random_requests(keys, 300, seed)
        req = tmp_path / "req.jsonl"
        req.write_text("".join(json.dumps(r) + "\n" for r in reqs))
        out = tmp_path / "out.jsonl"
        stats = run_batch(rec, req, out, k=7, batch_size=13, block_bytes=block_bytes)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["user"] for r in rows] == [r["user"] for r in reqs]  # input order, key types kept
        check_same(rows, reference(rec, reqs, 7))
        ref = reference(rec, reqs, 7)
        assert stats.unknown_items == sum(x.unknown for x in ref.values())
        assert stats.fallbacks == sum(x.source == "popularity" for x in ref.values()) > 0


def test_bad_lines_in_a_block_keep_the_good_ones(tmp_path, rec):
    keys = rec.info.vocab.keys
    reqs = random_requests(keys, 60, 5)
    lines = [json.dumps(r) for r in reqs]
    lines[10] = "{broken"
    lines[40] = json.dumps({"user": reqs[3]["user"], "history": []})  # duplicate of line 4
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(lines))  # no final newline
    out = tmp_path / "out.jsonl"
    stats = run_batch(rec, req, out, k=5)
    assert (stats.served, stats.bad) == (58, 2)
    errs = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errs] == [11, 41] and "(first on line 4)" in errs[1]["reason"]
    good = [r for i, r in enumerate(reqs) if i not in (10, 40)]
    check_same([json.loads(x) for x in out.read_text().splitlines()], reference(rec, good, 5))


def test_duplicates_across_blocks(tmp_path, rec):
    reqs = [{"user": i % 50, "history": [int(rec.info.vocab.keys[0])]} for i in range(120)]
    reqs[70]["user"] = "3"  # "3" and 3 are the same user, as before
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    stats = run_batch(rec, req, tmp_path / "o.jsonl", block_bytes=200)
    assert (stats.served, stats.bad) == (50, 70)
    errs = [json.loads(x) for x in (tmp_path / "o.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errs] == list(range(51, 121))
    firsts = [4 if e["line"] == 71 else (e["line"] - 1) % 50 + 1 for e in errs]
    assert all(f"(first on line {f})" in e["reason"] for e, f in zip(errs, firsts))


def test_seen_users_matches_a_set():
    g = np.random.default_rng(0)
    seen, ref = SeenUsers(), {}
    line = 1
    for _ in range(30):
        h = g.integers(0, 400, size=int(g.integers(1, 60))).astype(np.uint64)
        lines = np.arange(line, line + len(h))
        first = seen.check(h, lines)
        want = []
        for x, ln in zip(h.tolist(), lines.tolist()):
            want.append(ref.get(x, 0))
            ref.setdefault(x, ln)
        assert first.tolist() == want
        line += len(h)
    assert sum(len(r[0]) for r in seen.runs) == len(ref) and len(seen.runs) <= 8


@pytest.mark.parametrize("max_history", [None, 3])
@pytest.mark.parametrize("seed", [11, 12])
def test_one_user_alone_equals_its_row_in_a_batch(rec, monkeypatch, max_history, seed):
    """The one-user path (a server's lone request: ``encode_one``, ``left_pad``'s single row,
    ``Recommender.recommend_one``) against the batch path on random requests: int and string keys,
    unknown items, empty and all-unknown histories, a history leaving fewer than k items to rank."""
    monkeypatch.setattr(rec, "max_history", max_history)
    keys = rec.info.vocab.keys
    hists = [r["history"] for r in random_requests(keys, 80, seed)] + [list(keys[3:])]  # 3 items left to rank
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hists])])
    batch = encode_flat([k for h in hists for k in h], offsets, rec.mapper, max_history)
    width = int(batch.counts.max()) + 2
    feed = left_pad(batch.ids, batch.counts, width)  # (n, width)
    together = rec.recommend(hists, k=7)
    assert {x.source for x in together} == {"model", "popularity"}
    assert len(together[-1].items) == (3 if max_history is None else 7)
    for i, h in enumerate(hists):
        ids, unknown = encode_one(list(h), rec.mapper, max_history)
        assert ids == batch.ids[batch.offsets[i]:batch.offsets[i + 1]].tolist() and unknown == batch.unknown[i]
        assert left_pad(np.array(ids, dtype=np.int64), np.array([len(ids)]), width).tolist() == feed[i:i + 1].tolist()
        for alone in (rec.recommend_one(list(h), 7), rec.recommend([h], k=7)[0]):
            want = together[i]
            assert (alone.items, alone.source, alone.unknown) == (want.items, want.source, want.unknown)
            assert np.allclose(alone.scores, want.scores, rtol=rec.contract.rtol, atol=rec.contract.atol)
            assert all(type(x) is float for x in alone.scores)


@pytest.mark.parametrize("max_history", [0, -1, 2.5, True])
def test_max_history_is_a_positive_integer(rec, max_history):
    with pytest.raises(ValueError, match="max_history must be a positive integer"):
        Recommender(rec.backend, rec.info, max_history)


def test_left_pad():
    out = left_pad(np.array([1, 2, 3, 4, 5, 6]), np.array([2, 0, 3, 1]), 4)
    assert out.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 3, 4, 5], [0, 0, 0, 6]]


def test_parquet_in_and_out_and_csv(tmp_path, rec):
    keys = rec.info.vocab.keys
    reqs = [r for r in random_requests(keys, 200, 3) if isinstance(r["user"], int)]
    hist = [[str(x) for x in r["history"]] for r in reqs]
    src = tmp_path / "req.parquet"
    pq.write_table(pa.table({"user": [r["user"] for r in reqs], "history": hist}), src, row_group_size=37)
    out = tmp_path / "out.parquet"
    stats = run_batch(rec, src, out, k=6, block_bytes=37 * 128)
    assert stats.served == len(reqs)
    t = pq.read_table(out)
    assert t.column_names == ["user", "items", "scores", "source"] and t.schema.field("user").type == pa.int64()
    rows = [{"user": u, "items": i, "scores": s, "source": f}
            for u, i, s, f in zip(*(t.column(c).to_pylist() for c in t.column_names))]
    check_same(rows, reference(rec, [{"user": r["user"], "history": h} for r, h in zip(reqs, hist)], 6))
    # CSV out from the same requests
    csv_out = tmp_path / "out.csv"
    run_batch(rec, src, csv_out, k=6)
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "user,rank,item,score,source"
    first = [ln.split(",") for ln in lines[1:] if ln.split(",")[0] == str(rows[0]["user"])]
    assert [int(x[2]) for x in first] == rows[0]["items"] and [int(x[1]) for x in first] == list(
        range(1, len(rows[0]["items"]) + 1))


# ----------------------------------------------------------------------------- issue 13 items
def _infer(graph, req, out, *extra):
    return CliRunner().invoke(infer_main, ["--model", str(graph), "--batch", str(req), "-o", str(out), "--quiet",
                                           *extra])


def test_deep_nesting_and_huge_integers_are_bad_lines(tmp_path, trained_tiny_onnx):
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"user": "a", "history": [1]}) + "\n"
                   + '{"user": "b", "history": ' + "[" * 1500 + "]" * 1500 + "}\n"
                   + '{"user": 1' + "7" * 5000 + ', "history": [1]}\n'
                   + '{"user": "c", "history": [' + "9" * 5000 + "]}\n")
    out = tmp_path / "o.jsonl"
    r = _infer(trained_tiny_onnx, req, out)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    errs = [json.loads(x) for x in (tmp_path / "o.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errs] == [2, 3, 4]
    r = _infer(trained_tiny_onnx, req, out, "--strict")
    assert r.exit_code == 1 and "req.jsonl:2: invalid JSON" in r.output
    assert not isinstance(r.exception, RecursionError)


def test_lines_that_are_not_objects_are_bad_lines_and_never_reach_pyarrow(tmp_path, trained_tiny_onnx):
    """A top-level null first in a block ("null", "\\tnull", "nullx") kills the process inside pyarrow 26's
    JSON reader (SIGSEGV, found by the property test below): such blocks go line by line. Run in a child
    process, so a regression fails this test instead of killing the suite."""
    from cddrec.runtime.requests import _not_all_objects

    good = json.dumps({"user": "a", "history": [1]})
    cases = [b"null", b"\tnull", b"nullx", b"null null", b"[1]", b"7", b'"x"']
    assert all(_not_all_objects(c + b"\n" + good.encode() + b"\n") for c in cases)
    assert not _not_all_objects(b"\n  " + good.encode() + b"\r\n\n" + good.encode() + b"\n")  # blank lines, spaces
    req = tmp_path / "req.jsonl"
    req.write_bytes(b"\n".join(cases + [good.encode()]) + b"\n")
    out = tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, "-m", "cddrec.app.infer", "--model", str(trained_tiny_onnx), "--batch",
                        str(req), "-o", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])  # -11 before the fix
    assert [json.loads(x)["user"] for x in out.read_text().splitlines()] == ["a"]
    errs = [json.loads(x) for x in (tmp_path / "o.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errs] == list(range(1, len(cases) + 1))


def test_long_history_excludes_every_item(tmp_path, rec):
    keys = rec.info.vocab.keys
    first = rec.recommend([[keys[5]]], k=1)[0].items[0]  # the top item after one history item
    hist = [first] + [keys[5]] * 600  # `first` is 601 items back
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"user": "long", "history": hist}) + "\n")
    run_batch(rec, req, tmp_path / "o.jsonl", k=10)
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert first not in row["items"] and int(keys[5]) not in row["items"] and len(row["items"]) == 10


def test_output_that_is_the_input_is_refused(tmp_path, trained_tiny_onnx):
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"user": "a", "history": [1]}) + "\n")
    before = req.read_text()
    (tmp_path / "link.jsonl").symlink_to(req)
    for out in (req, tmp_path / "link.jsonl", tmp_path / "sub" / ".." / "req.jsonl"):
        r = _infer(trained_tiny_onnx, req, out)
        assert r.exit_code == 1 and "refusing to overwrite it" in r.output and "Traceback" not in r.output
    assert req.read_text() == before


def test_output_or_errors_file_that_is_the_model_is_refused(tmp_path, trained_tiny_onnx):
    """-o or --errors naming the graph (or a link to it) would replace the model with recommendations."""
    import shutil

    graph = tmp_path / "g.onnx"
    shutil.copy(trained_tiny_onnx, graph)
    (tmp_path / "link.onnx").symlink_to(graph)
    before = graph.read_bytes()
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"user": "a", "history": [1]}) + "\n")
    for args in ((graph,), (tmp_path / "o.jsonl", "--errors", str(graph)), (tmp_path / "o.jsonl", "--errors",
                                                                           str(tmp_path / "link.onnx"))):
        r = _infer(tmp_path / "link.onnx" if args[0] == graph else graph, req, *args)
        assert r.exit_code == 1 and "is the input --model" in r.output and "Traceback" not in r.output, r.output
    assert graph.read_bytes() == before and not (tmp_path / "o.jsonl").exists()


def test_utf16_or_binary_file_is_one_error_and_bom_is_accepted(tmp_path, trained_tiny_onnx):
    body = "".join(json.dumps({"user": f"u{i}", "history": [1, 2]}) + "\n" for i in range(5))
    req = tmp_path / "u16.jsonl"
    for data, words in ((body.encode("utf-16"), "UTF-16"), (body.encode("utf-16-le"), "UTF-16"),
                        (trained_tiny_onnx.read_bytes(), "binary data"), (b"PAR1\x00\x15" + bytes(300), "Parquet")):
        req.write_bytes(data)
        r = _infer(trained_tiny_onnx, req, tmp_path / "o.jsonl")
        assert r.exit_code == 1 and "not JSONL requests: it holds NUL bytes" in r.output and words in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o.jsonl.errors.jsonl").exists()
    for data in (b"", b"\xef\xbb\xbf"):  # empty, or only a byte-order mark: no requests, not a binary file
        req.write_bytes(data)
        r = _infer(trained_tiny_onnx, req, tmp_path / "o.jsonl")
        assert r.exit_code == 0 and "served 0 users" in r.output, r.output
    lines = body.splitlines(keepends=True)  # one corrupt line (a NUL, invalid UTF-8) among good ones: a bad line
    req.write_bytes("".join(lines[:2]).encode() + b'{"user": "x\x00\xff", "history": [1]}\n' + "".join(lines[2:]).encode())
    r = _infer(trained_tiny_onnx, req, tmp_path / "o.jsonl")
    assert r.exit_code == 0 and "served 5 users" in r.output and "bad lines 1" in r.output, r.output
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + body.encode())
    r = _infer(trained_tiny_onnx, bom, tmp_path / "o2.jsonl")
    assert r.exit_code == 0 and "served 5 users" in r.output and "bad lines 0" in r.output
    log = tmp_path / "log.csv"
    log.write_bytes(b"\xef\xbb\xbfuser,item,timestamp\nx,1,1\nx,2,2\n")
    r = _infer(trained_tiny_onnx, log, tmp_path / "o3.jsonl")
    assert r.exit_code == 0 and "served 1 users" in r.output, r.output


def test_bad_csv_row_is_reported_and_the_rest_served(tmp_path, rec, trained_tiny_onnx):
    keys = rec.info.vocab.keys
    log = tmp_path / "log.tsv"
    log.write_text("user\titem\ttimestamp\n"
                   f"a\t{keys[0]}\t1\n"
                   f"a\t{keys[1]}\t2\textra\n"
                   f"b\t{keys[2]}\tyesterday\n"
                   f"b\t{keys[3]}\t3\n"
                   f"c\t\t4\n"
                   f"a\t{keys[4]}\t0\n")
    out = tmp_path / "o.jsonl"
    r = _infer(trained_tiny_onnx, log, out)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["user"] for x in rows] == ["a", "b"]
    want = rec.recommend([[keys[4], keys[0]], [keys[3]]])
    assert [x["items"] for x in rows] == [w.items for w in want]
    errs = [json.loads(x) for x in (tmp_path / "o.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errs] == [3, 4, 6]
    assert "expected 3 fields" in errs[0]["reason"] and "must be a number" in errs[1]["reason"]


def test_second_run_on_the_same_output_is_refused(tmp_path, trained_tiny_onnx):
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"user": "a", "history": [1]}) + "\n")
    out = tmp_path / "o.jsonl"
    with output_lock(out):
        r = _infer(trained_tiny_onnx, req, out)
        assert r.exit_code == 1 and "another run is writing this output" in r.output
        assert not out.exists()
    r = _infer(trained_tiny_onnx, req, out)
    assert r.exit_code == 0 and out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".lock")]


def test_batch_size_is_range_checked(tmp_path, trained_tiny_onnx):
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"user": "a", "history": [1]}) + "\n")
    r = _infer(trained_tiny_onnx, req, tmp_path / "o.jsonl", "--batch-size", "0")
    assert r.exit_code == 2 and "--batch-size" in r.output


_line = st.one_of(
    st.text(max_size=40).map(lambda s: s.replace("\n", " ").encode("utf-8", "surrogatepass")),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
    st.builds(lambda u, h: json.dumps({"user": u, "history": h}).encode(),
              st.one_of(st.integers(), st.text(max_size=5)),
              st.lists(st.one_of(st.integers(-3, 60), st.text(max_size=3), st.none(), st.floats()), max_size=6)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_line, min_size=1, max_size=25))
def test_any_bytes_every_line_served_or_reported(tmp_path_factory, rec, lines):
    """Line by line: 64-byte blocks keep the first block under NOT_TEXT_MIN_BYTES, so no file here is refused
    whole as not text (that rule has its own test, test_utf16_or_binary_file_is_one_error_and_bom_is_accepted)."""
    from cddrec.runtime.requests import NOT_TEXT_MIN_BYTES

    assert 64 < NOT_TEXT_MIN_BYTES
    d = tmp_path_factory.mktemp("prop")
    req = d / "req.jsonl"
    req.write_bytes(b"\n".join(lines) + b"\n")
    out = d / "o.jsonl"
    stats = run_batch(rec, req, out, block_bytes=64)
    # JSONL lines end at \n only: keys may hold U+0085 or U+2028, which str.splitlines() would also split at
    served = [json.loads(x) for x in out.read_text().split("\n")[:-1]]
    errs = [json.loads(x) for x in (d / "o.jsonl.errors.jsonl").read_text().split("\n")[:-1]] if stats.bad else []
    assert len(served) == stats.served and len(errs) == stats.bad
    assert stats.served + stats.bad == len(lines) == stats.lines
    assert sorted(e["line"] for e in errs) == [e["line"] for e in errs]
    assert set(e["line"] for e in errs) <= set(range(1, len(lines) + 1))


def test_merge_of_sorted_runs_equals_a_stable_sort():
    from cddrec.runtime.pipeline import _merge_sorted

    rng = np.random.default_rng(0)
    for _ in range(50):
        a = np.sort(rng.integers(0, 50, rng.integers(0, 30)))
        b = np.sort(rng.integers(0, 50, rng.integers(0, 30)))
        la, lb = np.arange(len(a)), 100 + np.arange(len(b))
        h, lines = _merge_sorted(a, la, b, lb)
        order = np.argsort(np.concatenate([a, b]), kind="stable")
        assert (h == np.concatenate([a, b])[order]).all() and (lines == np.concatenate([la, lb])[order]).all()


def test_parquet_log_with_a_typed_timestamp_column(tmp_path, trained_tiny_onnx, tiny_data):
    """An Arrow timestamp column sorts as time (it used to make every row a bad 'timestamp' row)."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = tiny_data.items.keys[:3]
    t0 = dt.datetime(2024, 1, 1)
    rows = [("u1", keys[2], t0 + dt.timedelta(days=2)), ("u1", keys[0], t0), ("u1", keys[1], t0 + dt.timedelta(days=1))]
    pq.write_table(pa.table({"user": [r[0] for r in rows], "item": [r[1] for r in rows],
                             "timestamp": pa.array([r[2] for r in rows], pa.timestamp("ms"))}), tmp_path / "log.parquet")
    rec = Recommender.load(trained_tiny_onnx)
    stats = run_batch(rec, tmp_path / "log.parquet", tmp_path / "out.jsonl")
    assert stats.served == 1 and stats.bad == 0
    got = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = rec.recommend([[keys[0], keys[1], keys[2]]])[0]
    assert got[0]["items"] == want.items


# ------------------------------------------------------------------------- the codec's vectorized paths
def _ids_by_dict(vocab, values):
    return np.array([vocab.index.get(str(v), 0) for v in values], dtype=np.int64)


@pytest.mark.parametrize("keys", [[5, 3, 1000, 7, 4], [0], list(range(-50, 50, 3)),
                                  [-(2**63), 2**63 - 1, 12, -7], [2**62 + i for i in range(5)]])
def test_int_key_lookup_equals_the_vocabulary(keys):
    """The dense table (a small key range) and the binary search (a sparse one) both map as Vocab.index."""
    vocab = Vocab.build(str(k) for k in keys)
    mapper = KeyMapper(vocab)
    lo, hi = min(keys), max(keys)
    probe = keys + [lo - 1, hi + 1, 0, -1, 1, 2**63 - 1, -(2**63), 10**9, -(10**9)]
    probe = [p for p in probe if -(2**63) <= p < 2**63]
    got = mapper.ids(pa.array(probe, pa.int64()))
    assert got.dtype == np.int64
    assert got.tolist() == _ids_by_dict(vocab, probe).tolist()
    assert (mapper.lut is not None) == (hi - lo < 2**20)  # both paths are exercised
    assert mapper.ids(pa.array([str(p) for p in probe], pa.string())).tolist() == got.tolist()


@pytest.mark.parametrize("max_history", [None, 2])
def test_encode_flat_counts_known_and_unknown(max_history):
    vocab = Vocab.build(str(k) for k in range(1, 30))
    mapper = KeyMapper(vocab)
    g = np.random.default_rng(3)
    hists = [list(g.integers(0, 40, size=int(g.integers(0, 8)))) for _ in range(200)]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hists])])
    values = pa.array([int(x) for h in hists for x in h], pa.int64())
    enc = encode_flat(values, offsets, mapper, max_history)
    for i, h in enumerate(hists):
        known = [vocab.index[str(x)] for x in h if str(x) in vocab.index]
        assert enc.unknown[i] == len(h) - len(known)
        want = known[-max_history:] if max_history else known
        assert enc.ids[enc.offsets[i]:enc.offsets[i + 1]].tolist() == want


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, trained_tiny_onnx):
    """Long runs in logs (CI, nohup) show progress as lines, as cddrec-train does; --quiet silences them."""
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps({"user": f"u{i}", "history": [1 + i % 5, 2]}) + "\n" for i in range(300))
                   + "not json\n")
    r = _infer(trained_tiny_onnx, req, tmp_path / "o.jsonl", "--progress-every", "1e-9")  # with --quiet
    assert r.exit_code == 0 and "users served" not in r.output
    r = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(req), "-o",
                                        str(tmp_path / "o.jsonl"), "--progress-every", "1e-9"])
    lines = [x for x in r.output.splitlines() if "users served" in x]
    assert r.exit_code == 0 and lines, r.output
    assert lines[-1].startswith("cddrec-infer: 301 lines read, 300 users served (") and "1 bad lines" in lines[-1]
