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
from cddrec.export.onnx_export import read_metadata, write_metadata


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
