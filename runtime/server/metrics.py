"""Prometheus metrics of one server (``prometheus_client``, a registry of its own per app).

- ``cddrec_requests_total{route,status}``: answered requests by route template and HTTP status;
- ``cddrec_request_duration_seconds{route}``: latency from the request's arrival to its answer;
- ``cddrec_batch_size``: users per engine batch (its mean is ``_sum / _count``);
- ``cddrec_batch_duration_seconds``: engine time per batch; ``cddrec_engine_failures_total``;
- ``cddrec_requests_in_flight{route}``: requests accepted and not yet answered;
- ``cddrec_queue_users``: users waiting for the engine; ``cddrec_rejected_total``: 503s of a full queue;
- ``cddrec_model_version{model}``: the version served; ``cddrec_model_reloads_total{result}``.

With several worker processes (``cddrec-serve --workers N``) every worker writes its metrics to
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) and a scrape, whichever worker
answers it, reads them all: counters and histograms summed; queue depth, requests in flight and
engine instances summed over the live workers (each worker refreshes its own few times a second);
the model version the lowest any live worker serves.
"""

from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's: its values live in files there
WORKERS_ENV = "CDDREC_SERVE_WORKERS_METRICS"  # set by cddrec-serve --workers: this process is one worker

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2,
                   0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServerMetrics:
    def __init__(self):
        self.multiprocess = bool(os.environ.get(WORKERS_ENV))
        self._tracked: list[tuple[Callable[[float], None], Callable[[], float]]] = []
        disable_created_metrics()  # no *_created series: a scrape stays readable (process-wide setting)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cddrec_requests", "Answered requests by route and HTTP status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("cddrec_request_duration_seconds", "Request latency (arrival to answer)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cddrec_batch_size", "Users per engine batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("cddrec_batch_duration_seconds", "Engine time per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.engine_failures = Counter("cddrec_engine_failures", "Batches the engine failed on", registry=r)
        self.queue = Gauge("cddrec_queue_users", "Users waiting for the engine", registry=r, multiprocess_mode="livesum")
        self.in_flight = Gauge("cddrec_requests_in_flight", "Requests being answered", ["route"], registry=r,
                               multiprocess_mode="livesum")
        self.rejected = Counter("cddrec_rejected", "Requests refused because the queue was full (503)", registry=r)
        self.version = Gauge("cddrec_model_version", "Model version served", ["model"], registry=r,
                             multiprocess_mode="livemin")
        self.reloads = Counter("cddrec_model_reloads", "Model reloads by result", ["result"], registry=r)
        self.instances = Gauge("cddrec_engine_instances", "Engine workers that run batches side by side",
                               registry=r, multiprocess_mode="livesum")
        self._children: dict = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        pair = self._children.get(key)
        if pair is None:  # label lookups cost more than the increments: resolve each pair once
            pair = self._children[key] = (self.requests.labels(route, str(status)), self.latency.labels(route))
        pair[0].inc()
        pair[1].observe(seconds)

    def observe_batch(self, users: int, seconds: float, failed: bool) -> None:
        self.batch_size.observe(users)
        self.batch_seconds.observe(seconds)
        if failed:
            self.engine_failures.inc()

    def track(self, gauge, fn: Callable[[], float]) -> None:
        """``gauge`` (a labelled child or a plain gauge) shows ``fn()``: read at each scrape in one process;
        with several workers, written by ``refresh`` (a scrape reads the files, not this process)."""
        if self.multiprocess:
            self._tracked.append((gauge.set, fn))
        else:
            gauge.set_function(fn)

    def refresh(self) -> None:
        for set_value, fn in self._tracked:
            set_value(fn())

    def render(self) -> tuple[bytes, str]:
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        self.refresh()  # this worker's own gauges as of now; the others' as of their last refresh
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
