"""Training: Adam, validation each epoch, early stopping, checkpoints, resume.

``out`` (model.pt) always holds the best model so far (by ``TrainConfig.valid_metric`` on the
validation split); ``out.resume.pt`` holds the last epoch's weights, optimizer and random states so
``--resume`` continues exactly where training stopped.

The pieces, each replaceable on its own:

- ``Trainer``: the setup (``__init__``), ``resume``, the epoch loop (``fit``), one epoch
  (``train_epoch``, whose optimiser update is ``step``), the end of an epoch (``end_epoch``:
  ``validate``, ``record`` and the two writes ``save_best``, ``save_resume``).
- ``TrainState``: what a resumed run continues from (saved in the resume file).
- ``StopPolicy``: the divergence, early-stopping and time-budget decisions, one per epoch.

Under torchrun (``dist``, a ``cddrec.distributed.Dist`` with a process group) every rank trains its
interleaved share of each global batch (``batches.Shard``) through DistributedDataParallel; rank 0
alone runs ``end_epoch`` (validation, the stop decision, the files, the log) and broadcasts the
decision; a non-finite loss or the time budget on any rank stops all ranks at the same step
(``Dist.step_flags``). The model file is the same as a plain run's.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .batches import Shard, TrainBatches
from .checkpoint import UNREADABLE, save_checkpoint, save_torch
from .config import ModelConfig, RunConfig, TrainConfig, from_flat
from .data import SequenceData, eval_split
from .distributed import Dist
from .errors import CheckpointError, ConfigError, NonFiniteError, first_line
from .evaluation import evaluate
from .losses import objective
from .model import CDDRec
from .sampler import ItemProposal

RESUME_VERSION = 2  # 1 (cddrec 0.2.0): one flat "config" dict, split on reading


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


def auto_threads() -> tuple[int, str]:
    """Threads for ``threads: 0`` (auto), and how they were chosen: the cores this process may run on
    (CPU affinity) minus the cores already busy (the 1-minute load average, rounded), at least 1.

    Every core on a machine that other processes keep busy oversubscribes it: a training run measured
    0.2 batches/s on all cores against 0.9 on one core under the same load (issue 19). The load
    average is the machine's (a container sees its host's), and a process that has just been
    computing counts itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return cores, f"auto: {cores} cores"
    busy = min(cores, int(load + 0.5))
    return max(1, cores - busy), f"auto: {cores} cores, {busy} busy (1-minute load {load:.2f})"


def set_threads(n: int, processes: int = 1) -> tuple[int, str]:
    """Set torch's CPU threads to ``n`` (0: ``auto_threads`` shared by this machine's ``processes`` of a
    torchrun job); returns the number and how it was chosen."""
    if n > 0:
        n, how = n, "--threads"
    else:
        n, how = auto_threads()
        if processes > 1:
            n, how = max(1, n // processes), f"{how}, shared by {processes} processes"
    torch.set_num_threads(n)
    return n, how


def resume_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".resume.pt")


@dataclass
class TrainState:
    """What a resumed run continues from (saved in the resume file, with the weights and random states)."""

    epoch: int = -1  # the last epoch run: complete, or partial when ``partial`` is set
    best: float = -1.0  # best validation score so far
    best_epoch: int = -1
    bad_epochs: int = 0  # complete epochs since the last improvement
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_valid: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    partial: dict | None = None  # an epoch a time budget interrupted: order, batches done, loss so far, seconds

    @property
    def next_epoch(self) -> int:
        return self.epoch if self.partial else self.epoch + 1


@dataclass
class EpochResult:
    """One call's share of an epoch: the batches it ran, and why it ended early if it did."""

    epoch: int
    batches: int = 0  # done in this epoch, including those before a resume
    loss_sum: float = 0.0
    prior_seconds: float = 0.0  # seconds of this epoch before a resume
    seconds: float = 0.0  # seconds of this call
    out_of_time: bool = False
    diverged: str | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.batches, 1)


