import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cddrec.app.evaluate import main as eval_main
from cddrec.app.infer import main as infer_main
from cddrec.data import eval_split
from cddrec.errors import BackendUnavailable, ModelFileError
from cddrec.runtime.backends import load_backend
from cddrec.runtime.pipeline import run_batch
from cddrec.runtime.recommender import Recommender


def requests_for_split(data, split="test"):
    """JSONL requests whose histories are the split's (everything before the target)."""
    cut = 1 if split == "test" else 2
    return [{"user": u, "history": data.items.decode(s[:-cut].tolist())}
            for u, s in zip(data.users, data.sequences)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_recommend_with_original_keys(trained_tiny_onnx, tiny_data):
    rec = Recommender.load(trained_tiny_onnx)
    s = tiny_data.sequences[0]
    keys = tiny_data.items.decode(s.tolist())
    out = rec.recommend([keys, keys + ["no-such-item"], ["nope"], []], k=5)
    assert out[0].items == out[1].items and out[1].unknown == 1
    assert all(isinstance(i, int) for i in out[0].items)  # integer keys come back as ints
    assert not set(out[0].items) & set(keys)
    assert out[2].source == "popularity" and out[3].source == "popularity" and out[2].unknown == 1
    assert out[2].items == [p[0] for p in rec.info.popular[:5]]
    with pytest.raises(ValueError, match="at most K=10"):
        rec.recommend([keys], k=11)


def test_long_history_uses_most_recent_items(trained_tiny_onnx, tiny_data):
    rec = Recommender.load(trained_tiny_onnx)
    keys = tiny_data.items.keys
    hist = [keys[i % len(keys)] for i in range(30)]
    long, = rec.recommend([hist], k=10)
    # the model sees only the last L items; older items are still excluded from the ranking
    assert not set(long.items) & {int(k) for k in hist}


def test_backends_agree(trained_tiny, trained_tiny_onnx, make_histories):
    ort = load_backend(trained_tiny_onnx, "ort-cpu", threads=1)
    ref = load_backend(trained_tiny, "torch", k=10)
    ids = make_histories(40, 17, 12, seed=9).numpy()
    a, b = ort.infer({"item_ids": ids}), ref.infer({"item_ids": ids})
    assert np.abs(a["top_scores"] - b["top_scores"]).max() <= 1e-4
    assert (a["top_items"] == b["top_items"]).all()


def test_not_a_cddrec_graph(tmp_path):
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(g), tmp_path / "plain.onnx")
    with pytest.raises(ModelFileError, match="not a cddrec export"):
        Recommender.load(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ModelFileError, match="cannot load it as a graph"):
        Recommender.load(tmp_path / "junk.onnx")
    with pytest.raises(ModelFileError, match="no such file"):
        Recommender.load(tmp_path / "missing.onnx")


def test_bad_input_lines(tmp_path, trained_tiny_onnx, tiny_data):
    keys = tiny_data.items.keys[:5]
    lines = [
        json.dumps({"user": "a", "history": [int(k) for k in keys]}),
        "",
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"history": [1]}),
        json.dumps({"user": "b"}),
        json.dumps({"user": "c", "history": "1 2 3"}),
        json.dumps({"user": "d", "history": [1, None]}),
        json.dumps({"user": True, "history": [1]}),
        json.dumps({"user": "a", "history": [1]}),
        json.dumps({"user": "e", "history": ["unknown-item"]}),
    ]
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(lines) + "\n")
    out = tmp_path / "recs.jsonl"
    stats = run_batch(Recommender.load(trained_tiny_onnx), req, out, k=5)
    assert (stats.served, stats.bad, stats.fallbacks, stats.unknown_items) == (2, 9, 1, 1)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["user"] for r in recs] == ["a", "e"] and [r["source"] for r in recs] == ["model", "popularity"]
    errors = [json.loads(x) for x in (tmp_path / "recs.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    reasons = " | ".join(e["reason"] for e in errors)
    for want in ["blank line", "invalid JSON", "expected a JSON object", "missing field 'user'",
                 "missing field 'history'", "must be a list", "entry 1 must be a string or integer",
                 "field 'user' must be a string or integer, got bool", "duplicate user 'a' (first on line 1)"]:
        assert want in reasons

    # strict: non-zero exit, nothing written, an existing output untouched
    out.write_text("previous run\n")
    r = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(req), "-o", str(out),
                                        "--strict"])
    assert r.exit_code == 1 and "req.jsonl:2: blank line" in r.output
    assert out.read_text() == "previous run\n"


