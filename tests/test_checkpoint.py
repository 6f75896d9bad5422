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
    assert raw["config"]["hidden_size"] == 16 and raw["vocab"]["keys"][0] == "0"
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