@dataclass
class StopPolicy:
    """When training stops: a non-finite loss, score or weight (divergence), ``patience`` epochs without
    a gain in ``metric``, the time budget (minutes, 0 = none), or the epoch limit (the default reason).

    The decisions are made once per epoch, so a multi-process run can make them on one rank and
    broadcast the reason."""

    metric: str
    patience: int
    budget_minutes: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        self.started = time.perf_counter()

    def out_of_time(self) -> bool:
        return bool(self.budget_minutes) and time.perf_counter() - self.started > self.budget_minutes * 60.0

    def observe(self, state: TrainState, epoch: int, metrics: dict, partial: bool) -> bool:
        """Record an epoch's validation ``metrics``; True when it improved on the best. A partial epoch
        (cut by the time budget) does not count against patience."""
        improved = metrics[self.metric] > state.best
        if improved:
            state.best, state.best_epoch, state.best_valid = metrics[self.metric], epoch, dict(metrics)
            if not partial:
                state.bad_epochs = 0
        elif not partial:
            state.bad_epochs += 1
        return improved

    def diverged(self, state: TrainState, what: str, out: str | Path) -> str:
        """The stop reason of a diverged epoch (nothing of it is saved); ``NonFiniteError`` when no finite
        model was ever saved."""
        if state.best_epoch < 0:
            raise NonFiniteError(f"training diverged ({what}) before any finite model was saved; "
                                 "nothing written: try a smaller --lr")
        return (f"diverged ({what}); nothing of this epoch was saved, {out} keeps the best finite model "
                f"(epoch {state.best_epoch}); try a smaller --lr")

    def after_epoch(self, state: TrainState, epoch: int, partial: bool) -> str | None:
        """The reason to stop after a recorded epoch, or None to go on."""
        if partial:
            return f"time budget ({self.budget_minutes:g} min) inside epoch {epoch}; --resume continues it"
        if self.out_of_time():
            return f"time budget ({self.budget_minutes:g} min)"
        if state.bad_epochs >= self.patience:
            return f"early stopping (no {self.metric} gain for {self.patience} epochs)"
        return None


class ObjectiveModule(torch.nn.Module):
    """The training objective as a module, for DistributedDataParallel: its forward must run the model
    for DDP to synchronise the gradients in backward (the objective calls the model's parts directly)."""

    def __init__(self, model: CDDRec, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, torch.Tensor], shares: tuple[float, float] | None):
        return objective(self.model, batch, self.cfg, shares)


