"""Training under torchrun: DistributedDataParallel on gloo with 2 processes on tiny data.

Most tests run a job's ranks as processes forked from the test (torch.multiprocessing, fork: no
interpreter start-up), each with the environment torchrun gives its workers, through the same
``cddrec.distributed.launch`` and ``train`` (or the whole ``cddrec-train`` command) torchrun runs;
one test runs the real ``torchrun`` and the model it writes through cddrec-eval, -export and -infer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from conftest import tiny_configs

from cddrec.benchmarks.ports import free_port
from cddrec.checkpoint import load_checkpoint, read_checkpoint
from cddrec.distributed import launch
from cddrec.training import resume_path, train

QUIET = {"progress": False, "log": lambda m: None}
EXACT = dict(dropout=0.0, attn_dropout=0.0, lam=0.0, loss="ce", patience=10)  # no randomness but the shuffle


def _rank_main(rank: int, world: int, port: int, fn, args: tuple, kwargs: dict, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, *args, **kwargs)))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        queue.close()
        queue.join_thread()  # the result is sent before the process ends
        os._exit(0)  # no pytest teardown in a forked child


def _warm_imports() -> None:
    """Import in the parent what every child would import on its own (Adam imports torch._dynamo, ~2 s)."""
    import torch.nn.parallel  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def run_job(fn, world: int, *args, timeout: float = 60.0, **kwargs) -> list:
    """``fn(rank, *args, **kwargs)`` in ``world`` forked processes with torchrun's environment: each rank's result,
    in rank order; an exception in a rank fails the test with its traceback."""
    _warm_imports()
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, kwargs, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict((r, (kind, value)) for r, kind, value in (queue.get(timeout=timeout) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {v}" for r, (k, v) in sorted(results.items()) if k == "error"]
    assert not errors, "\n".join(errors)
    return [results[r][1] for r in range(world)]


def _train(rank, data, out, resume=False, **overrides):
    """One rank of a torchrun job training the tiny model; its summary and the resume file's weights."""
    cfgs = tiny_configs(**overrides)
    with launch("cpu", 1.0) as dist:
        s = train(*cfgs, data, out, resume=resume, dist=dist, **QUIET)
    return s


def _weights(path):
    return torch.load(resume_path(path), weights_only=True)["model"]


def _close(a: dict, b: dict, atol: float) -> float:
    """The largest absolute difference of two state dicts (asserted below ``atol``)."""
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


def test_two_ranks_with_half_batches_train_the_same_weights_as_one(tmp_path, tiny_data):
    """With dropout and InfoNCE off the shuffle is the only randomness: 2 ranks x batch 8 and 1 rank x
    batch 16 see the same global batches and take the same Adam steps, up to float reduction order."""
    two = run_job(_train, 2, tiny_data, tmp_path / "two.pt", batch_size=8, **EXACT)
    one = run_job(_train, 1, tiny_data, tmp_path / "one.pt", batch_size=16, **EXACT)
    assert two[0] == two[1]  # every rank returns rank 0's summary
    assert two[0]["global_batch"] == one[0]["global_batch"] == 16 and two[0]["processes"] == 2
    assert [h["batches"] for h in two[0]["history"]] == [h["batches"] for h in one[0]["history"]] == [13, 13]
    for a, b in zip(two[0]["history"], one[0]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0)
    init = torch.load(tmp_path / "two.pt", weights_only=True)  # the best model file: same format as a plain run's
    assert init["format"] == "cddrec" and set(init["model"]) == set(_weights(tmp_path / "one.pt"))
    _close(_weights(tmp_path / "two.pt"), _weights(tmp_path / "one.pt"), 2e-6)
    # and the weights moved: 26 Adam steps at lr 1e-3 change them far more than the tolerance
    moved = torch.load(resume_path(tmp_path / "one.pt"), weights_only=True)["optimizer"]["state"]
    assert moved and all(int(v["step"]) == 26 for v in moved.values())