def test_batch_sizes_agree_and_match_eval_save_topk(tmp_path, trained_tiny, trained_tiny_onnx, tiny_data,
                                                    tiny_data_file):
    req = write_jsonl(tmp_path / "req.jsonl", requests_for_split(tiny_data))
    rec = Recommender.load(trained_tiny_onnx, threads=1)
    outs = []
    for bs in (1, 7, 64):
        out = tmp_path / f"r{bs}.jsonl"
        run_batch(rec, req, out, k=10, batch_size=bs)
        outs.append(out.read_text())
    assert outs[0] == outs[1] == outs[2]
    topk = tmp_path / "eval.jsonl"
    r = CliRunner().invoke(eval_main, [str(trained_tiny), str(tiny_data_file), "--save-topk", str(topk),
                                       "--topk", "10"])
    assert r.exit_code == 0, r.output
    ev = {x["user"]: x for x in map(json.loads, topk.read_text().splitlines())}
    served = [json.loads(x) for x in outs[0].splitlines()]
    assert len(served) == len(ev) == len(eval_split(tiny_data, "test", 8))
    for line in served:
        e = ev[line["user"]]
        assert line["items"] == e["items"]
        assert np.allclose(line["scores"], e["scores"], atol=1e-4)


def test_log_input_and_csv_output(tmp_path, trained_tiny_onnx, tiny_data):
    rows = ["user,item,timestamp"]
    for u, s in list(zip(tiny_data.users, tiny_data.sequences))[:5]:
        for t, item in reversed(list(enumerate(tiny_data.items.decode(s.tolist())))):  # out of time order
            rows.append(f"{u},{item},{t}")
    log = tmp_path / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    out = tmp_path / "recs.csv"
    r = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(log), "-o", str(out),
                                        "--output-format", "csv", "--k", "3"])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert lines[0] == "user,rank,item,score,source" and len(lines) == 1 + 5 * 3
    rec = Recommender.load(trained_tiny_onnx)
    want = rec.recommend([tiny_data.items.decode(tiny_data.sequences[0].tolist())], k=3)[0]
    assert [int(x.split(",")[2]) for x in lines[1:4]] == want.items


def test_missing_backend_library_message(trained_tiny_onnx):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match="pip install"):
            load_backend(trained_tiny_onnx, "trt")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            load_backend(trained_tiny_onnx, "ort-cuda")


@pytest.mark.gpu
def test_ort_cuda_matches_the_reference(trained_tiny, trained_tiny_onnx, make_histories):
    """ort-cuda and ort-cpu against the fp32 reference, each under the graph's rule for its device."""
    import onnxruntime

    from cddrec.checkpoint import load_checkpoint
    from cddrec.inference import reference_runner
    from cddrec.parity import compare_runners

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed")
    model, _ = load_checkpoint(trained_tiny)
    feeds = {str(b): {"item_ids": make_histories(40, b, 8, seed=b).numpy()} for b in (1, 64)}
    for backend, device in (("ort-cuda", "cuda"), ("ort-cpu", "cpu")):
        be = load_backend(trained_tiny_onnx, backend)
        parity = compare_runners({backend: be.infer}, reference_runner(model), feeds, **be.contract.parity_rule(device))
        assert parity.ok, parity.failures()


def test_k_above_a_small_catalogue_is_clamped(tmp_path, tiny_cfg):
    """A 3-item model: the torch backend and a K=N graph serve --k 10 as all 3 items (issue 15 item 11)."""
    import torch

    from cddrec.checkpoint import save_checkpoint
    from cddrec.export.onnx_export import ExportOptions, export_model
    from cddrec.model import CDDRec
    from cddrec.vocab import Vocab

    torch.manual_seed(0)
    model = CDDRec(tiny_cfg.replace(num_items=3)).eval()
    save_checkpoint(tmp_path / "m.pt", model, Vocab.build(["a", "b", "c"]), torch.ones(5, dtype=torch.long))
    export_model(tmp_path / "m.pt", tmp_path / "m.onnx", ExportOptions(k=10))
    for path, backend in ((tmp_path / "m.pt", "torch"), (tmp_path / "m.onnx", "ort-cpu")):
        rec = Recommender.load(path, backend=backend, k=10)
        out = rec.recommend([["a"], ["zzz"]], k=10)
        assert sorted(out[0].items) == ["b", "c"] and out[0].source == "model"  # "a" is seen: 2 left
        assert len(out[1].items) == 3 and out[1].source == "popularity"


def test_recommend_refuses_what_is_not_a_history(trained_tiny_onnx):
    rec = Recommender.load(trained_tiny_onnx)
    with pytest.raises(ValueError, match="history 0 must be a list"):
        rec.recommend(["332"])  # a string is not a list of item keys
    with pytest.raises(ValueError, match="history 1 entry 0 must be a string or integer, got float"):
        rec.recommend([[1], [5.0]])
    with pytest.raises(ValueError, match="at least 1"):
        rec.recommend([[1]], k=0)