class Trainer:
    """Trains a CDDRec on ``data`` and writes the best model to ``out`` (see the module docstring).

    ``progress``: a tqdm bar per epoch (a terminal); ``progress_every`` > 0: a progress line through
    ``log`` every that many seconds (logs, CI, nohup), so a long epoch is not silent. ``dist``: this
    process's place in a torchrun job (``cddrec.distributed.launch``); None: a plain run. Only rank 0
    logs, shows progress and writes files.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, run_cfg: RunConfig, data: SequenceData,
                 out: str | Path, *, progress: bool = True, progress_every: float = 0.0,
                 log: Callable[[str], None] = print, dist: Dist | None = None):
        self.dist = dist = dist or Dist()
        self.model_cfg = model_cfg.replace(num_items=data.num_items)
        self.train_cfg, self.run_cfg = train_cfg, run_cfg
        self.data, self.out = data, out
        self.log = log if dist.main else _silent
        self.progress, self.progress_every = progress and dist.main, progress_every if dist.main else 0.0
        set_seed(train_cfg.seed)
        self.threads, self.threads_how = set_threads(run_cfg.threads, dist.local_world)
        self.device = dist.device if dist.group else resolve_device(run_cfg.device)
        self.popularity = torch.from_numpy(data.popularity("train"))
        self.loss, self.loss_why = train_cfg.resolve_loss(self.model_cfg)
        proposal = (ItemProposal(self.popularity.numpy(), train_cfg.negatives, train_cfg.negative_sampling)
                    if self.loss == "sampled" else None)
        self.batches = TrainBatches(data, self.model_cfg.max_len, train_cfg.batch_size, seed=train_cfg.seed,
                                    shard=Shard(dist.rank, dist.world) if dist.group else None, proposal=proposal)
        self.valid = eval_split(data, "valid", self.model_cfg.max_len) if dist.main else None
        self.model = CDDRec(self.model_cfg).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        self.data_meta = {"fingerprint": data.fingerprint(), "source": data.source, "stats": data.stats()}
        dist.check_same("data", self.data_meta["fingerprint"],
                        ": every process must read the same file with the same options (k-core, columns)")
        self.state = TrainState()
        self.stop = StopPolicy(train_cfg.valid_metric, run_cfg.patience, run_cfg.time_budget)
        self.net: torch.nn.Module | None = None  # the objective in DistributedDataParallel, built by fit

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train from ``state.next_epoch`` until the stop policy or the epoch limit says stop; the summary
        (rank 0's, on every rank)."""
        self.log(self.start_line())
        if self.dist.group:
            self.net = self.dist.wrap(ObjectiveModule(self.model, self.train_cfg))
        self.stop.start()
        reason = None
        for epoch in range(self.state.next_epoch, self.run_cfg.epochs):
            result = self.train_epoch(epoch)
            reason = self.dist.on_main(self.end_epoch, result)
            if reason is not None:
                break
        reason = reason or "epochs"
        return self.dist.on_main(self.summary, reason)

    def end_epoch(self, result: EpochResult) -> str | None:
        """After an epoch (on rank 0): validate, record, write the files and log; the reason to stop, or None."""
        metrics = self.validate(result)
        if result.diverged is not None:
            return self.stop.diverged(self.state, result.diverged, self.out)
        improved = self.record(result, metrics)
        if improved:
            self.save_best()
        tag = f" (partial: {result.batches}/{len(self.batches)} batches)" if result.out_of_time else ""
        self.log(f"epoch {result.epoch:3d} | loss {result.loss:.4f} | {result.seconds:6.1f}s | valid R@10 "
                 f"{metrics['R@10']:.4f} N@10 {metrics['N@10']:.4f} MRR {metrics['MRR']:.4f}"
                 f"{' *' if improved else ''}{tag}")
        self.save_resume()
        return self.stop.after_epoch(self.state, result.epoch, result.out_of_time)

    def summary(self, reason: str) -> dict:
        s = self.state
        self.log(f"stopped: {reason}; best epoch {s.best_epoch} valid {self.train_cfg.valid_metric} {s.best:.4f}")
        return {"best_epoch": s.best_epoch, "best_valid": s.best_valid, "epochs_run": len(s.history),
                "train_seconds": round(s.train_seconds, 1), "stop_reason": reason, "history": s.history,
                "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in s.history])), 2) if s.history else None,
                "threads": self.threads, "processes": self.dist.world, "global_batch": self.batches.global_batch}

    def start_line(self) -> str:
        b, d = self.batches, self.dist
        rank = "the last step" if self.train_cfg.rank_last_only(self.model_cfg) else "every step"
        line = (f"training on {self.device} with {self.threads} CPU thread{'s' if self.threads > 1 else ''} "
                f"({self.threads_how}): {self.data.stats()} | {len(b.windows)} windows, {b.num_targets} targets, "
                f"{len(b)} batches/epoch, {self.model.num_parameters():,} parameters | objective: "
                f"{self.objective_words()} ({self.loss_why}) | ranking loss at {rank} (rank_steps "
                f"{self.train_cfg.rank_steps})")
        if d.group:
            line += (f" | torchrun: {d.describe()}, global batch {b.global_batch} = {b.batch_size} per process x "
                     f"{d.world}; rank 0 validates and writes")
        return line

    def objective_words(self) -> str:
        cfg = self.train_cfg
        if self.loss == "sampled":
            return (f"sampled softmax over {cfg.negatives:,} {cfg.negative_sampling}-sampled negatives per batch, "
                    "logQ-corrected")
        return {"ce": "full softmax over the catalogue (ce)", "cd": "cross-divergence (cd, Eq. 5)"}[self.loss]

    def train_epoch(self, epoch: int) -> EpochResult:
        """One epoch of optimiser steps (the rest of the partial epoch a time budget cut, when resuming one).
        It ends early on a non-finite loss (on any rank), before that step is applied, or when the time
        budget runs out (on any rank: every rank stops after the same step)."""
        self.model.train()
        partial, self.state.partial = self.state.partial, None
        r = EpochResult(epoch)
        if partial:
            r.batches, r.loss_sum, r.prior_seconds = partial["batches"], partial["loss_sum"], partial["seconds"]
            if self.state.history and self.state.history[-1].get("partial"):
                self.state.history.pop()  # the interrupted epoch's row is replaced by the whole epoch's
        done0, total = r.batches, len(self.batches)
        t0 = last_line = time.perf_counter()
        it = self.batches.epoch(order=partial["order"].numpy() if partial else None, start=done0, index=epoch)
        if self.progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True, initial=done0,
                      total=total)
        for batch in it:
            loss, value = self.forward(batch)
            value, out_of_time = self.dist.step_flags(value, r.batches + 1 < total and self.stop.out_of_time())
            if not math.isfinite(value):
                r.diverged = f"loss {value} at epoch {epoch} batch {r.batches}"
                break
            self.step(loss)
            r.loss_sum += value
            r.batches += 1
            now = time.perf_counter()
            if self.progress:
                it.set_postfix(loss=f"{value:.3f}")
            elif self.progress_every and now - last_line >= self.progress_every:
                rate = (r.batches - done0) / (now - t0)
                self.log(f"epoch {epoch} | batch {r.batches}/{total} | loss {r.loss:.4f} | {rate:.2f} batches/s | "
                         f"ETA {(total - r.batches) / rate:.0f}s")
                last_line = now
            if out_of_time:
                r.out_of_time = True
                break
        r.seconds = time.perf_counter() - t0
        self.state.train_seconds += r.seconds
        return r

    def forward(self, batch: dict) -> tuple[torch.Tensor, float]:
        """The loss of one batch (a shard's share of the global batch's mean, under torchrun) and its value.
        A shard's dropout and noise come from the batch's own seed (``batches.stream_seed``)."""
        shares, seed = batch.pop("shares", None), batch.pop("torch_seed", None)
        if seed is not None:
            torch.manual_seed(seed)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.net is not None:
            loss, parts = self.net(batch, shares)
        else:
            loss, parts = objective(self.model, batch, self.train_cfg, shares)
        return loss, parts["loss"]

    def step(self, loss: torch.Tensor) -> None:
        """One optimiser update from a batch's loss (gradients averaged over the ranks by DDP in backward)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def validate(self, result: EpochResult) -> dict | None:
        """Validation metrics after an epoch, or None with ``result.diverged`` set when the weights or the
        validation scores are not finite (or the epoch already diverged)."""
        if result.diverged is None and not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            result.diverged = f"non-finite weights after epoch {result.epoch}"
        if result.diverged is not None:
            return None
        try:
            metrics = evaluate(self.model, self.valid, batch_size=self.run_cfg.eval_batch_size).metrics
        except NonFiniteError:
            metrics = None
        if metrics is None or not math.isfinite(metrics[self.train_cfg.valid_metric]):
            result.diverged = f"non-finite validation scores after epoch {result.epoch}"
            return None
        return metrics

    def record(self, r: EpochResult, metrics: dict) -> bool:
        """Add the epoch's row to the history (and the partial epoch to resume, if cut); True if it improved."""
        s = self.state
        row = {"epoch": r.epoch, "loss": r.loss, "seconds": round(r.prior_seconds + r.seconds, 2),
               "batches": r.batches, **{k: round(v, 5) for k, v in metrics.items() if k != "users"}}
        if r.out_of_time:
            row["partial"] = True
            s.partial = {"order": torch.from_numpy(self.batches.order), "batches": r.batches, "loss_sum": r.loss_sum,
                         "seconds": r.prior_seconds + r.seconds}
        s.epoch = r.epoch
        s.history.append(row)
        return self.stop.observe(s, r.epoch, metrics, r.out_of_time)

    # ------------------------------------------------------------------ files
    def save_best(self) -> None:
        """Write the model file (``out``): the best model so far."""
        s = self.state
        save_checkpoint(self.out, self.model, self.data.items, self.popularity, self.train_cfg, self.run_cfg,
                        best_valid=s.best_valid, best_epoch=s.best_epoch, data=self.data_meta, history=s.history,
                        split="valid")

    def save_resume(self) -> None:
        """Write the resume file: the last epoch's weights, optimizer, random states and ``TrainState``.

        ``streams`` says how batches are drawn: "run" (one stream, its state saved here) or "epoch"
        (streams seeded by seed, epoch, rank and batch: nothing to save, any process count resumes)."""
        state = {"format_version": RESUME_VERSION, "model_config": self.model_cfg.to_dict(),
                 "train_config": self.train_cfg.to_dict(), "run_config": self.run_cfg.to_dict(),
                 "fingerprint": self.data_meta["fingerprint"],
                 "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                 "optimizer": self.opt.state_dict(), "numpy_rng": self.batches.rng.bit_generator.state,
                 "torch_rng": torch.get_rng_state(), "streams": "epoch" if self.batches.shard else "run",
                 "global_batch": self.batches.global_batch, "processes": self.dist.world, **asdict(self.state)}
        save_torch(resume_path(self.out), state)

    def resume(self) -> None:
        """Continue from the resume file: the same model and train configs (the global batch, not the
        per-process one) and data, or a one-line error. Rank 0 reads and checks it; every rank loads it."""
        saved = self.dist.on_main(self.read_checked_resume)
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.state = TrainState(**{f.name: saved.get(f.name) for f in fields(TrainState)})
        s, path = self.state, resume_path(self.out)
        where = f"epoch {s.next_epoch}" + (f" batch {s.partial['batches']}" if s.partial else "")
        note = ""
        if saved.get("streams", "run") == "run" and self.batches.shard is None:
            self.batches.rng.bit_generator.state = saved["numpy_rng"]
            torch.set_rng_state(saved["torch_rng"])
        elif self.batches.shard is None:  # a torchrun job's file, resumed by one process: its streams
            self.batches.shard = Shard(0, 1)
            note = "; batches drawn as by a torchrun job (per-epoch streams)"
        elif saved.get("streams", "run") == "run":
            note = "; a one-process run continued by torchrun: its batches from here on come from per-epoch streams"
        self.log(f"resumed from {path} at {where} (best {self.train_cfg.valid_metric} {s.best:.4f}){note}")

    def read_checked_resume(self) -> dict:
        """The resume file's dict, checked against this run's configs, global batch and data."""
        path = resume_path(self.out)
        saved = read_resume(path)
        saved_train = TrainConfig.from_dict(saved["train_config"])
        diffs = (self.model_cfg.differences(ModelConfig.from_dict(saved["model_config"]))
                 + self.train_cfg.replace(batch_size=saved_train.batch_size).differences(saved_train))
        was, now = saved.get("global_batch", saved_train.batch_size), self.batches.global_batch
        if was != now:
            world = self.dist.world
            hint = f": with {world} process{'es' if world > 1 else ''} give --batch-size {was // world}" \
                if was % world == 0 else ""
            diffs.append(f"global batch ({was} saved, {now} now = --batch-size {self.train_cfg.batch_size} x {world} "
                         f"process{'es' if world > 1 else ''}){hint}")
        if diffs:
            raise CheckpointError(f"{path}: resume state was trained with other settings: {'; '.join(diffs)}")
        if saved.get("fingerprint") != self.data_meta["fingerprint"]:
            raise CheckpointError(f"{path}: resume state was trained on other data (fingerprint differs)")
        return saved


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def read_resume(path: Path) -> dict:
    """A resume file's dict; a version-1 file's flat ``config`` is split into the three configs."""
    if not path.exists():
        raise CheckpointError(f"{path}: no resume state (train without --resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as e:
        raise CheckpointError(f"{path}: unreadable resume state: {first_line(e, 200)}") from e
    if "config" in state:  # version 1
        try:
            model_cfg, train_cfg, run_cfg = from_flat(state.pop("config"))
        except ConfigError as e:
            raise CheckpointError(f"{path}: a version-1 resume state with an unreadable config: {e}") from None
        state.update(model_config=model_cfg.to_dict(), train_config=train_cfg.to_dict(), run_config=run_cfg.to_dict())
    return state


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, run_cfg: RunConfig, data: SequenceData, out: str | Path,
          *, resume: bool | str = False, progress: bool = True, progress_every: float = 0.0,
          log: Callable[[str], None] = print, dist: Dist | None = None) -> dict:
    """Train on ``data`` and write the best model to ``out``. Returns a summary dict.

    Divergence policy: a non-finite training loss stops training before that step is applied, and a
    non-finite validation score or weight stops it before anything is saved; ``out`` keeps the last
    finite best model and ``out.resume.pt`` the last finite epoch (the summary's ``stop_reason``
    starts with "diverged"). If no finite model was ever saved, ``NonFiniteError`` is raised.

    ``run_cfg.time_budget`` limits the training time of this call. A budget stop inside an epoch
    records the epoch as partial (its batches done); ``--resume`` continues that epoch's remaining
    batches with the same permutation and random state, so the result equals an uninterrupted run.

    ``resume``: True continues from the resume file; "auto" continues from it when it exists (rank 0's
    file, under torchrun) and starts otherwise: a command torchrun restarts (``--max-restarts``), or a
    nightly job, picks up the last recorded epoch.

    ``dist`` (``cddrec.distributed.launch``): train as one process of a torchrun job; every rank returns
    rank 0's summary.
    """
    trainer = Trainer(model_cfg, train_cfg, run_cfg, data, out, progress=progress, progress_every=progress_every,
                      log=log, dist=dist)
    if resume == "auto":
        resume = trainer.dist.on_main(resume_path(out).exists)
    if resume:
        trainer.resume()
    return trainer.fit()
