import json
from pathlib import Path

import pytest
import torch

from cddrec.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    weights_checksum,
)
from cddrec.config import ModelConfig, RunConfig, TrainConfig
from cddrec.model import CDDRec
from cddrec.vocab import Vocab


def save_tiny(path, cfg):
    torch.manual_seed(0)
    model = CDDRec(cfg).eval()
    vocab = Vocab.build(str(i) for i in range(cfg.num_items))
    save_checkpoint(path, model, vocab, torch.arange(cfg.num_rows), best_valid={"N@10": 0.5})
    return model, vocab


def test_round_trip_weights_only(tmp_path, tiny_cfg, make_histories):
    path = tmp_path / "m.pt"
    model, vocab = save_tiny(path, tiny_cfg)
    raw = torch.load(path, weights_only=True)  # data, not code
    assert raw["format_version"] == FORMAT_VERSION == 2
    assert raw["model_config"] == tiny_cfg.to_dict() and raw["vocab"]["keys"][0] == "0"
    assert raw["train_config"] == TrainConfig().to_dict() and raw["run_config"] == RunConfig().to_dict()
    loaded, ckpt = load_checkpoint(path)
    ids = make_histories(50, 4, 8)
    assert torch.equal(loaded(ids), model(ids))
    assert weights_checksum(loaded) == weights_checksum(model)
    assert ckpt["popularity"].shape == (tiny_cfg.num_rows,)
    assert Vocab.from_dict(ckpt["vocab"]).keys == vocab.keys
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_bad_model_files(tmp_path, tiny_cfg):
    with pytest.raises(CheckpointError, match="no such model file"):
        read_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable model file"):
        read_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a cddrec model file"):
        read_checkpoint(other)
    good = tmp_path / "good.pt"
    save_tiny(good, tiny_cfg)
    ckpt = torch.load(good, weights_only=True)
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}"):
        read_checkpoint(tmp_path / "future.pt")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable model file"):
        read_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "graph.onnx").write_bytes(b"onnx bytes")  # a graph given to a torch backend: says what to do
    with pytest.raises(CheckpointError, match="an exported graph, not a model file .* --backend ort-cpu"):
        read_checkpoint(tmp_path / "graph.onnx")


V1 = Path(__file__).parent / "data" / "model_v1.pt"  # written by cddrec 0.2.0: format version 1, one flat "config"


def test_version_1_model_files_load_export_and_serve(tmp_path):
    raw = torch.load(V1, weights_only=True)
    assert raw["format_version"] == 1 and "num_threads" in raw["config"] and "model_config" not in raw
    model, ckpt = load_checkpoint(V1)
    flat = raw["config"]
    assert ckpt["model_config"] == {k: flat[k] for k in ModelConfig.names()}
    # fields added since 0.2.0 (the sampled softmax's negatives, negative_sampling) take their defaults
    assert ckpt["train_config"] == TrainConfig(**{k: flat[k] for k in TrainConfig.names() if k in flat}).to_dict()
    assert set(TrainConfig.names()) - set(flat) == {"negatives", "negative_sampling"}
    assert ckpt["run_config"]["threads"] == flat["num_threads"] and ckpt["run_config"]["epochs"] == flat["epochs"]
    assert "config" not in ckpt and ckpt["format_version"] == 1
    for k, v in raw["model"].items():
        assert torch.equal(model.state_dict()[k], v), k

    from cddrec.export.onnx_export import ExportOptions, export_model
    from cddrec.inference import reference_topk
    from cddrec.runtime.backends import OrtBackend
    from cddrec.runtime.recommender import Recommender

    graph = tmp_path / "v1.onnx"
    export_model(V1, graph, ExportOptions(k=5))  # validated against the PyTorch reference
    assert json.loads(OrtBackend(graph, "cpu", 1).metadata()["config"]) == ckpt["model_config"]  # serving's reader
    vocab = Vocab.from_dict(raw["vocab"])
    histories = [[vocab.key(i) for i in (3, 7, 1)], [vocab.key(i) for i in (12, 4)]]
    with Recommender.load(graph) as rec:
        got = rec.recommend(histories)
    want, _, _ = reference_topk(model, torch.tensor([[3, 7, 1], [0, 12, 4]]), 5)
    assert [r.items for r in got] == [[vocab.key(int(i)) for i in row] for row in want]


def test_version_1_file_with_a_bad_config_is_one_line(tmp_path):
    raw = torch.load(V1, weights_only=True)
    raw["config"] = {**raw["config"], "hidden_size": "wide"}
    bad = tmp_path / "bad.pt"
    torch.save(raw, bad)
    with pytest.raises(CheckpointError, match="hidden_size") as e:
        read_checkpoint(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
