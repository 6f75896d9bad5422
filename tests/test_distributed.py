"""Training under torchrun: DistributedDataParallel on gloo with 2 processes on tiny data.

Most tests run a job's ranks as processes forked from the test (torch.multiprocessing, fork: no
interpreter start-up), each with the environment torchrun gives its workers, through the same
``cddrec.distributed.launch`` and ``train`` (or the whole ``cddrec-train`` command) torchrun runs;
one test runs the real ``torchrun`` and the model it writes through cddrec-eval, -export and -infer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from cddrec.checkpoint import load_checkpoint, read_checkpoint
from cddrec.distributed import launch
from cddrec.training import resume_path, train
from conftest import tiny_configs

QUIET = {"progress": False, "log": lambda m: None}
EXACT = dict(dropout=0.0, attn_dropout=0.0, lam=0.0, loss="ce", patience=10)  # no randomness but the shuffle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    queue, port = ctx.Queue(), _free_port()
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
