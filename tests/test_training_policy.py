"""Divergence policy, time-budget stops that resume exactly, progress lines without a terminal."""

import math

import pytest
import torch
from click.testing import CliRunner

import cddrec.training as training
from cddrec.app.evaluate import main as eval_main
from cddrec.checkpoint import load_checkpoint
from cddrec.data import eval_split
from cddrec.errors import NonFiniteError
from cddrec.evaluation import evaluate
from cddrec.training import resume_path, train

QUIET = {"progress": False, "log": lambda m: None}


def _diverge_at(monkeypatch, epoch_batches: int, after_batches: int):
    """Make the loss NaN from the ``after_batches``-th training batch on (as a too-large lr does)."""
    real = training.objective
    calls = {"n": 0}

    def objective(model, batch, cfg, shares=None):
        loss, parts = real(model, batch, cfg, shares)
        calls["n"] += 1
        if calls["n"] > after_batches:
            loss = loss * float("nan")
            parts = {**parts, "loss": float("nan")}
        return loss, parts

    monkeypatch.setattr(training, "objective", objective)


def test_diverged_run_keeps_the_last_finite_best_model(tmp_path, tiny_configs, tiny_data, monkeypatch):
    from cddrec.batches import TrainBatches

    model_cfg, train_cfg, run_cfg = tiny_configs(epochs=4, patience=4)
    n = len(TrainBatches(tiny_data, model_cfg.max_len, train_cfg.batch_size))
    _diverge_at(monkeypatch, n, 2 * n + 1)  # epochs 0 and 1 are finite, epoch 2 turns NaN
    s = train(model_cfg, train_cfg, run_cfg, tiny_data, tmp_path / "m.pt", **QUIET)
    assert s["stop_reason"].startswith("diverged") and s["epochs_run"] == 2
    model, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["best_epoch"] in (0, 1)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    assert all(math.isfinite(v) for v in ckpt["best_valid"].values())
    state = torch.load(resume_path(tmp_path / "m.pt"), weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_divergence_before_any_finite_model_is_an_error(tmp_path, tiny_configs, tiny_data, monkeypatch):
    _diverge_at(monkeypatch, 0, 0)
    with pytest.raises(NonFiniteError, match="diverged"):
        train(*tiny_configs(), tiny_data, tmp_path / "m.pt", **QUIET)
    assert not (tmp_path / "m.pt").exists()


def test_evaluation_refuses_non_finite_scores(tmp_path, tiny_model, tiny_data, tiny_data_file, trained_tiny):
    with torch.no_grad():
        tiny_model.item_emb.weight[3, 0] = float("nan")
    split = eval_split(tiny_data, "test", tiny_model.cfg.max_len)
    with pytest.raises(NonFiniteError, match="not finite"):
        evaluate(tiny_model, split)
    # cddrec-eval on a model file holding NaN weights: a one-line error, not R@K = 1.0
    ckpt = torch.load(trained_tiny, weights_only=True)
    ckpt["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)
    r = CliRunner().invoke(eval_main, [str(bad), str(tiny_data_file)])
    assert r.exit_code == 1 and "not finite" in r.output and "R@10" not in r.output, r.output


def _resume_weights(path):
    return torch.load(resume_path(path), weights_only=True)["model"]


def test_budget_stop_resumes_the_partial_epoch_exactly(tmp_path, tiny_configs, tiny_data):
    model_cfg, train_cfg, run_cfg = tiny_configs(epochs=2, patience=5)
    full = train(model_cfg, train_cfg, run_cfg, tiny_data, tmp_path / "full.pt", **QUIET)
    n = full["history"][0]["batches"]
    # a budget that runs out after the first batch: epoch 0 is partial (1 batch), not complete
    budget = run_cfg.replace(time_budget=1e-9)
    part = train(model_cfg, train_cfg, budget, tiny_data, tmp_path / "part.pt", **QUIET)
    assert part["history"][-1]["partial"] and part["history"][-1]["batches"] == 1 and "inside epoch 0" in \
        part["stop_reason"]
    # resuming with the same budget runs one more batch of the same epoch and says so
    again = train(model_cfg, train_cfg, budget, tiny_data, tmp_path / "part.pt", resume=True, **QUIET)
    assert len(again["history"]) == 1 and again["history"][0]["batches"] == 2 and again["history"][0]["partial"]
    # resuming without a budget finishes epoch 0 and runs epoch 1: equal to the uninterrupted run
    done = train(model_cfg, train_cfg, run_cfg, tiny_data, tmp_path / "part.pt", resume=True, **QUIET)
    assert [h["batches"] for h in done["history"]] == [n, n]
    assert [h["loss"] for h in done["history"]] == [h["loss"] for h in full["history"]]
    a, b = _resume_weights(tmp_path / "full.pt"), _resume_weights(tmp_path / "part.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_progress_lines_when_not_a_terminal(tmp_path, tiny_configs, tiny_data):
    lines = []
    train(*tiny_configs(epochs=1), tiny_data, tmp_path / "m.pt", progress=False, progress_every=1e-9,
          log=lines.append)
    prog = [x for x in lines if "batches/s" in x]
    assert prog and "epoch 0 | batch 1/" in prog[0] and "ETA" in prog[0] and "loss" in prog[0]
    silent = []
    train(*tiny_configs(epochs=1), tiny_data, tmp_path / "q.pt", progress=False, log=silent.append)
    assert not [x for x in silent if "batches/s" in x]


@pytest.mark.parametrize("overrides", [{"lam": 0.3}, {"lam": 0.3, "denoising": True, "loss": "cd"}])
def test_same_seed_same_model_on_two_threads(tmp_path, tiny_data, overrides):
    """InfoNCE's gradient into the item table went through an index_put accumulate whose CPU kernel
    adds in thread order; on 2 threads two runs differed by ~1e-5 (issue 15, item 4)."""
    from cddrec.config import from_flat
    from cddrec.synthetic import make_synthetic

    data = make_synthetic(num_users=200, num_items=120, min_len=8, max_len=30, seed=5)
    cfgs = from_flat(dict(hidden_size=32, num_heads=2, max_len=20, steps=2, batch_size=128, epochs=1, seed=0,
                          threads=2, **overrides))
    try:
        train(*cfgs, data, tmp_path / "a.pt", **QUIET)
        train(*cfgs, data, tmp_path / "b.pt", **QUIET)
    finally:
        torch.set_num_threads(2)
    a, b = _resume_weights(tmp_path / "a.pt"), _resume_weights(tmp_path / "b.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_prints_progress_lines_without_a_terminal(tmp_path, tiny_data_file):
    from cddrec.app.train import main as train_main

    args = [str(tiny_data_file), "-o", str(tmp_path / "m.pt"), "--hidden-size", "16", "--num-heads", "2",
            "--max-len", "8", "--steps", "2", "--batch-size", "16", "--epochs", "1", "--num-threads", "1"]
    r = CliRunner().invoke(train_main, [*args, "--progress-every", "0.000001"])  # CliRunner: not a terminal
    assert r.exit_code == 0, r.output
    assert "epoch 0 | batch 1/" in r.output and "batches/s" in r.output
    r = CliRunner().invoke(train_main, [*args, "--quiet"])
    assert r.exit_code == 0 and "batches/s" not in r.output


@pytest.mark.parametrize("load, want", [(0.2, 4), (1.4, 3), (2.6, 1), (9.0, 1)])
def test_auto_threads_are_the_cores_not_already_busy(monkeypatch, load, want):
    """threads 0 = auto: the cores this process may use minus the 1-minute load average, at least 1 (issue 19:
    every core on a shared machine ran at 0.2 batches/s, one core at 0.9)."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    n, how = training.auto_threads()
    assert n == want and "4 cores" in how and f"{load:.2f}" in how


def test_first_training_line_says_the_threads(tmp_path, tiny_configs, tiny_data, monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    try:
        trainer = training.Trainer(*tiny_configs(threads=0, device="cpu"), tiny_data, tmp_path / "m.pt", progress=False)
        line = trainer.start_line()
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    cores = len(os.sched_getaffinity(0))
    assert trainer.threads == cores and line.startswith(f"training on cpu with {cores} CPU thread")
    assert f"(auto: {cores} cores, 0 busy" in line


def test_loss_auto_picks_the_objective_by_catalogue_size_and_says_why_at_start(tmp_path, tiny_configs, tiny_data,
                                                                             monkeypatch):
    import cddrec.config as config

    model_cfg, train_cfg, run_cfg = tiny_configs(loss="auto", negatives=16)
    trainer = training.Trainer(model_cfg, train_cfg, run_cfg, tiny_data, tmp_path / "m.pt", progress=False)
    assert trainer.loss == "ce"
    assert f"objective: full softmax over the catalogue (ce) (--loss auto: 50 items < " \
           f"{config.AUTO_SAMPLED_MIN_ITEMS:,})" in trainer.start_line()
    monkeypatch.setattr(config, "AUTO_SAMPLED_MIN_ITEMS", 50)
    trainer = training.Trainer(model_cfg, train_cfg, run_cfg, tiny_data, tmp_path / "m.pt", progress=False)
    assert trainer.loss == "sampled" and "sampled softmax over 16 popularity-sampled negatives per batch, " \
        "logQ-corrected (--loss auto: 50 items >= 50)" in trainer.start_line()
    s = trainer.fit()
    assert s["epochs_run"] == 2 and math.isfinite(s["history"][-1]["loss"])
    # the ranking term's cost follows the logit columns: M, not N, for the sampled softmax
    big = model_cfg.replace(num_items=10**6, steps=20)
    assert train_cfg.replace(loss="ce").rank_last_only(big)
    assert not train_cfg.replace(loss="sampled", negatives=2048).rank_last_only(big)


def test_auto_resume_starts_without_a_resume_file_and_continues_with_one(tmp_path, tiny_data_file):
    """--auto-resume: the same command starts a run and, restarted (torchrun --max-restarts, a nightly job),
    continues it from the last recorded epoch."""
    from cddrec.app.train import main as train_main

    args = [str(tiny_data_file), "-o", str(tmp_path / "m.pt"), "--hidden-size", "16", "--num-heads", "2",
            "--max-len", "8", "--steps", "2", "--batch-size", "16", "--threads", "1", "--auto-resume"]
    r = CliRunner().invoke(train_main, [*args, "--epochs", "1"])
    assert r.exit_code == 0 and "resumed" not in r.output and "epoch   0" in r.output, r.output
    r = CliRunner().invoke(train_main, [*args, "--epochs", "2"])
    assert r.exit_code == 0 and "resumed from" in r.output and "epoch   1" in r.output, r.output
    assert "epoch   0" not in r.output
