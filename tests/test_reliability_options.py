"""Numeric options range-checked by click, and crafted graph metadata refused clearly (issue 13)."""

import json
import shutil

import pytest
from click.testing import CliRunner

from cddrec.app.bench import main as bench_main
from cddrec.app.demo import main as demo_main
from cddrec.app.export import main as export_main
from cddrec.app.train import main as train_main
from cddrec.errors import ModelFileError
from cddrec.export.metadata import read_metadata
from cddrec.export.onnx_export import write_metadata


@pytest.mark.parametrize("cmd,args", [
    (export_main, ["m.pt", "--k", "0"]), (export_main, ["m.pt", "--trt-max-batch", "0"]),
    (export_main, ["m.pt", "--trt-opt-batch", "-1"]),
    (demo_main, ["--minutes", "0"]), (demo_main, ["--minutes", "-1"]), (demo_main, ["--seed", "-1"]),
    (bench_main, ["--items", "0"]), (bench_main, ["--k", "0"]), (bench_main, ["--threads", "-1"]),
    (bench_main, ["--min-seconds", "0"]), (bench_main, ["--catalogue-batch", "0"]),
    (bench_main, ["--batch-sizes", "1,0"]), (bench_main, ["--batch-sizes", "-4"]),
    (train_main, ["data.txt", "--epochs", "0"]),
])
def test_numeric_options_range_checked(tmp_path, cmd, args):
    r = CliRunner().invoke(cmd, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and not (tmp_path / "cddrec-demo").exists()


def _crafted(tmp_path, onnx_path, change):
    path = tmp_path / "crafted.onnx"
    shutil.copy(onnx_path, path)
    meta = read_metadata(path)
    change(meta)
    write_metadata(path, meta)
    return path


def _load(path):
    from cddrec.runtime.recommender import Recommender

    return Recommender.load(path)


def test_crafted_metadata_is_refused(tmp_path, trained_tiny_onnx):
    cases = {
        "no 'K' entry": lambda m: m.pop("K"),
        "vocabulary has": lambda m: m.update(vocab=json.dumps({**json.loads(m["vocab"]),
                                                              "keys": json.loads(m["vocab"])["keys"][:-3]})),
        "'vocab' is not valid JSON": lambda m: m.update(vocab="{not json"),
        "popular_topk": lambda m: m.pop("popular_topk"),
    }
    for msg, change in cases.items():
        with pytest.raises(ModelFileError, match=msg) as e:
            _load(_crafted(tmp_path, trained_tiny_onnx, change))
        assert "crafted.onnx" in str(e.value)


def test_invalid_vocab_sidecar_names_the_file(tmp_path, trained_tiny_onnx):
    def sidecar(m):
        m.pop("vocab")
        m["vocab_file"] = "crafted.vocab.json"
    path = _crafted(tmp_path, trained_tiny_onnx, sidecar)
    (tmp_path / "crafted.vocab.json").write_text("{broken")
    with pytest.raises(ModelFileError, match="crafted.vocab.json"):
        _load(path)


def test_k_metadata_beyond_the_graph(tmp_path, trained_tiny_onnx, tiny_data):
    """K=50 metadata on a K=10 graph: refused, never 10 items for model users and 30 for fallback users."""
    path = _crafted(tmp_path, trained_tiny_onnx, lambda m: m.update(K="50"))
    try:
        rec = _load(path)
    except ModelFileError as e:
        assert "K" in str(e)
        return
    known = tiny_data.items.keys[0]
    with pytest.raises(ModelFileError, match="K"):
        rec.recommend([[known], ["never-seen-key"]], k=30)


# ------------------------------------------------------------------------------ issue 19
def _commands():
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in entry_points(group="console_scripts") if ep.name.startswith("cddrec-")}


def test_every_option_of_every_command_has_help_and_threads_are_capped():
    import click

    from cddrec.app.options import max_threads

    cmds = _commands()
    assert {"cddrec-train", "cddrec-eval", "cddrec-export", "cddrec-infer", "cddrec-bench"} <= set(cmds)
    for name, cmd in cmds.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert (p.help or "").strip(), f"{name} {p.opts} has no help text"
            if isinstance(p, click.Option) and "--threads" in p.opts:
                assert isinstance(p.type, click.IntRange) and p.type.max == max_threads(), name
                r = CliRunner().invoke(cmd, ["x", "--threads", str(max_threads() + 1)])
                assert r.exit_code == 2 and "--threads" in r.output, (name, r.output)


def test_threads_that_cannot_start_are_one_line(tmp_path, trained_tiny_onnx, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from cddrec.app.infer import main as infer_main
    from cddrec.runtime import recommender

    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"user": "a", "history": [1]}) + "\n")
    args = ["--model", str(trained_tiny_onnx), "--batch", str(req), "-o", str(tmp_path / "o.jsonl"), "--quiet"]
    failures = [Fail("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: "
                     "threadpool.cc:42 CreateThread pthread_create failed: Resource temporarily unavailable"),
                RuntimeError("can't start new thread"),
                RuntimeError("libgomp: Thread creation failed: Resource temporarily unavailable")]
    for exc in failures:
        def boom(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(recommender.Recommender, "load", classmethod(boom))
        r = CliRunner().invoke(infer_main, args)
        assert r.exit_code == 1 and r.output.startswith("Error: cannot start threads:"), r.output
        assert len(r.output.strip().splitlines()) == 1 and "lower --threads" in r.output
    monkeypatch.setattr(recommender.Recommender, "load", classmethod(lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("some other bug"))))
    r = CliRunner().invoke(infer_main, args)
    assert isinstance(r.exception, RuntimeError)  # any other error keeps its traceback