def test_backend_serving_policy_is_declared_by_its_class():
    """max_history, tf32, the serving options and the small-batch session come from the backend
    class (runtime/backends.py), not from callers testing names."""
    from cddrec.contract import MAX_HISTORY
    from cddrec.runtime.backends import (
        OrtCpu,
        OrtCuda,
        OrtCudaGraph,
        available_cores,
        backend_class,
        engine_options,
        tf32_problem,
    )

    assert backend_class("trt").max_history == MAX_HISTORY and OrtCpu.max_history is None
    assert engine_options("ort-cpu") == {"allow_spinning": False}
    assert engine_options("ort-cuda", tf32=True) == {"tf32": True} and engine_options("ort-cuda-graph") == {}
    assert tf32_problem("ort-cuda-graph") is None
    assert tf32_problem("trt") == "tf32 applies to ort-cuda and ort-cuda-graph, not trt"
    with pytest.raises(ValueError, match="tf32 applies to ort-cuda and ort-cuda-graph, not ort-cpu"):
        engine_options("ort-cpu", tf32=True)
    assert OrtCpu.small_batch_threads(4) == 1 and OrtCpu.small_batch_threads(1) is None
    assert OrtCuda.small_batch_threads(4) is None and OrtCudaGraph.small_batch_threads(4) is None
    # engine instances: ort-cpu one single-thread instance per core by default, or the cores divided
    cores = available_cores()
    assert OrtCpu.serving_instances(0, 0) == (cores, 1) and OrtCpu.serving_instances(0, 1) == (1, cores)
    assert OrtCpu.serving_instances(1, 0) == (cores, 1) and OrtCpu.serving_instances(2, 3) == (3, 2)
    assert OrtCudaGraph.serving_instances(0, 0) == (1, 0) and OrtCuda.serving_instances(2, 1) == (1, 2)
    with pytest.raises(ValueError, match="ort-cuda-graph runs one batch at a time: use --instances 1, not 2"):
        OrtCudaGraph.serving_instances(0, 2)


def test_instances_serve_exactly_what_one_instance_serves(tmp_path, trained_tiny_onnx, tiny_data, make_histories):
    """Engine batches side by side (``instances``) on one session: the same rows in the same order,
    through the library and through cddrec-infer; a backend whose runs cannot overlap refuses."""
    from cddrec.app.infer import main as infer_main

    one, two = Recommender.load(trained_tiny_onnx, threads=1), Recommender.load(trained_tiny_onnx, threads=1,
                                                                                  instances=2)
    keys = list(one.info.vocab.keys)
    ids = make_histories(len(keys), 300, 12, seed=11).numpy()  # (300, 12) left-padded with 0
    hists = [[keys[i - 1] for i in row if i > 0] for row in ids]
    a, b = one.recommend(hists, k=10), two.recommend(hists, k=10)
    assert [r.items for r in a] == [r.items for r in b] and [r.scores for r in a] == [r.scores for r in b]
    req = write_jsonl(tmp_path / "req.jsonl", requests_for_split(tiny_data))
    outs = []
    for n in ("1", "3"):
        out = tmp_path / f"o{n}.jsonl"
        r = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(req), "-o", str(out),
                                            "--instances", n, "--batch-size", "7", "--quiet"])
        assert r.exit_code == 0, r.output
        outs.append(out.read_text())
    assert outs[0] == outs[1] and outs[0].count("\n") == len(requests_for_split(tiny_data))
    r = CliRunner().invoke(infer_main, ["--model", str(trained_tiny_onnx), "--batch", str(req), "-o",
                                        str(tmp_path / "x.jsonl"), "--backend", "ort-cuda-graph", "--instances", "2"])
    assert r.exit_code == 2 and "ort-cuda-graph runs one batch at a time" in r.output
    assert not (tmp_path / "x.jsonl").exists()


def test_batch_run_keeps_max_history_as_recommend_does(tmp_path, trained_tiny_onnx, tiny_data):
    """A Recommender's max_history holds for run_batch as for recommend() and the server (run_batch
    applied it to trt only)."""
    keys = tiny_data.items.keys
    hist = [int(keys[i % len(keys)]) for i in range(12)]
    rec = Recommender.load(trained_tiny_onnx, max_history=3)
    req, out = tmp_path / "req.jsonl", tmp_path / "recs.jsonl"
    req.write_text(json.dumps({"user": "a", "history": hist}) + "\n")
    run_batch(rec, req, out, k=10)
    got = json.loads(out.read_text())["items"]
    assert got == [int(x) for x in rec.recommend([hist], k=10)[0].items]
    assert got != [int(x) for x in Recommender.load(trained_tiny_onnx).recommend([hist], k=10)[0].items]


def test_ray_summary_lines_come_from_the_library():
    """cddrec-infer --ray prints runtime.distributed.summary_lines: each failed shard, the totals, the outputs."""
    from cddrec.runtime.distributed import summary_lines
    from cddrec.runtime.pipeline import BatchStats

    rows = [{"error": "", "errors": "out/a.jsonl.errors.jsonl"}, {"error": "b.jsonl: line 1: invalid JSON", "errors": ""},
            {"error": "", "errors": ""}]
    lines = summary_lines(BatchStats(lines=9, served=8, bad=1, seconds=2.0), rows, "out")
    assert lines[0] == "Error: b.jsonl: line 1: invalid JSON"
    assert lines[1].startswith("served 8 users (4 users/s), bad lines 1") and lines[1].endswith(", shards 3")
    assert lines[2] == "wrote 2 outputs to out; bad lines in 1 errors files; 1 shards failed and were not written"
    assert summary_lines(BatchStats(served=1, seconds=1.0), rows[2:], "out")[1:] == ["wrote 1 outputs to out"]
