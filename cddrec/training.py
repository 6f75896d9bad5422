"""Training: Adam, validation each epoch, early stopping, checkpoints, resume.

``out`` (model.pt) always holds the best model so far (by ``config.valid_metric`` on the
validation split); ``out.resume.pt`` holds the last epoch's weights, optimizer and random
states so ``--resume`` continues exactly where training stopped.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .batches import TrainBatches
from .checkpoint import UNREADABLE, save_checkpoint, save_torch
from .config import CDDRecConfig
from .data import SequenceData, eval_split
from .errors import CheckpointError
from .evaluation import evaluate
from .losses import objective
from .model import CDDRec


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int) -> None:
    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))


def resume_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".resume.pt")


def train(cfg: CDDRecConfig, data: SequenceData, out: str | Path, *, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train on ``data`` and write the best model to ``out``. Returns a summary dict."""
    cfg = cfg.replace(num_items=data.num_items)
    set_seed(cfg.seed)
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    batches = TrainBatches(data, cfg.max_len, cfg.batch_size, seed=cfg.seed)
    valid = eval_split(data, "valid", cfg.max_len)
    model = CDDRec(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    popularity = torch.from_numpy(data.popularity("train"))
    meta_data = {"fingerprint": data.fingerprint(), "source": data.source, "stats": data.stats()}
    history: list[dict] = []
    start_epoch, best, best_epoch, bad_epochs, train_seconds = 0, -1.0, -1, 0, 0.0
    best_valid: dict = {}

    rpath = resume_path(out)
    if resume:
        state = _load_resume(rpath, cfg, meta_data["fingerprint"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        bad_epochs, history, best_valid = state["bad_epochs"], state["history"], state["best_valid"]
        train_seconds = state["train_seconds"]
        batches.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        log(f"resumed from {rpath} at epoch {start_epoch} (best {cfg.valid_metric} {best:.4f})")

    log(f"training on {device}: {data.stats()} | {len(batches.windows)} windows, "
        f"{batches.num_targets} targets, {len(batches)} batches/epoch, {model.num_parameters():,} parameters")
    budget = cfg.time_budget * 60.0
    stop_reason = "epochs"
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        it = batches
        if progress:
            from tqdm import tqdm

            it = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True)
        loss_sum, n_batches, out_of_time = 0.0, 0, False
        for batch in it:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss, parts = objective(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += parts["loss"]
            n_batches += 1
            if progress:
                it.set_postfix(loss=f"{parts['loss']:.3f}")
            if budget and train_seconds + (time.perf_counter() - t0) > budget:
                out_of_time = True
                break
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        res = evaluate(model, valid, batch_size=cfg.eval_batch_size)
        m = res.metrics
        score = m[cfg.valid_metric]
        row = {"epoch": epoch, "loss": loss_sum / max(n_batches, 1), "seconds": round(epoch_seconds, 2),
               "batches": n_batches, **{k: round(v, 5) for k, v in m.items() if k != "users"}}
        history.append(row)
        improved = score > best
        if improved:
            best, best_epoch, bad_epochs, best_valid = score, epoch, 0, dict(m)
            save_checkpoint(out, model, data.items, popularity, best_valid=best_valid, best_epoch=epoch,
                            data=meta_data, history=history, split="valid")
        else:
            bad_epochs += 1
        log(f"epoch {epoch:3d} | loss {row['loss']:.4f} | {epoch_seconds:6.1f}s | valid R@10 {m['R@10']:.4f} "
            f"N@10 {m['N@10']:.4f} MRR {m['MRR']:.4f}{' *' if improved else ''}")
        _save_resume(rpath, model, opt, epoch, best, best_epoch, bad_epochs, history, best_valid,
                     train_seconds, batches, cfg, meta_data["fingerprint"])
        if out_of_time:
            stop_reason = f"time budget ({cfg.time_budget:g} min)"
            break
        if bad_epochs >= cfg.patience:
            stop_reason = f"early stopping (no {cfg.valid_metric} gain for {cfg.patience} epochs)"
            break
    log(f"stopped: {stop_reason}; best epoch {best_epoch} valid {cfg.valid_metric} {best:.4f}")
    return {"best_epoch": best_epoch, "best_valid": best_valid, "epochs_run": len(history),
            "train_seconds": round(train_seconds, 1), "stop_reason": stop_reason, "history": history,
            "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2) if history else None}


def _save_resume(path: Path, model, opt, epoch, best, best_epoch, bad_epochs, history, best_valid,
                 train_seconds, batches, cfg, fingerprint) -> None:
    state = {"config": asdict(cfg), "model": {k: v.cpu() for k, v in model.state_dict().items()},
             "optimizer": opt.state_dict(), "epoch": epoch, "best": best, "best_epoch": best_epoch,
             "bad_epochs": bad_epochs, "history": history, "best_valid": best_valid,
             "train_seconds": train_seconds, "numpy_rng": batches.rng.bit_generator.state,
             "torch_rng": torch.get_rng_state(), "fingerprint": fingerprint}
    save_torch(path, state)


def _load_resume(path: Path, cfg: CDDRecConfig, fingerprint: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: no resume state (train without --resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as e:
        raise CheckpointError(f"{path}: unreadable resume state: {str(e).splitlines()[0][:200]}") from e
    saved = dict(state["config"])
    now = asdict(cfg)
    for k in ("epochs", "patience", "time_budget", "device", "num_threads", "extra", "eval_batch_size"):
        saved.pop(k, None)
        now.pop(k, None)
    diff = sorted(k for k in now if saved.get(k) != now[k])
    if diff:
        raise CheckpointError(f"{path}: resume state was trained with other settings: {', '.join(diff)}")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: resume state was trained on other data (fingerprint differs)")
    return state
