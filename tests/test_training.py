import torch

from cddrec.checkpoint import load_checkpoint
from cddrec.data import eval_split
from cddrec.evaluation import evaluate, evaluate_popularity
from cddrec.training import resume_path, train


def test_seeded_training_is_reproducible(tmp_path, tiny_cfg, tiny_data):
    cfg = tiny_cfg.replace(epochs=1)
    a = train(cfg, tiny_data, tmp_path / "a.pt", progress=False, log=lambda m: None)
    b = train(cfg, tiny_data, tmp_path / "b.pt", progress=False, log=lambda m: None)
    assert a["history"][0]["loss"] == b["history"][0]["loss"]
    ma, _ = load_checkpoint(tmp_path / "a.pt")
    mb, _ = load_checkpoint(tmp_path / "b.pt")
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), n


def test_resume_continues_exactly(tmp_path, tiny_cfg, tiny_data):
    quiet = {"progress": False, "log": lambda m: None}
    full = train(tiny_cfg.replace(epochs=3, patience=10), tiny_data, tmp_path / "full.pt", **quiet)
    train(tiny_cfg.replace(epochs=2, patience=10), tiny_data, tmp_path / "part.pt", **quiet)
    assert resume_path(tmp_path / "part.pt").exists()
    resumed = train(tiny_cfg.replace(epochs=3, patience=10), tiny_data, tmp_path / "part.pt", resume=True, **quiet)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["best_valid"] == full["best_valid"]


def test_tiny_model_learns_planted_structure(tmp_path, tiny_cfg, tiny_data):
    cfg = tiny_cfg.replace(epochs=15, patience=15, hidden_size=32, lr=3e-3)
    train(cfg, tiny_data, tmp_path / "m.pt", progress=False, log=lambda m: None)
    model, ckpt = load_checkpoint(tmp_path / "m.pt")
    test = eval_split(tiny_data, "test", cfg.max_len)
    m = evaluate(model, test).metrics
    pop = evaluate_popularity(tiny_data.popularity("train"), test, tiny_data.num_items)
    assert m["R@10"] > pop["R@10"] + 0.1, (m, pop)
    assert ckpt["best_epoch"] >= 0 and "N@10" in ckpt["best_valid"]
    assert ckpt["data"]["fingerprint"] == tiny_data.fingerprint()