def test_resume_under_two_ranks_continues_exactly_also_with_another_process_count(tmp_path, tiny_data):
    full = run_job(_train, 2, tiny_data, tmp_path / "full.pt", batch_size=8, epochs=3, **EXACT)[0]
    # one epoch, then a budget that runs out after the first step of epoch 1, then the rest: as without a stop
    run_job(_train, 2, tiny_data, tmp_path / "part.pt", batch_size=8, epochs=1, **EXACT)
    cut = run_job(_train, 2, tiny_data, tmp_path / "part.pt", resume=True, batch_size=8, epochs=3, time_budget=1e-9,
                  **EXACT)
    assert cut[0] == cut[1] and cut[0]["history"][-1]["partial"] and cut[0]["history"][-1]["batches"] == 1
    done = run_job(_train, 2, tiny_data, tmp_path / "part.pt", resume=True, batch_size=8, epochs=3, **EXACT)[0]
    assert [h["loss"] for h in done["history"]] == [h["loss"] for h in full["history"]]
    a, b = _weights(tmp_path / "full.pt"), _weights(tmp_path / "part.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another process count with the same global batch continues at the same global position
    run_job(_train, 2, tiny_data, tmp_path / "n.pt", batch_size=8, epochs=1, time_budget=1e-9, **EXACT)
    other = run_job(_train, 1, tiny_data, tmp_path / "n.pt", resume=True, batch_size=16, epochs=3, **EXACT)[0]
    assert [h["batches"] for h in other["history"]] == [13, 13, 13]
    for x, y in zip(other["history"], full["history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    _close(_weights(tmp_path / "n.pt"), a, 1e-5)
    # a plain one-process resume of the torchrun job's file draws as a torchrun job does
    lines = []
    plain = train(*tiny_configs(batch_size=16, epochs=4, **EXACT), tiny_data, tmp_path / "n.pt", resume=True,
                  progress=False, log=lines.append)
    assert "per-epoch streams" in lines[0] and [h["batches"] for h in plain["history"]] == [13] * 4
    # and a torchrun job continues a plain run's file (its partial epoch's order included)
    train(*tiny_configs(batch_size=16, epochs=1, time_budget=1e-9, **EXACT), tiny_data, tmp_path / "p.pt", **QUIET)
    job = run_job(_train, 2, tiny_data, tmp_path / "p.pt", resume=True, batch_size=8, epochs=2, **EXACT)[0]
    assert [h["batches"] for h in job["history"]] == [13, 13] and not job["history"][0].get("partial")


def _refused(rank, data, out, **overrides):
    from cddrec.errors import CheckpointError

    try:
        _train(rank, data, out, resume=True, **overrides)
    except CheckpointError as e:
        return str(e)
    except SystemExit as e:
        return f"exit {e.code}"
    return None


def test_resume_refuses_another_global_batch_and_says_the_per_process_batch(tmp_path, tiny_data):
    run_job(_train, 2, tiny_data, tmp_path / "m.pt", batch_size=8, epochs=1, **EXACT)
    msg = run_job(_refused, 2, tiny_data, tmp_path / "m.pt", batch_size=16, epochs=2, **EXACT)
    assert msg[1] == "exit 1"  # rank 0 raises it; the others end quietly
    assert "global batch (16 saved, 32 now = --batch-size 16 x 2 processes): with 2 processes give --batch-size 8" \
        in msg[0] and "\n" not in msg[0]



def _cli(rank, args_by_rank, patch=None):
    """``cddrec-train`` as rank ``rank`` of a torchrun job: its exit status and output; ``patch(rank)`` first."""
    from cddrec.app.train import main as train_main

    if patch is not None:
        patch(rank)
    r = CliRunner().invoke(train_main, [str(a) for a in args_by_rank[rank]])
    return r.exit_code, r.output


def _tiny_args(data, out, *extra):
    return [data, "-o", out, "--hidden-size", "16", "--num-heads", "2", "--max-len", "8", "--steps", "2",
            "--batch-size", "8", "--epochs", "2", "--threads", "1", "--device", "cpu", "--dist-timeout", "1", *extra]


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_a_rank_with_other_data_is_refused_in_one_line_naming_it(tmp_path, tiny_data_file):
    from cddrec.synthetic import make_synthetic, write_sequence_file

    other = tmp_path / "other.txt"
    write_sequence_file(make_synthetic(num_users=160, num_items=50, num_clusters=5, min_len=5, max_len=14, seed=4), other)
    out = tmp_path / "m.pt"
    res = run_job(_cli, 2, [_tiny_args(tiny_data_file, out), _tiny_args(other, out)])
    (code0, out0), (code1, out1) = res
    assert code0 == code1 == 1
    assert _errors(out0) == [_errors(out0)[0]] and "rank 1 of 2 loaded other data than rank 0" in out0, out0
    assert "Traceback" not in out0 + out1 and not _errors(out1), out1  # rank 0 says it, once
    assert not out.exists()


def _fail_rank_1_at_step_3(rank):
    import cddrec.training as training

    real, calls = training.objective, {"n": 0}

    def objective(*args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    training.objective = objective


def test_a_failing_rank_takes_the_job_down_with_one_line_per_rank(tmp_path, tiny_data_file):
    args = _tiny_args(tiny_data_file, tmp_path / "m.pt")
    (code0, out0), (code1, out1) = run_job(_cli, 2, [args, args], patch=_fail_rank_1_at_step_3, timeout=50)
    assert code0 == code1 == 1
    assert _errors(out1) == [_errors(out1)[0]] and "rank 1 of 2 (" in out1 and "out of memory (simulated)" in out1, out1
    assert len(_errors(out0)) == 1 and "rank 0 of 2 (" in out0 and "another rank stopped" in out0, out0
    assert "Traceback" not in out0 + out1


def _nan_on_rank_1_from_step(rank, step):
    import cddrec.training as training

    real, calls = training.objective, {"n": 0}

    def objective(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        if rank == 1 and calls["n"] > step:
            return loss * float("nan"), {**parts, "loss": float("nan")}
        return loss, parts

    training.objective = objective


def _train_patched(rank, patch, data, out, **overrides):
    patch(rank)
    return _train(rank, data, out, **overrides)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_the_step(tmp_path, tiny_data):
    import functools

    n = 13  # steps per epoch
    s = run_job(_train_patched, 2, functools.partial(_nan_on_rank_1_from_step, step=n + 4), tiny_data,
                tmp_path / "m.pt", batch_size=8, epochs=3, **EXACT)
    assert s[0] == s[1] and s[0]["stop_reason"].startswith("diverged (loss nan at epoch 1 batch 4)")
    assert s[0]["epochs_run"] == 1  # nothing of epoch 1 is recorded; the files keep epoch 0
    state = torch.load(resume_path(tmp_path / "m.pt"), weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())


def _late_on_rank_1_after(rank, step):
    import cddrec.training as training

    calls = {"n": 0}
    real = training.StopPolicy.out_of_time

    def out_of_time(self):
        calls["n"] += 1
        return rank == 1 and calls["n"] >= step or real(self)

    training.StopPolicy.out_of_time = out_of_time


def test_the_time_budget_of_one_rank_stops_every_rank_after_the_same_step(tmp_path, tiny_data):
    import functools

    s = run_job(_train_patched, 2, functools.partial(_late_on_rank_1_after, step=5), tiny_data, tmp_path / "m.pt",
                batch_size=8, epochs=2, time_budget=60.0, **EXACT)
    assert s[0] == s[1] and "inside epoch 0" in s[0]["stop_reason"]
    assert s[0]["history"][-1] == {**s[0]["history"][-1], "partial": True, "batches": 5}


def test_torchrun_trains_a_model_that_eval_export_and_infer_accept(tmp_path, tiny_data, tiny_data_file):
    """The real torchrun, 2 processes on gloo, 2 epochs: one log (rank 0's), one model file of the usual format."""
    import json

    from cddrec.app.evaluate import main as eval_main
    from cddrec.app.export import main as export_main
    from cddrec.app.infer import main as infer_main

    model, graph = tmp_path / "model.pt", tmp_path / "model.onnx"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "cddrec.app.train", *map(str, _tiny_args(tiny_data_file, model, "--quiet"))]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("global batch 16 = 8 per process x 2") == 1 and r.stdout.count("wrote ") == 1, r.stderr
    assert [line.split("|")[0].strip() for line in r.stderr.splitlines() if line.startswith("epoch")] == \
        ["epoch   0", "epoch   1"]
    ckpt = read_checkpoint(model)
    assert ckpt["format_version"] == 2 and ckpt["train_config"]["batch_size"] == 8 and len(ckpt["history"]) == 2
    load_checkpoint(model)
    runner = CliRunner()
    r = runner.invoke(eval_main, [str(model), str(tiny_data_file), "--json"])
    assert r.exit_code == 0 and json.loads(r.output[r.output.index("{"):])["R@10"] >= 0, r.output
    r = runner.invoke(export_main, [str(model), "-o", str(graph), "--k", "5"])
    assert r.exit_code == 0 and "validated against PyTorch" in r.output, r.output
    req = tmp_path / "req.jsonl"
    users = list(zip(tiny_data.users, tiny_data.sequences))[:10]
    req.write_text("".join(json.dumps({"user": u, "history": tiny_data.items.decode(s[:-1].tolist())}) + "\n"
                           for u, s in users))
    r = runner.invoke(infer_main, ["--model", str(graph), "--batch", str(req), "-o", str(tmp_path / "recs.jsonl"),
                                   "--quiet"])
    assert r.exit_code == 0 and "served 10 users" in r.output, r.output
