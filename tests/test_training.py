import pytest
import torch

from cddrec.checkpoint import load_checkpoint
from cddrec.data import eval_split
from cddrec.errors import CheckpointError
from cddrec.evaluation import evaluate, evaluate_popularity
from cddrec.training import resume_path, train


def test_seeded_training_is_reproducible(tmp_path, tiny_configs, tiny_data):
    cfgs = tiny_configs(epochs=1)
    a = train(*cfgs, tiny_data, tmp_path / "a.pt", progress=False, log=lambda m: None)
    b = train(*cfgs, tiny_data, tmp_path / "b.pt", progress=False, log=lambda m: None)
    assert a["history"][0]["loss"] == b["history"][0]["loss"]
    ma, _ = load_checkpoint(tmp_path / "a.pt")
    mb, _ = load_checkpoint(tmp_path / "b.pt")
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), n


def test_resume_continues_exactly(tmp_path, tiny_configs, tiny_data):
    quiet = {"progress": False, "log": lambda m: None}
    full = train(*tiny_configs(epochs=3, patience=10), tiny_data, tmp_path / "full.pt", **quiet)
    train(*tiny_configs(epochs=2, patience=10), tiny_data, tmp_path / "part.pt", **quiet)
    assert resume_path(tmp_path / "part.pt").exists()
    resumed = train(*tiny_configs(epochs=3, patience=10), tiny_data, tmp_path / "part.pt", resume=True, **quiet)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["best_valid"] == full["best_valid"]


def test_tiny_model_learns_planted_structure(tmp_path, tiny_configs, tiny_data):
    cfgs = tiny_configs(epochs=15, patience=15, hidden_size=32, lr=3e-3)
    train(*cfgs, tiny_data, tmp_path / "m.pt", progress=False, log=lambda m: None)
    model, ckpt = load_checkpoint(tmp_path / "m.pt")
    test = eval_split(tiny_data, "test", cfgs[0].max_len)
    m = evaluate(model, test).metrics
    pop = evaluate_popularity(tiny_data.popularity("train"), test, tiny_data.num_items)
    assert m["R@10"] > pop["R@10"] + 0.1, (m, pop)
    assert ckpt["best_epoch"] >= 0 and "N@10" in ckpt["best_valid"]
    assert ckpt["data"]["fingerprint"] == tiny_data.fingerprint()


def test_resume_refuses_other_model_or_train_settings_and_names_them(tmp_path, tiny_configs, tiny_data):
    quiet = {"progress": False, "log": lambda m: None}
    out = tmp_path / "m.pt"
    train(*tiny_configs(epochs=1), tiny_data, out, **quiet)
    with pytest.raises(CheckpointError) as e:
        train(*tiny_configs(epochs=2, lr=0.01, hidden_size=32), tiny_data, out, resume=True, **quiet)
    msg = str(e.value)
    assert "\n" not in msg and "lr (0.001 saved, 0.01 now)" in msg and "hidden_size (16 saved, 32 now)" in msg
    assert "epochs" not in msg
    # how the run executes and stops may change between calls
    s = train(*tiny_configs(epochs=2, patience=5, eval_batch_size=7, time_budget=60.0), tiny_data, out, resume=True,
              **quiet)
    assert [h["epoch"] for h in s["history"]] == [0, 1]


def test_resume_reads_a_version_1_resume_file(tmp_path, tiny_configs, tiny_data):
    """A resume file of cddrec 0.2.0 held one flat "config" (with ``num_threads``): it resumes exactly."""
    quiet = {"progress": False, "log": lambda m: None}
    full = train(*tiny_configs(epochs=2, patience=10), tiny_data, tmp_path / "full.pt", **quiet)
    train(*tiny_configs(epochs=1, patience=10), tiny_data, tmp_path / "part.pt", **quiet)
    path = resume_path(tmp_path / "part.pt")
    state = torch.load(path, weights_only=True)
    flat = {**state.pop("model_config"), **state.pop("train_config"), **state.pop("run_config")}
    flat["num_threads"] = flat.pop("threads")
    state.pop("format_version")
    torch.save({**state, "config": flat}, path)
    resumed = train(*tiny_configs(epochs=2, patience=10), tiny_data, tmp_path / "part.pt", resume=True, **quiet)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


def test_synthetic_data_of_a_seed_is_the_data_it_always_was(tiny_data):
    """The generator was rewritten to scale to a million items with the same draws: the tiny data set of
    every test is the one the first version made (its fingerprint, recorded with that version)."""
    assert tiny_data.fingerprint() == "75424b9a5574ceb22f6ed9ae4520219801157891898a5ac50522059864397137"


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"\x80\x04K\x01."])
def test_an_empty_or_foreign_resume_file_is_one_line(tmp_path, tiny_configs, tiny_data, content):
    """An empty file's exception has no message: the error still names the file (it was an IndexError)."""
    resume_path(tmp_path / "m.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"m\.pt\.resume\.pt: unreadable resume state: \S") as e:
        train(*tiny_configs(epochs=1), tiny_data, tmp_path / "m.pt", resume=True, progress=False, log=lambda m: None)
    assert "\n" not in str(e.value)
