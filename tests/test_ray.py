"""cddrec-infer --ray local: shards served by a Ray Data actor pool, one output per shard."""

import json

import pytest
from click.testing import CliRunner

from cddrec.app.infer import main as infer_main
from cddrec.runtime.pipeline import run_batch
from cddrec.runtime.recommender import Recommender

pytest.importorskip("ray.data")


def test_ray_local_over_four_shards(tmp_path, trained_tiny_onnx):
    rec = Recommender.load(trained_tiny_onnx, threads=1)
    keys = rec.info.vocab.keys
    shards = tmp_path / "shards"
    shards.mkdir()
    all_lines = []
    for s in range(4):
        lines = [json.dumps({"user": f"s{s}u{i}", "history": [int(keys[(s * 7 + i * 3 + j) % len(keys)])
                                                               for j in range(1 + (i % 9))]}) for i in range(30)]
        if s in (1, 3):
            lines[4 + s] = "{not json"
        (shards / f"part-{s}.jsonl").write_text("\n".join(lines) + "\n")
        all_lines += [x for x in lines if not x.startswith("{not")]
    single = tmp_path / "all.jsonl"
    single.write_text("\n".join(all_lines) + "\n")
    run_batch(rec, single, tmp_path / "single.jsonl", k=5)
    want = {r["user"]: r for r in map(json.loads, (tmp_path / "single.jsonl").read_text().splitlines())}

    out = tmp_path / "out"
    r = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(shards / "*.jsonl"),
                                        "-o", str(out), "--k", "5", "--ray", "local", "--ray-actors", "2",
                                        "--quiet"])
    assert r.exit_code == 0, r.output
    assert "served 118 users" in r.output and "bad lines 2" in r.output
    got = {}
    for s in range(4):
        rows = [json.loads(x) for x in (out / f"part-{s}.jsonl").read_text().splitlines()]
        assert [x["user"] for x in rows] == [f"s{s}u{i}" for i in range(30) if not (s in (1, 3) and i == 4 + s)]
        got.update({x["user"]: x for x in rows})
        errs = out / f"part-{s}.jsonl.errors.jsonl"
        if s in (1, 3):
            assert [json.loads(x)["line"] for x in errs.read_text().splitlines()] == [5 + s]
        else:
            assert not errs.exists()
    assert got.keys() == want.keys()
    for u, x in got.items():
        assert x["items"] == want[u]["items"] and x["scores"] == want[u]["scores"]


def test_ray_errors_name_the_shard_strict_writes_nothing_and_ray_stays_quiet(tmp_path, trained_tiny_onnx):
    """Issue 19 item 5: the single-process one-line errors, naming the shard (never the actor's copy);
    --strict leaves no output anywhere; a shard that cannot be read is listed and the others kept;
    Ray's own logging stays out of the terminal."""
    import subprocess
    import sys

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        (shards / f"p{s}.jsonl").write_text("".join(json.dumps({"user": f"s{s}u{i}", "history": [1, 2]}) + "\n"
                                                    for i in range(5)))
    (shards / "p1.jsonl").write_text((shards / "p1.jsonl").read_text() + "{not json\n")
    (shards / "p3.parquet").write_bytes(b"PAR1 truncated")
    out = tmp_path / "out"
    args = ["--model", str(trained_tiny_onnx), "--batch", str(shards), "-o", str(out), "--ray", "local",
            "--ray-actors", "2", "--quiet"]
    r = CliRunner().invoke(infer_main, args + ["--strict"])
    assert r.exit_code == 1 and not out.exists(), r.output
    assert r.output.strip().splitlines() == [f"Error: {shards / 'p1.jsonl'}:6: invalid JSON: Expecting property name "
                                             "enclosed in double quotes (column 2)"]
    p = subprocess.run([sys.executable, "-m", "cddrec.app.infer", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith(f"Error: {shards / 'p3.parquet'}: not a readable Parquet file") and "cddrec-shard" \
        not in lines[0]
    assert lines[1].startswith("served 15 users") and "bad lines 1" in lines[1] and len(lines) == 3, p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["p0.jsonl", "p1.jsonl", "p1.jsonl.errors.jsonl", "p2.jsonl"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out", "shards"]  # no lock, no staging folder left
