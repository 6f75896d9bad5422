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
