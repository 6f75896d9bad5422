"""Training: Adam, validation each epoch, early stopping, checkpoints, resume.

``out`` (model.pt) always holds the best model so far (by ``config.valid_metric`` on the
validation split); ``out.resume.pt`` holds the last epoch's weights, optimizer and random
states so ``--resume`` continues exactly where training stopped.
"""

from __future__ import annotations

import math
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
from .errors import CheckpointError, ConfigError, NonFiniteError
from .evaluation import evaluate
from .losses import objective
from .model import CDDRec


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
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
          progress: bool = True, progress_every: float = 0.0, log: Callable[[str], None] = print) -> dict:
    """Train on ``data`` and write the best model to ``out``. Returns a summary dict.

    ``progress``: a tqdm bar per epoch (a terminal); ``progress_every`` > 0: a progress line through
    ``log`` every that many seconds (logs, CI, nohup), so a long epoch is not silent.

    Divergence policy: a non-finite training loss stops training before that step is applied, and a
    non-finite validation score or weight stops it before anything is saved; ``out`` keeps the last
    finite best model and ``out.resume.pt`` the last finite epoch (the summary's ``stop_reason``
    starts with "diverged"). If no finite model was ever saved, ``NonFiniteError`` is raised.

    ``time_budget`` limits the training time of this call. A budget stop inside an epoch records the
    epoch as partial (its batches done); ``--resume`` continues that epoch's remaining batches with
    the same permutation and random state, so the result equals an uninterrupted run.
    """
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
    partial: dict | None = None  # an epoch a time budget interrupted: order, batches done, loss so far

    rpath = resume_path(out)
    if resume:
        state = _load_resume(rpath, cfg, meta_data["fingerprint"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        best, best_epoch = state["best"], state["best_epoch"]
        bad_epochs, history, best_valid = state["bad_epochs"], state["history"], state["best_valid"]
        train_seconds = state["train_seconds"]
        batches.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        partial = state.get("partial")
        start_epoch = state["epoch"] if partial else state["epoch"] + 1
        where = f"epoch {start_epoch}" + (f" batch {partial['batches']}" if partial else "")
        log(f"resumed from {rpath} at {where} (best {cfg.valid_metric} {best:.4f})")

    log(f"training on {device}: {data.stats()} | {len(batches.windows)} windows, "
        f"{batches.num_targets} targets, {len(batches)} batches/epoch, {model.num_parameters():,} parameters | "
        f"ranking loss at {'the last step' if cfg.rank_last_only else 'every step'} (rank_steps {cfg.rank_steps})")
    budget = cfg.time_budget * 60.0
    session_t0 = time.perf_counter()
    stop_reason = "epochs"
    n_total = len(batches)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = last_line = time.perf_counter()
        done0 = partial["batches"] if partial else 0
        loss_sum = partial["loss_sum"] if partial else 0.0
        prior_seconds = partial["seconds"] if partial else 0.0
        it = batches.epoch(order=partial["order"].numpy() if partial else None, start=done0)
        if partial and history and history[-1].get("partial"):
            history.pop()  # the interrupted epoch's row is replaced by the whole epoch's
        partial = None
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True,
                      initial=done0, total=n_total)
        n_batches, out_of_time, diverged = done0, False, None
        for batch in it:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss, parts = objective(model, batch)
            if not math.isfinite(parts["loss"]):
                diverged = f"loss {parts['loss']} at epoch {epoch} batch {n_batches}"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += parts["loss"]
            n_batches += 1
            now = time.perf_counter()
            if progress:
                it.set_postfix(loss=f"{parts['loss']:.3f}")
            elif progress_every and now - last_line >= progress_every:
                rate = (n_batches - done0) / (now - t0)
                log(f"epoch {epoch} | batch {n_batches}/{n_total} | loss {loss_sum / n_batches:.4f} | "
                    f"{rate:.2f} batches/s | ETA {(n_total - n_batches) / rate:.0f}s")
                last_line = now
            if budget and now - session_t0 > budget and n_batches < n_total:
                out_of_time = True
                break
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        if diverged is None and not _finite_weights(model):
            diverged = f"non-finite weights after epoch {epoch}"
        if diverged is None:
            try:
                m = evaluate(model, valid, batch_size=cfg.eval_batch_size).metrics
            except NonFiniteError:
                m = None
            if m is None or not math.isfinite(m[cfg.valid_metric]):
                diverged = f"non-finite validation scores after epoch {epoch}"
        if diverged is not None:
            stop_reason = (f"diverged ({diverged}); nothing of this epoch was saved, {out} keeps the best finite "
                           f"model (epoch {best_epoch}); try a smaller --lr")
            if best_epoch < 0:
                raise NonFiniteError(f"training diverged ({diverged}) before any finite model was saved; "
                                     "nothing written: try a smaller --lr")
            break
        score = m[cfg.valid_metric]
        row = {"epoch": epoch, "loss": loss_sum / max(n_batches, 1), "seconds": round(prior_seconds + epoch_seconds, 2),
               "batches": n_batches, **{k: round(v, 5) for k, v in m.items() if k != "users"}}
        if out_of_time:
            row["partial"] = True
            partial = {"order": torch.from_numpy(batches.order), "batches": n_batches, "loss_sum": loss_sum,
                       "seconds": prior_seconds + epoch_seconds}
        history.append(row)
        improved = score > best
        if improved:
            best, best_epoch, best_valid = score, epoch, dict(m)
            if not out_of_time:
                bad_epochs = 0
            save_checkpoint(out, model, data.items, popularity, best_valid=best_valid, best_epoch=epoch,
                            data=meta_data, history=history, split="valid")
        elif not out_of_time:  # a partial epoch does not count against patience
            bad_epochs += 1
        tag = f" (partial: {n_batches}/{n_total} batches)" if out_of_time else ""
        log(f"epoch {epoch:3d} | loss {row['loss']:.4f} | {epoch_seconds:6.1f}s | valid R@10 {m['R@10']:.4f} "
            f"N@10 {m['N@10']:.4f} MRR {m['MRR']:.4f}{' *' if improved else ''}{tag}")
        _save_resume(rpath, model, opt, epoch, best, best_epoch, bad_epochs, history, best_valid,
                     train_seconds, batches, cfg, meta_data["fingerprint"], partial)
        if out_of_time:
            stop_reason = f"time budget ({cfg.time_budget:g} min) inside epoch {epoch}; --resume continues it"
            break
        if budget and time.perf_counter() - session_t0 > budget:
            stop_reason = f"time budget ({cfg.time_budget:g} min)"
            break
        if bad_epochs >= cfg.patience:
            stop_reason = f"early stopping (no {cfg.valid_metric} gain for {cfg.patience} epochs)"
            break
    log(f"stopped: {stop_reason}; best epoch {best_epoch} valid {cfg.valid_metric} {best:.4f}")
    return {"best_epoch": best_epoch, "best_valid": best_valid, "epochs_run": len(history),
            "train_seconds": round(train_seconds, 1), "stop_reason": stop_reason, "history": history,
            "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2) if history else None}


def _finite_weights(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _save_resume(path: Path, model, opt, epoch, best, best_epoch, bad_epochs, history, best_valid,
                 train_seconds, batches, cfg, fingerprint, partial=None) -> None:
    state = {"config": asdict(cfg), "model": {k: v.cpu() for k, v in model.state_dict().items()},
             "optimizer": opt.state_dict(), "epoch": epoch, "best": best, "best_epoch": best_epoch,
             "bad_epochs": bad_epochs, "history": history, "best_valid": best_valid,
             "train_seconds": train_seconds, "numpy_rng": batches.rng.bit_generator.state,
             "torch_rng": torch.get_rng_state(), "fingerprint": fingerprint, "partial": partial}
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
