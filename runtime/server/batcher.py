"""The dynamic batcher: concurrent requests queue and run together on the engine's workers.

- A request is a ``Job`` of ``size`` users; jobs of one ``kind`` (a runner: tensors or keys) run
  together, in arrival order, up to ``max_batch`` users and ``max_cells`` padded ids.
- The engine has ``instances`` workers (threads sharing one model, like Triton's instance_group
  count): a batch runs on each free worker. A job that arrives while a worker is free is
  dispatched at once (with whatever else is queued): a lone request never waits for the timeout. A
  job that arrives while every worker is busy waits; when one frees, the batch starts as soon as
  a full batch is waiting or ``max_wait`` after the first of them arrived (usually already past: the
  engine ran meanwhile).
- A full batch is ``max_batch`` users; with several workers, a fair share of the users waiting or
  running, ceil((waiting + running) / instances): under steady load the users split into even
  batches, one per worker, instead of one worker running nearly all of them while the other runs the
  stragglers one by one (on ONNX Runtime a one-user batch costs about 2.4 times a user's share of a
  batch of 16), and a freed worker waits for its share, not for ``max_batch`` users that never come.
- The engine runs off the event loop (``run_in_executor``): the loop keeps parsing, queueing and
  answering while batches run, and the queue it fills is the next batch. One exception
  (``inline_single``, for fast backends whose runs may overlap): a lone request of one user, with
  nothing else queued and every worker idle, runs on the loop's own thread, saving the two thread
  hand-offs that are much of a batch of one's overhead; the loop then yields before the next.
  After such a request the dispatcher polls (``idle_poll``): for that long, while the engine stays
  idle and nothing is queued, it turns the event loop without letting it block in the kernel, so the
  next request of a lone client is read at once by a core that is awake (on a virtual machine a core
  that went to sleep takes tens of microseconds to wake, and the engine then runs on cold caches).
- ``max_queue`` bounds the users waiting: beyond it ``submit`` answers 503 with ``Retry-After``;
  a job not answered within its timeout answers 504 (and leaves the queue if it had not started).
- A runner returns one result per job, or an exception for a job it refuses (that job alone
  fails); a runner that raises fails its batch only (500), logged once.
- ``close()`` refuses new jobs (503), runs what is queued, then stops the engine workers.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from cddrec.errors import first_line

from ..recommender import MAX_CELLS
from .protocol import ProtocolError

log = logging.getLogger("cddrec.serve")
RETRY_AFTER = "1"  # seconds: a full queue drains in a few batches


@dataclass
class BatchPolicy:
    max_batch: int = 256  # users per engine batch
    max_wait_s: float = 0.002  # how long a batch may wait for company once the engine is free
    max_queue: int = 1024  # users waiting, beyond which requests get 503
    timeout_s: float = 10.0  # per request, from arrival to answer (504)
    max_cells: int = MAX_CELLS
    instances: int = 1  # engine workers running batches at the same time
    inline_single: bool = False  # a lone one-user request on an idle engine runs on the loop's thread
    idle_poll_s: float = 0.0  # after a lone request ran inline, how long the loop polls for the next one

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.instances < 1:
            raise ValueError(f"max_batch, max_queue and instances must be >= 1, got {self.max_batch}, "
                             f"{self.max_queue} and {self.instances}")
        if self.max_wait_s < 0 or self.idle_poll_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"max_wait and idle_poll must be >= 0 and timeout > 0, got {self.max_wait_s}, "
                             f"{self.idle_poll_s} and {self.timeout_s}")


@dataclass(eq=False)
class Job:
    kind: str
    payload: Any
    size: int  # users
    width: int  # padded history width (cells = users x width)
    future: asyncio.Future
    arrived: float
    waits: bool  # arrived while every engine worker was busy: may wait up to max_wait for company
    taken: bool = False
    dropped: bool = False


@dataclass
class BatchStats:
    batches: int = 0
    users: int = 0
    failures: int = 0
    sizes: list = field(default_factory=list)  # the last few batch sizes (tests, debugging)


class Batcher:
    """Queue + dispatcher task + ``policy.instances`` engine threads; ``runners`` maps a job kind to
    ``fn(payloads) -> results`` (called on an engine thread, one result or exception per payload;
    with several instances, on several threads at once)."""

    def __init__(self, runners: dict[str, Callable[[list], list]], policy: BatchPolicy, metrics=None):
        self.runners, self.policy, self.metrics = runners, policy, metrics
        self.queue: deque[Job] = deque()
        self.queued = 0  # users waiting (not yet taken by a batch)
        self.running = 0  # batches on the engine workers
        self.users_running = 0  # users in those batches
        self.stats = BatchStats()
        self._closing = False
        self._sleeping = False
        self._gathering = False
        self._full = False  # the dispatcher sleeps until a worker frees: new jobs need not wake it
        self._poll_until = 0.0  # the dispatcher polls instead of sleeping until then (engine idle)
        self._inflight: set[asyncio.Task] = set()  # batches handed to the workers, until answered
        self._retiring: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._evloop: asyncio.AbstractEventLoop | None = None
        self._deadlines: list = []  # heap of (deadline, seq, weakref to the future, timeout): no timer per request
        self._seq = itertools.count()
        self._sweeper: asyncio.Task | None = None
        self._engine = ThreadPoolExecutor(policy.instances, thread_name_prefix="engine")
        if metrics is not None:
            metrics.track(metrics.queue, lambda: self.queued)  # read when /metrics is scraped

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._evloop = asyncio.get_running_loop()
        self._task = self._evloop.create_task(self._loop(), name="cddrec-batcher")
        self._sweeper = self._evloop.create_task(self._sweep(), name="cddrec-timeouts")

    @property
    def busy(self) -> bool:
        """Every engine worker runs a batch."""
        return self.running >= self.policy.instances

    async def close(self) -> None:
        """Refuse new jobs, run the queued ones, stop the engine workers."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        for tasks in (self._inflight, self._retiring):
            if tasks:
                await asyncio.wait(list(tasks))
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._engine.shutdown(wait=True)

    def after_running(self, fn: Callable[[], Any]) -> asyncio.Task:
        """Run ``fn`` once the batches already handed to the workers are done (e.g. close a replaced
        model: a batch that started on it finishes on it). With one worker, on that worker's thread after
        them, as the engine's own work (the GPU backends' case: nothing of theirs runs on another
        thread); with several, in a thread once they are answered. A failure is logged."""
        pending = list(self._inflight)

        async def later():
            try:
                if self.policy.instances == 1:
                    await asyncio.wrap_future(self._engine.submit(fn))
                    return
                if pending:
                    await asyncio.wait(pending)
                await asyncio.to_thread(fn)
            except Exception:  # noqa: BLE001 - a retired model that fails to close must not go unnoticed
                log.exception("closing a replaced model failed")

        task = self._evloop.create_task(later(), name="cddrec-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    # --------------------------------------------------------------------- submit
    async def submit(self, kind: str, payload: Any, size: int, width: int = 1, timeout_s: float | None = None):
        """Queue a job of ``size`` users and wait for its result (ProtocolError 503 / 504 / 500 otherwise)."""
        if self._closing:
            raise ProtocolError("the server is shutting down", 503, {"retry-after": RETRY_AFTER})
        p = self.policy
        if self.queued and self.queued + size > p.max_queue:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise ProtocolError(f"overloaded: {self.queued} users are waiting (--max-queue {p.max_queue}); retry later",
                                503, {"retry-after": RETRY_AFTER})
        loop = self._evloop
        job = Job(kind, payload, size, width, loop.create_future(), time.perf_counter(), self.busy)
        self.queue.append(job)
        self.queued += size
        if self._sleeping and not self._full and (not self._gathering or self.queued >= self._share()):
            self._wake.set()
        timeout = p.timeout_s if timeout_s is None else min(timeout_s, p.timeout_s)
        heapq.heappush(self._deadlines, (job.arrived + timeout, next(self._seq), weakref.ref(job.future), timeout))
        try:
            return await job.future
        finally:
            if not job.taken and not job.dropped:  # timed out or cancelled while queued: leave the queue
                job.dropped = True
                self.queued -= job.size

    async def _sweep(self) -> None:
        """Answer 504 to the jobs past their deadline (checked every few tens of milliseconds: a timer per
        request costs more than the rest of the batcher's work for it)."""
        period = min(0.02, self.policy.timeout_s / 4)
        heap = self._deadlines
        while True:
            await asyncio.sleep(period)
            now = time.perf_counter()
            while heap and heap[0][0] <= now:
                _, _, ref, timeout = heapq.heappop(heap)
                future = ref()  # answered requests have dropped theirs
                if future is not None and not future.done():
                    future.set_exception(ProtocolError(f"no answer within {timeout * 1000:.0f} ms (--timeout-ms): "
                                                           "the server is overloaded", 504))

    # ------------------------------------------------------------------- dispatch
    async def _sleep(self, timeout: float | None = None) -> None:
        self._wake.clear()
        self._sleeping = True
        try:
            if timeout is None:
                await self._wake.wait()
            else:
                await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._sleeping = False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.queue and self.queue[0].dropped:
                self.queue.popleft()
            if not self.queue:
                if self._closing:
                    return
                if self.running == 0 and time.perf_counter() < self._poll_until:
                    await asyncio.sleep(0)  # one turn of the loop: it polls the sockets without blocking
                    continue
                await self._sleep()
                continue
            if self.busy:  # woken by a worker that frees
                self._full = True
                try:
                    await self._sleep()
                finally:
                    self._full = False
                continue
            head = self.queue[0]
            if head.waits and self.policy.max_wait_s > 0:
                await self._gather(head)
            batch = self._take()
            if not batch:
                continue
            if (self.policy.inline_single and self.running == 0 and not self.queue and len(batch) == 1
                    and batch[0].size == 1 and not batch[0].future.done()):
                # one user, nothing else queued, every worker idle: run it here, on the loop's thread
                # (the two thread hand-offs saved are much of a lone request's overhead), then yield
                self.running += 1
                try:
                    results, seconds = self._run(batch)
                finally:
                    self.running -= 1
                self._answer(batch, results, seconds)
                if self.policy.idle_poll_s:
                    self._poll_until = time.perf_counter() + self.policy.idle_poll_s
                await asyncio.sleep(0)
                continue
            self.running += 1
            n = sum(j.size for j in batch)
            self.users_running += n
            task = loop.create_task(self._dispatch(loop, batch, n))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, batch: list[Job], n: int) -> None:
        """One batch on a free worker; its answers; then the dispatcher may hand that worker the next."""
        try:
            results, seconds = await loop.run_in_executor(self._engine, self._run, batch)
        finally:
            self.running -= 1
            self.users_running -= n
            if self._sleeping:
                self._wake.set()
        self._answer(batch, results, seconds)

    async def _gather(self, head: Job) -> None:
        """Wait until a full batch is queued (``_share``) or max_wait after the head arrived."""
        deadline = head.arrived + self.policy.max_wait_s
        self._gathering = True
        try:
            while self.queued < self._share() and not self._closing and not head.dropped:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                await self._sleep(remaining)
        finally:
            self._gathering = False

    def _share(self) -> int:
        """The most users the next batch takes: max_batch; with several workers, at most a fair share of the
        users waiting or running (see the module's doc)."""
        p = self.policy
        if p.instances == 1:
            return p.max_batch
        return min(p.max_batch, -(-(self.queued + self.users_running) // p.instances))

    def _take(self) -> list[Job]:
        """Queued jobs of the head's kind in arrival order (jobs of another kind keep their places), until
        the next one would exceed max_batch users or max_cells padded ids."""
        p = self.policy
        batch: list[Job] = []
        rest: deque[Job] = deque()
        users = width = 0
        cap = self._share()
        while self.queue:
            job = self.queue.popleft()
            if job.dropped:
                continue
            if batch and job.kind != batch[0].kind:
                rest.append(job)
                continue
            w = max(width, job.width)
            if batch and (users + job.size > cap or (users + job.size) * w > p.max_cells):
                self.queue.appendleft(job)
                break
            job.taken = True
            self.queued -= job.size
            batch.append(job)
            users, width = users + job.size, w
        rest.extend(self.queue)
        self.queue = rest
        return batch

    def _run(self, batch: list[Job]) -> tuple[list, float]:
        """On an engine worker: the batch's runner; an exception stands for every job of the batch."""
        t0 = time.perf_counter()
        try:
            results = self.runners[batch[0].kind]([j.payload for j in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"runner {batch[0].kind!r} returned {len(results)} results for {len(batch)} jobs")
        except Exception as e:  # noqa: BLE001 - one batch fails, the server keeps serving
            log.error("engine failed on a batch of %d users (%d requests): %s", sum(j.size for j in batch),
                      len(batch), e, exc_info=True)
            results = e
        return results, time.perf_counter() - t0

    def _answer(self, batch: list[Job], results, seconds: float) -> None:
        users = sum(j.size for j in batch)
        self.stats.batches += 1
        self.stats.users += users
        self.stats.sizes = (self.stats.sizes + [users])[-1000:]
        failed = isinstance(results, Exception)
        if self.metrics is not None:
            self.metrics.observe_batch(users, seconds, failed)
        if failed:
            self.stats.failures += 1
            said = f": {first_line(results, 200)}" if str(results).strip() else ""
            err = ProtocolError(f"the engine failed on this batch ({type(results).__name__}{said}); see the server "
                                "log", 500)
            results = [err] * len(batch)
        for job, r in zip(batch, results):
            if job.future.done():  # timed out meanwhile
                continue
            if isinstance(r, BaseException):
                job.future.set_exception(r)
            else:
                job.future.set_result(r)
