"""torch.distributed glue for training under ``torchrun`` (DistributedDataParallel).

``launch`` joins the process group of a torchrun job (its environment: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ...; gloo on the CPU, nccl on CUDA with one GPU per local rank) and yields a
``Dist``; without torchrun it yields the plain ``Dist()`` and touches nothing, so a plain run has no
process group. ``Dist`` holds the rank and the few collectives training needs, each the identity
without a group:

- ``check_same``: ranks compare a value (the data fingerprint) and refuse, naming the ranks that differ;
- ``step_flags``: one all-reduce per step of the loss and the out-of-time flag, so a non-finite loss on
  any rank stops every rank before the step is applied and a time budget stops all at the same step;
- ``on_main``: rank 0 runs a function (validation, the stop decision, the files; reading the resume
  file) and every rank gets its result, or its error (``AgreedError`` on the other ranks: rank 0
  reports it once);
- ``wrap``: ``DistributedDataParallel`` around a module.

Errors: inside ``launch`` an exception on one rank becomes one line naming the rank and host
(``RankError``); the others then fail in their next collective (a closed connection) or, if a rank
hangs, after ``timeout`` minutes, each with its own line, and torchrun stops the job.
"""

from __future__ import annotations

import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist

from .errors import CDDRecError, ConfigError, DataError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class RankError(CDDRecError):
    """An error of one process of a torchrun job; the message names the rank and host."""


class AgreedError(CDDRecError):
    """Raised on ranks other than 0 for an error rank 0 raised in ``on_main`` (and reports itself)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job; ``Dist()`` is a plain run (no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None  # gloo | nccl; None: no process group
    device: torch.device | None = None  # the rank's device (cuda:LOCAL_RANK or cpu), with a group

    @property
    def group(self) -> bool:
        return self.backend is not None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"{self.world} process{'es' if self.world > 1 else ''} ({self.backend}, "
                f"{self.local_world} on this machine)")

    # ------------------------------------------------------------------ collectives
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.group:
            return obj
        box = [obj if self.main else None]
        tdist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def check_same(self, what: str, value: str, hint: str = "") -> None:
        """Refuse (``DataError`` naming the ranks, on every rank) unless every rank has the same ``value``."""
        if not self.group:
            return
        values: list = [None] * self.world
        tdist.all_gather_object(values, value)
        other = [r for r, v in enumerate(values) if v != values[0]]
        if other:
            ranks = ", ".join(str(r) for r in other)
            error = DataError(f"rank{'s' if len(other) > 1 else ''} {ranks} of {self.world} loaded other {what} than "
                              f"rank 0 ({_short(values[other[0]])} against {_short(values[0])}){hint}")
            if not self.main:
                raise AgreedError(str(error))
            error.collective = True  # type: ignore[attr-defined]  # reported once, by rank 0
            raise error

    def step_flags(self, loss: float, out_of_time: bool) -> tuple[float, bool]:
        """The mean of the ranks' losses (NaN if any is not finite) and whether any rank is out of time:
        one all-reduce of two numbers."""
        if not self.group:
            return loss, out_of_time
        flags = torch.tensor([loss, float(out_of_time)], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(flags)
        total, late = flags.tolist()
        return total / self.world, late > 0

    def on_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on rank 0 and its result on every rank; a ``CDDRecError`` it raises is raised on
        rank 0 as it is and as ``AgreedError`` on the others."""
        if not self.group:
            return fn(*args)
        box: list = [None]
        error = None
        if self.main:
            try:
                box[0] = ("ok", fn(*args))
            except CDDRecError as e:
                box[0], error = ("error", str(e)), e
        tdist.broadcast_object_list(box, src=0, device=self._comm_device())
        kind, value = box[0]
        if error is not None:
            error.collective = True  # type: ignore[attr-defined]
            raise error
        if kind == "error":
            raise AgreedError(value)
        return value

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged over the ranks in backward), or as it is
        without a group. The diffusion buffers are constants: they are not broadcast at every step."""
        if not self.group:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        # torch >= 2.13 names it forward_sync_buffers (broadcast_buffers warns there); earlier ones broadcast_buffers
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        return DistributedDataParallel(module, device_ids=ids, **{sync: False})

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) > 12 else text


def under_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of local rank ``local_rank``: cuda:LOCAL_RANK for ``auto`` (with CUDA) or ``cuda``, else the CPU."""
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; give --device cuda "
                          "or auto (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                              "start at most that many processes per machine (--nproc-per-node)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def describe_error(e: BaseException) -> str:
    """One line: the error's type (unless a cddrec error) and its first line; a failed collective says why
    (gloo's and nccl's messages lose their source location and advice)."""
    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, CDDRecError):
        return first[:300]
    if isinstance(e, getattr(tdist, "DistError", ())) or re.search(r"gloo|nccl", str(e), re.I):
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # "[.../pair.cc:537] Read error ...: Connection
        return (f"a collective failed ({first[:200]}): another rank stopped (see its line) or the --dist-timeout "
                "passed")
    return f"{type(e).__name__}: {first[:300]}"


@contextmanager
def launch(device: str = "auto", timeout_minutes: float = 30.0) -> Iterator[Dist]:
    """The ``Dist`` of this process: a torchrun job's process group (joined here, left at the end), or
    ``Dist()`` without torchrun.

    Inside, an error on a rank becomes a ``RankError`` naming the rank and host; an error rank 0
    reports for all (``on_main``, ``check_same``) stays as it is on rank 0 and ends the other ranks
    quietly (exit status 1)."""
    if not under_torchrun():
        yield Dist()
        return
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env["LOCAL_RANK"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    where = f"rank {rank} of {world} ({socket.gethostname()})"
    try:
        dev = rank_device(device, local_rank)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    except Exception as e:  # noqa: BLE001 - every failure to join is one line naming the rank
        if rank != 0 and isinstance(e, ConfigError):  # the same on every rank: rank 0 says it
            raise SystemExit(1) from None
        raise RankError(f"{where}: could not join the torchrun job: {describe_error(e)}") from e
    try:
        yield Dist(rank, world, local_rank, local_world, backend, dev)
    except AgreedError:
        raise SystemExit(1) from None  # rank 0 reports it
    except Exception as e:  # noqa: BLE001 - one line per rank, never a traceback per rank
        if getattr(e, "collective", False):
            raise
        raise RankError(f"{where}: {describe_error(e)}") from e
    else:  # only on success: after an error the command exits at once, and tearing down a group whose
        # peers are gone or stuck in a collective can block (NCCL); the process exit releases it.
        # Every rank first waits for the others (rank 0 writes the model meanwhile): a rank that tore down
        # while its peer was still using the gloo connection aborted it ("terminate called without an
        # active exception", seen once in CI)
        tdist.barrier()
        tdist.destroy_process_group()
