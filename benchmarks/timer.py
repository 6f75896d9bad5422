"""The one benchmark timer: warm-up, then timed calls until both a run count and a time are
reached; p50/p90/p99 latency and throughput. GPU work is timed with a synchronizing callable
(``sync``) after each call, so a timed call always includes the device's work."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass
class Timing:
    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    users_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def time_calls(fn: Callable[[int], object], batch: int, *, warmup: int = 3, min_runs: int = 10,
               min_seconds: float = 1.0, max_runs: int = 10_000, sync: Callable[[], None] | None = None) -> Timing:
    """Time ``fn(i)`` (i = call number, e.g. to cycle through a pool of inputs) serving ``batch`` users."""
    for i in range(warmup):
        fn(i)
    if sync:
        sync()
    lat: list[float] = []
    t_start = time.perf_counter()
    while (len(lat) < min_runs or time.perf_counter() - t_start < min_seconds) and len(lat) < max_runs:
        t0 = time.perf_counter()
        fn(len(lat))
        if sync:
            sync()
        lat.append(time.perf_counter() - t0)
    a = np.asarray(lat) * 1000
    return Timing(batch, len(a), float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(np.percentile(a, 99)),
                  float(a.mean()), float(batch / (a.mean() / 1000)))
