"""``cddrec-bench --serve URL``: drive a running cddrec-serve at fixed concurrencies, as Triton's perf_analyzer.

For each route (``v2``: KServe v2 infer with binary tensors, as tritonclient sends it; ``keys``:
``POST /v1/recommend``) and each concurrency C, C asynchronous clients send one-user requests back
to back for ``seconds`` (after a short warm-up): requests/s, p50/p90/p99 latency, errors (by
status), the mean batch size the server formed and the share of the window its engine was busy
(the changes of the ``cddrec_batch_size`` and ``cddrec_batch_duration_seconds`` histograms on
/metrics over the window). The clients are keep-alive connections on one event loop
sending prebuilt requests, parsed with httptools: the load generator shares the cores with the
server, so it must cost as little as perf_analyzer does.

With ``--model`` (the graph the server serves), ONNX Runtime alone is timed on the same graph in
the same run (session defaults, one user per row, full histories of L items) right before and right
after each load step it is compared with: batch 256 around concurrency 64 (and above), batch 1
around concurrency 1. The issue's ratios are against the mean of the two timings next to that step
(throughput at concurrency 64 against ONNX Runtime's at batch 256; p50 at concurrency 1 against
ONNX Runtime's batch-1 p50): a shared host's speed drifts by tens of percent within minutes, so a
denominator timed once at the start can flatter or sink a ratio. At batch 256 ONNX Runtime is also
timed in the server's own engine layout (as many runs side by side as the server has instances, each
with their threads, from its model config); on 2 cores its default, two one-thread runs, is
the most this graph does there, and the ratio against it the stricter one. The default session's
two-thread pool is erratic on 2 cores (5,400-7,700 users/s at batch 256 within one recording,
``serve_instances_cpu.md``) where the two one-thread runs move less, so the default's ratio
moves with the host more than with the server.

Histories are random: ids 1..num_items for ``v2`` (from the model metadata's parameters); for
``keys``, item keys of the graph's vocabulary with ``--model``, else keys gathered from the
server's own answers (popular items, then their recommendations).

Before any load, each URL is checked (http(s) only, each server once) and each server asked for its model
(a one-line error naming the server when it cannot be reached or is not a cddrec-serve), and ``--model``
checked to be the graph it serves; after every step the server is asked again, and a reload (another
version) stops the run. SIGINT and SIGTERM stop the clients at once (the event loop's signal handlers),
then reach the command as they would have (exit 130/143, nothing written).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .instances import users_per_s
from .record import cell
from .timer import time_calls

POOL = 512  # distinct request bodies per route
WARMUP_SECONDS = 1.0
ROUTES = ("v2", "keys")


@dataclass
class LoadResult:
    route: str
    concurrency: int
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    mean_batch: float | None
    engine_busy: float | None  # share of the window the engine was running a batch
    engine_ms_per_batch: float | None
    errors: dict = field(default_factory=dict)  # status (or exception name) -> count
    engine_near: dict | None = None  # ONNX Runtime alone right before and after this step (EngineAlone.around)
    round: int = 1  # of run_serve_load's rounds


# ------------------------------------------------------------------------------ the servers
META_TIMEOUT = 10.0  # seconds for a metadata, /metrics or key-gathering request


def server_url(url: str) -> str:
    """``url`` without its trailing slash, refused (``ValueError`` naming it) unless it is
    http(s)://HOST[:PORT][/PREFIX]: a URL without scheme or of another scheme is no server to drive."""
    text = url.strip()
    u = text.rstrip("/")
    try:
        parts = urllib.parse.urlsplit(u)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
    except ValueError as e:
        raise ValueError(f"{text or repr(text)}: not a server URL ({e}); give http://HOST:PORT where cddrec-serve "
                         "listens") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text or repr(text)}: not an http(s)://HOST:PORT URL; give the address cddrec-serve "
                         "prints when ready, e.g. http://127.0.0.1:8000")
    if parts.query or parts.fragment:
        raise ValueError(f"{text}: a server URL has no ?query or #fragment; give http://HOST:PORT")
    return u


def server_urls(urls: str | list[str]) -> list[str]:
    """The servers of ``--serve`` (a list, or ``URL1,URL2,...``), each checked by ``server_url``; an empty
    item and a server given twice (after the trailing slash, the scheme's default port, the host's
    case) are refused: a server compared with itself is no comparison."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    if not items or any(not u.strip() for u in items):
        raise ValueError(f"{','.join(items)!r} has an empty item: give URL or URL1,URL2,... without empty "
                         "entries")
    out = [server_url(u) for u in items]
    seen: dict[tuple, str] = {}
    for u in out:
        p = urllib.parse.urlsplit(u)
        key = (p.scheme, p.hostname.lower(), p.port or (443 if p.scheme == "https" else 80), p.path)
        if key in seen:
            raise ValueError(f"one server given twice ({seen[key]} and {u}): give each server once")
        seen[key] = u
    return out


def _fetch(url: str, path: str, method: str = "GET", data: bytes | None = None) -> bytes:
    """The body of ``url + path``; a one-line ``ValueError`` naming the server when it cannot be reached
    or does not answer as cddrec-serve does."""
    import http.client
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, method=method, data=b"" if method == "POST" and data is None else data)
    hint = "is cddrec-serve running there?"
    try:
        with urllib.request.urlopen(req, timeout=META_TIMEOUT) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: not a cddrec-serve ({method} {path} answered {e.code})") from None
    except urllib.error.URLError as e:
        reason = e.reason
        why = (reason.strerror or str(reason)) if isinstance(reason, OSError) else str(reason)
        raise ValueError(f"{url}: cannot connect ({why}); {hint}") from None
    except TimeoutError:
        raise ValueError(f"{url}: no answer to {method} {path} within {META_TIMEOUT:g} s; {hint}") from None
    except (OSError, http.client.HTTPException) as e:  # reset, or an answer that is not HTTP
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ValueError(f"{url}: not a cddrec-serve ({method} {path}: {why})") from None


def _get(url: str, path: str, method: str = "GET") -> dict | list:
    try:
        return json.loads(_fetch(url, path, method))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{url}: not a cddrec-serve ({method} {path} did not answer JSON)") from None


def server_model(url: str) -> dict:
    """Name, version, contract parameters (K, L, num_items, ...) and engine instances of the model the
    server serves; a one-line ``ValueError`` naming the server when it is not a cddrec-serve."""
    index = _get(url, "/v2/repository/index", "POST")
    try:
        name = next((m["name"] for m in index if m.get("state") == "READY"), None)
        if name is None:
            raise ValueError(f"{url}: no model is READY there (POST /v2/repository/index: {json.dumps(index)[:200]})")
        meta = _get(url, f"/v2/models/{name}")
        config = _get(url, f"/v2/models/{name}/config")
        params = meta.get("parameters") or {}
        missing = [k for k in ("num_items", "K", "L") if k not in params]
        if missing:
            raise ValueError(f"{url}: not a cddrec-serve (the metadata of model {name} has no {', '.join(missing)} "
                             "parameters)")
        group = (config.get("instance_group") or [{}])[0]
        cparams = config.get("parameters") or {}
        threads = cparams.get("threads_per_instance", {}).get("string_value", "0")
        batching = config.get("dynamic_batching") or {}
        return {"name": name, "version": meta["versions"][-1], **params,
                "instances": int(group.get("count", 1)), "instance_kind": group.get("kind", "KIND_CPU"),
                "threads_per_instance": int(threads) if threads.isdigit() else 0,
                "max_wait_ms": batching.get("max_queue_delay_microseconds", 0) / 1000 if batching else None,
                "idle_poll_ms": (float(cparams["idle_poll_ms"]["string_value"]) if "idle_poll_ms" in cparams
                                 else None),
                "workers": int(cparams.get("workers", {}).get("string_value", "1")),
                "pinned": cparams.get("pinned", {}).get("string_value") == "true"}
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"{url}: not a cddrec-serve (its model repository or metadata is not cddrec-serve's)") \
            from None


def describe_model(info: dict) -> str:
    return (f"{info['name']} version {info['version']} (K={info.get('K')}, L={info.get('L')}, "
            f"{info.get('num_items')} items)")


def check_same_model(url: str, info: dict) -> None:
    """After a step: the server still serves the model it served at the start (a reload, SIGHUP or
    ``/load``, between steps would mix two models' figures in one report); a one-line error otherwise."""
    now = server_model(url)
    keys = ("name", "version", "num_items", "K", "L")
    if any(now.get(k) != info.get(k) for k in keys):
        raise ValueError(f"{url}: the server now serves {describe_model(now)}, not {describe_model(info)} as when "
                         "the benchmark started (reloaded?); its figures would mix two models: run again")


def graph_info(model: str, urls: list[str], infos: list[dict]):
    """The serving info of ``--model``, checked against each server's model (items, K, L, T, d): the graph
    must be the one the servers serve, else its keys would all be unknown there (the popularity fallback
    measured) and ONNX Runtime alone would time another graph. A one-line ``ValueError`` otherwise."""
    from cddrec.runtime.recommender import read_serving_info

    serving = read_serving_info(model)
    c = serving.contract
    mine = {"num_items": c.num_items, "K": c.k, "L": c.max_len, "T": c.steps, "d": c.hidden}
    for url, info in zip(urls, infos):
        diff = [k for k, v in mine.items() if k in info and info[k] != v]
        if diff:
            raise ValueError(f"--model {model} is not the graph {url} serves: the graph has "
                             + ", ".join(f"{k}={mine[k]}" for k in diff) + ", the server "
                             + ", ".join(f"{k}={info[k]}" for k in diff)
                             + "; give the servers' own graph (or leave --model out)")
    return serving


def server_settings(info: dict) -> str:
    """The engine layout and batching settings of a server, from ``server_model``, in words."""
    out = f"{info['instances']} instance(s) x {info['threads_per_instance'] or 'default'} thread(s)"
    if info.get("workers", 1) > 1:
        out = f"{info['workers']} worker processes{' (pinned)' if info.get('pinned') else ''}, {out} in all"
    if info.get("max_wait_ms") is not None:
        out += f", max-wait {info['max_wait_ms']:g} ms"
    if info.get("idle_poll_ms") is not None:
        out += f", idle-poll {info['idle_poll_ms']:g} ms"
    return out


def v2_bodies(num_items: int, L: int, rng: np.random.Generator) -> list[tuple[bytes, dict]]:
    """One-user infer requests with binary item_ids (1, L), asking for top_items and top_scores in binary."""
    head = json.dumps({"inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [1, L],
                                   "parameters": {"binary_data_size": 8 * L}}],
                       "outputs": [{"name": "top_items", "parameters": {"binary_data": True}},
                                   {"name": "top_scores", "parameters": {"binary_data": True}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    ids = rng.integers(1, num_items + 1, size=(POOL, L), dtype=np.int64)
    return [(head + row.astype("<i8").tobytes(), headers) for row in ids]


def gather_keys(url: str, k: int, want: int = 400, rounds: int = 60) -> list:
    """Item keys the server knows, from its own answers: the popular items, then their recommendations."""
    def ask(history: list) -> list:
        body = _fetch(url, "/v1/recommend", "POST", json.dumps({"history": history, "k": k}).encode())
        try:
            return json.loads(body)["items"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{url}: not a cddrec-serve (POST /v1/recommend did not answer its items)") from None

    keys = list(dict.fromkeys(ask([])))
    rng = np.random.default_rng(1)
    for _ in range(rounds):
        if len(keys) >= want:
            break
        keys = list(dict.fromkeys(keys + ask([keys[i] for i in rng.choice(len(keys), min(3, len(keys)), replace=False)])))
    return keys


def key_bodies(keys: list, L: int, k: int, rng: np.random.Generator) -> list[tuple[bytes, dict]]:
    headers = {"Content-Type": "application/json"}
    idx = rng.integers(0, len(keys), size=(POOL, L))
    return [(json.dumps({"user": i, "history": [keys[j] for j in row], "k": k}).encode(), headers)
            for i, row in enumerate(idx)]


# ------------------------------------------------------------------------------------ driving
def metric_value(text: str, selector: str) -> float:
    """The sum of the samples of a /metrics page (Prometheus text, read by prometheus_client's parser) that
    ``selector`` picks: ``NAME`` (any labels) or ``NAME{label="value",...}`` (samples with those labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    name, _, labels = selector.partition("{")
    want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in want.items()))


def batch_counters(url: str) -> dict[str, float]:
    """The server's batch histograms: users (``cddrec_batch_size``) and engine seconds
    (``cddrec_batch_duration_seconds``), their ``_sum`` and ``_count``."""
    text = _fetch(url, "/metrics").decode(errors="replace")
    return {name: metric_value(text, name)
            for name in ("cddrec_batch_size_sum", "cddrec_batch_size_count", "cddrec_batch_duration_seconds_sum")}


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending prebuilt requests, responses parsed by httptools (uvicorn's
    parser): a few tens of microseconds of client CPU per request, where aiohttp spends a few hundred, which
    on a small machine would be taken from the server being measured (perf_analyzer is C++ for this reason)."""

    def __init__(self):
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as e:  # noqa: BLE001 - a malformed answer fails the request that waits for it
            self._finish(e)

    def on_message_complete(self) -> None:
        self._finish(self.parser.get_status_code())

    def connection_lost(self, exc) -> None:
        self._finish(ConnectionError("the server closed the connection"))

    def _finish(self, result) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            (w.set_exception if isinstance(result, BaseException) else w.set_result)(result)

    async def request(self, raw: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def raw_requests(url: str, path: str, bodies: list[tuple[bytes, dict]]) -> list[bytes]:
    """The bytes of each POST, headers and body, built once (``path`` under the URL's own path, if any)."""
    parts = urllib.parse.urlsplit(url)
    out = []
    for body, headers in bodies:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        out.append(f"POST {parts.path}{path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


class _Signalled(Exception):
    """SIGINT or SIGTERM arrived while the clients ran: they were stopped, the signal is delivered again
    once the event loop is gone (``drive``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _catch_signals(loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]) -> dict:
    """SIGINT and SIGTERM handled by the loop while the clients run (``on_signal(signum)``), not by a
    Python handler: one raising KeyboardInterrupt or SystemExit inside a transport callback is caught
    by the loop (a "fatal error on transport", one more client error) and the run goes on. Returns
    the handlers to put back (``_restore_signals``); none outside the main thread, none for an ignored signal."""
    previous: dict = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN:
            continue
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # a loop or platform without them
            continue
        previous[sig] = prev
    return previous


def _restore_signals(loop: asyncio.AbstractEventLoop, previous: dict) -> None:
    for sig, prev in previous.items():
        loop.remove_signal_handler(sig)  # leaves SIG_DFL (default_int_handler for SIGINT): put back the command's
        signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


async def _drive(url: str, raws: list[bytes], concurrency: int, seconds: float, between=None) -> tuple[list, dict]:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    tls = True if parts.scheme == "https" else None
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors: dict[str, int] = {}

    async def worker(w: int, end: float, record: bool, conn: list) -> None:
        i = w * 7919
        while time.perf_counter() < end:
            raw = raws[i % len(raws)]
            i += 1
            t0 = time.perf_counter()
            try:
                if not conn:
                    conn.append((await loop.create_connection(_Connection, host, port, ssl=tls))[1])
                status = await conn[0].request(raw)
            except (OSError, ConnectionError) as e:
                status = type(e).__name__
                conn.clear()
            if not record:
                continue
            if status == 200:
                lat.append(time.perf_counter() - t0)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    conns: list[list] = [[] for _ in range(concurrency)]
    running: list[asyncio.Future] = []
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        for g in running:
            g.cancel()

    async def phase(seconds: float, record: bool, limit: float | None = None) -> None:
        if signalled:
            return
        end = time.perf_counter() + seconds
        g = asyncio.gather(*(worker(w, end, record, conns[w]) for w in range(concurrency)))
        running.append(g)
        try:
            await (asyncio.wait_for(g, limit) if limit else g)
        finally:
            running.remove(g)

    previous = _catch_signals(loop, on_signal)
    try:
        await phase(min(WARMUP_SECONDS, seconds), False)
        if between is not None and not signalled:
            between()
        await phase(seconds, True, seconds + 120)
    except asyncio.CancelledError:
        if not signalled:
            raise
    finally:
        for c in conns:
            if c:
                c[0].transport.close()
        _restore_signals(loop, previous)
    if signalled:
        raise _Signalled(signalled[0])
    return lat, errors


def _deliver_again(signum: int) -> None:
    """The command's own handler of ``signum`` (SIGINT: KeyboardInterrupt; cddrec's commands: temporary
    files removed, exit 130/143), as if the signal had come now; the default's if it returns."""
    signal.raise_signal(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def drive(url: str, path: str, route: str, bodies: list, concurrency: int, seconds: float) -> LoadResult:
    """One load step: ``concurrency`` clients for ``seconds`` (after the warm-up) on ``path``. SIGINT and
    SIGTERM stop it at once and are then raised as the command would (KeyboardInterrupt, SystemExit(143))."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    before: dict = {}
    coro = _drive(url, raw_requests(url, path, bodies), concurrency, seconds,
                  between=lambda: before.update(batch_counters(url), t=time.perf_counter()))
    try:
        lat, errors = runner(coro)
    except _Signalled as e:
        _deliver_again(e.signum)
    finally:
        coro.close()  # a signal before the loop ran it: no "never awaited" warning
    after = batch_counters(url)
    wall = time.perf_counter() - before["t"]
    a = np.asarray(lat) * 1000 if lat else np.full(1, np.nan)
    batches = after.get("cddrec_batch_size_count", 0) - before.get("cddrec_batch_size_count", 0)
    users = after.get("cddrec_batch_size_sum", 0) - before.get("cddrec_batch_size_sum", 0)
    engine = after.get("cddrec_batch_duration_seconds_sum", 0) - before.get("cddrec_batch_duration_seconds_sum", 0)
    return LoadResult(route, concurrency, len(lat), round(wall, 3), len(lat) / seconds,
                      float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(np.percentile(a, 99)),
                      float(a.mean()), users / batches if batches else None, engine / wall if batches else None,
                      1000 * engine / batches if batches else None, errors)


# ------------------------------------------------------------------------------- engine alone
class EngineAlone:
    """ONNX Runtime alone on the graph (session defaults), full histories of L items, timed next to the
    load steps it is compared with (``around``); with ``layout`` = (instances, threads each) of several
    instances, also in that layout (the server's engine: that many runs side by side) at batch 256."""

    def __init__(self, model: str, L: int, threads: int = 0, seconds: float = 3.0,
                 layout: tuple[int, int] = (1, 0)):
        from cddrec.runtime.backends import load_backend

        self.be = load_backend(model, "ort-cpu", threads=threads, warmup=True)
        self.callers, self.threads_each = layout[0], layout[1] or 1
        self.side_by_side = (load_backend(model, "ort-cpu", threads=self.threads_each, warmup=True)
                             if self.callers > 1 else None)
        rng = np.random.default_rng(0)
        n = self.be.contract.num_items
        self.pools = {b: [rng.integers(1, n + 1, size=(b, L), dtype=np.int64) for _ in range(8)] for b in (256, 1)}
        self.seconds, self.L = seconds, L

    def time(self, batch: int) -> dict:
        pool = self.pools[batch]
        return time_calls(lambda i: self.be.infer({"item_ids": pool[i % len(pool)]}), batch, warmup=5,
                          min_seconds=self.seconds).as_dict()

    def time_layout(self, batch: int) -> float:
        """Users/s of the layout's runs side by side at ``batch`` (the server's engine layout)."""
        return users_per_s(self.side_by_side.session, batch, self.seconds, self.callers,
                           self.be.contract.num_items, self.L, seed=1)

    def around(self, batch: int, step: Callable[[], LoadResult]) -> LoadResult:
        """Run ``step`` between two timings at ``batch``; the result carries both and their mean (at batch
        256, the server's layout too, under ``layout``)."""
        layout = self.side_by_side is not None and batch == 256
        before = self.time(batch)
        before_layout = self.time_layout(batch) if layout else None
        r = step()
        after = self.time(batch)
        after_layout = self.time_layout(batch) if layout else None
        r.engine_near = {"batch": batch, "before": before, "after": after,
                         **{k: (before[k] + after[k]) / 2 for k in ("users_per_s", "p50_ms")}}
        if layout:
            r.engine_near["layout"] = {"callers": self.callers, "threads": self.threads_each, "before": before_layout,
                                       "after": after_layout, "users_per_s": (before_layout + after_layout) / 2}
        return r

    def close(self) -> None:
        self.be.close()
        if self.side_by_side is not None:
            self.side_by_side.close()


def engine_batch(concurrency: int) -> int | None:
    """The ONNX Runtime batch a load step is compared with: 1 for one client, 256 from 64 clients."""
    return 1 if concurrency == 1 else 256 if concurrency >= 64 else None


def ratios(results: list[LoadResult]) -> dict:
    """The issue's targets, each against ONNX Runtime alone timed around that step: rps at concurrency 64 /
    ORT users/s at batch 256 (>= 0.6, with p99 <= 50 ms); p50 at concurrency 1 - ORT batch-1 p50 (<= 0.5 ms)."""
    out = {}
    for route in dict.fromkeys(r.route for r in results):  # in the order they ran
        by_c = {r.concurrency: r for r in results if r.route == route and r.engine_near}
        d = {}
        if 64 in by_c:
            near = by_c[64].engine_near
            d["c64_throughput_vs_ort_b256"] = by_c[64].requests_per_s / near["users_per_s"]
            if "layout" in near:
                d["c64_throughput_vs_ort_layout_b256"] = by_c[64].requests_per_s / near["layout"]["users_per_s"]
            d["c64_p99_ms"] = by_c[64].p99_ms
            d["c64_target_met"] = d["c64_throughput_vs_ort_b256"] >= 0.6 and by_c[64].p99_ms <= 50
        if 1 in by_c:
            d["c1_p50_minus_ort_b1_p50_ms"] = by_c[1].p50_ms - by_c[1].engine_near["p50_ms"]
            d["c1_target_met"] = d["c1_p50_minus_ort_b1_p50_ms"] <= 0.5
        out[route] = d
    return out


def route_requests(url: str, info: dict, route: str, keys: list | None, rng: np.random.Generator
                   ) -> tuple[list, str]:
    """(request bodies, path) of one route: random histories of L items, as ``v2_bodies``/``key_bodies``;
    the key route's keys are ``keys`` (the graph's vocabulary), else gathered from the server's answers."""
    L, K = int(info.get("L", 20)), int(info.get("K", 10))
    if route == "v2":
        return v2_bodies(int(info["num_items"]), L, rng), f"/v2/models/{info['name']}/infer"
    return key_bodies(keys if keys else gather_keys(url, K), L, K, rng), "/v1/recommend"


def median_ratios(by_round: list[dict]) -> dict:
    """Per route, each ratio's median over the rounds (``ratios`` of each), and the targets judged on them."""
    out = {}
    for route in by_round[0]:
        rows = [r[route] for r in by_round if route in r]
        d = {k: float(np.median([r[k] for r in rows if k in r])) for k in rows[0] if not k.endswith("_met")}
        if "c64_throughput_vs_ort_b256" in d:
            d["c64_target_met"] = d["c64_throughput_vs_ort_b256"] >= 0.6 and d["c64_p99_ms"] <= 50
        if "c1_p50_minus_ort_b1_p50_ms" in d:
            d["c1_target_met"] = d["c1_p50_minus_ort_b1_p50_ms"] <= 0.5
        out[route] = d
    return out


def run_serve_load(url: str, concurrency: list[int], seconds: float, routes: list[str], model: str | None = None,
                   threads: int = 0, echo: Callable[[str], None] = print, rounds: int = 1) -> dict:
    """Every route at every concurrency, ``rounds`` times over; with ``model``, each step between two
    timings of ONNX Runtime alone, the issue's ratios per round (``ratios_by_round``) and their medians."""
    url = server_url(url)
    info = server_model(url)
    keys = _vocab_keys(graph_info(model, [url], [info])) if model else None
    L = int(info.get("L", 20))
    rng = np.random.default_rng(0)
    res: dict = {"url": url, "server_model": info, "settings": server_settings(info), "seconds": seconds,
                 "concurrency": concurrency, "routes": routes, "rounds": rounds}
    engine = None
    if model:
        echo(f"engine alone: ONNX Runtime on {model}, L={L}, timed before and after the steps it is compared with")
        layout = (info["instances"], info["threads_per_instance"]) if info["instance_kind"] == "KIND_CPU" else (1, 0)
        engine = EngineAlone(model, L, threads, seconds=min(3.0, seconds), layout=layout)
    results = []
    try:
        requests = {route: route_requests(url, info, route, keys, rng) for route in routes}
        for rnd, route, c in ((n, r, c) for n in range(1, rounds + 1) for r in routes for c in concurrency):
            bodies, path = requests[route]
            def step(c=c, bodies=bodies, path=path, route=route) -> LoadResult:
                r = drive(url, path, route, bodies, c, seconds)
                check_same_model(url, info)
                return r

            batch = engine_batch(c) if engine else None
            r = engine.around(batch, step) if batch else step()
            r.round = rnd
            results.append(r)
            near = (f"; ORT alone batch {batch}: {r.engine_near['users_per_s']:,.0f} users/s, p50 "
                    f"{r.engine_near['p50_ms']:.3f} ms" if r.engine_near else "")
            if r.engine_near and "layout" in r.engine_near:
                lay = r.engine_near["layout"]
                near += (f"; in the server's layout ({lay['callers']} x {lay['threads']} thread(s)): "
                         f"{lay['users_per_s']:,.0f} users/s")
            echo(f"  {f'round {rnd}/{rounds} ' if rounds > 1 else ''}{route} concurrency {c}: "
                 f"{r.requests_per_s:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 "
                 f"{r.p99_ms:.2f} ms, mean batch {r.mean_batch or 0:.1f}, errors {sum(r.errors.values())}{near}")
    finally:
        if engine:
            engine.close()
    res["results"] = [asdict(r) for r in results]
    if rounds > 1:
        res["medians"] = step_medians(res)
    if model:
        res["ratios_by_round"] = [ratios([r for r in results if r.round == n]) for n in range(1, rounds + 1)]
        res["ratios"] = median_ratios(res["ratios_by_round"])
    return res


def _vocab_keys(serving) -> list:
    vocab = serving.vocab
    return [int(k) for k in vocab.keys] if vocab.key_type == "int" else list(vocab.keys)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# --------------------------------------------------------------------- several servers, interleaved
def compare_servers(urls: list[str], concurrency: list[int], seconds: float, routes: list[str], rounds: int,
                    model: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """Drive several servers of the same model in turn, ``rounds`` times over: in each round, each route
    and concurrency, every server one after another (the first server of round r is the r-th, so no server
    always goes first). On a shared host whose speed drifts within minutes, only such interleaved runs
    compare settings fairly; the summary is each server's median over the rounds and the median of its
    per-round ratio (throughput) and difference (p50, p99) against the first server's step next to it.
    The servers must serve one model (name, items, K, L; versions may differ, each is listed), each the
    same version from start to end (checked after every step); the keys of the key route come from
    ``model``'s vocabulary (checked to be the servers' graph) or from the first server's answers. Rounds
    and servers are numbered from 1 in the results, as in the table."""
    urls = server_urls(urls)
    if len(urls) < 2:
        raise ValueError("a comparison needs several servers: give --serve URL1,URL2,...")
    infos = [server_model(u) for u in urls]
    same = {(i["name"], i.get("num_items"), i.get("K"), i.get("L")) for i in infos}
    if len(same) > 1:
        raise ValueError("the servers compared must serve the same model (name, items, K, L): got "
                         + "; ".join(f"{u}: {i['name']}, {i.get('num_items')} items, K={i.get('K')}, L={i.get('L')}"
                                     for u, i in zip(urls, infos)))
    keys = _vocab_keys(graph_info(model, urls, infos)) if model else None
    steps = rounds * len(routes) * len(concurrency) * len(urls)
    echo(f"{steps} steps ({rounds} round(s) x {len(routes)} route(s) x {len(concurrency)} concurrency(ies) x "
         f"{len(urls)} servers) of {seconds:g} s after a {min(WARMUP_SECONDS, seconds):g} s warm-up: about "
         f"{duration(steps * (seconds + min(WARMUP_SECONDS, seconds)))}")
    rng = np.random.default_rng(0)
    requests = {route: route_requests(urls[0], infos[0], route, keys, rng) for route in routes}
    results: list[dict] = []
    for rnd in range(rounds):
        for route in routes:
            bodies, path = requests[route]
            for c in concurrency:
                for j in range(len(urls)):
                    s = (rnd + j) % len(urls)
                    r = drive(urls[s], path, route, bodies, c, seconds)
                    check_same_model(urls[s], infos[s])
                    r.round = rnd + 1
                    results.append({"server": s + 1, **asdict(r)})
                    echo(f"  round {rnd + 1}/{rounds} {route} concurrency {c} server {s + 1}: "
                         f"{r.requests_per_s:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
                         f"errors {sum(r.errors.values())}")
    return {"urls": urls, "server_models": infos,
            "settings": [f"version {i['version']}, {server_settings(i)}" for i in infos],
            "seconds": seconds, "concurrency": concurrency, "routes": routes, "rounds": rounds,
            "results": results, "summary": compare_summary(results, len(urls))}


def compare_summary(results: list[dict], servers: int) -> list[dict]:
    """Per route, concurrency and server (numbered from 1): medians over the rounds, and against server 1
    per round."""
    out = []
    steps = sorted({(r["route"], r["concurrency"]) for r in results}, key=lambda k: (ROUTES.index(k[0]), k[1]))
    for route, c in steps:
        by = {(r["round"], r["server"]): r for r in results if r["route"] == route and r["concurrency"] == c}
        rounds = sorted({k[0] for k in by})
        for s in range(1, servers + 1):
            mine = [by[(n, s)] for n in rounds]
            first = [by[(n, 1)] for n in rounds]
            ratio = [m["requests_per_s"] / f["requests_per_s"] for m, f in zip(mine, first) if f["requests_per_s"]]
            out.append({"route": route, "concurrency": c, "server": s,
                        "requests_per_s": [m["requests_per_s"] for m in mine],
                        "p50_ms": [m["p50_ms"] for m in mine],
                        "median_requests_per_s": float(np.median([m["requests_per_s"] for m in mine])),
                        "median_p50_ms": float(np.median([m["p50_ms"] for m in mine])),
                        "median_p99_ms": float(np.median([m["p99_ms"] for m in mine])),
                        "throughput_vs_first": float(np.median(ratio)) if ratio else None,
                        "p50_minus_first_ms": float(np.median([m["p50_ms"] - f["p50_ms"] for m, f in zip(mine, first)])),
                        "p99_minus_first_ms": float(np.median([m["p99_ms"] - f["p99_ms"] for m, f in zip(mine, first)])),
                        "errors": sum(sum(m["errors"].values()) for m in mine)})
    return out


def compare_table(res: dict) -> str:
    m = res["server_models"][0]
    lines = [f"Servers of model {m['name']} (K={m.get('K')}, L={m.get('L')}, {m.get('num_items', 0):,} items), "
             f"{res['rounds']} interleaved round(s) of {res['seconds']:g} s per step, one user per request:", ""]
    lines += [f"- server {i + 1}: {u} ({s})" for i, (u, s) in enumerate(zip(res["urls"], res["settings"]))]
    lines += ["", "| route | clients | server | requests/s per round | median requests/s | vs server 1 | "
              "p50 ms per round | median p50 ms | p50 - server 1 ms | median p99 ms | p99 - server 1 ms | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in res["summary"]:
        first = d["server"] == 1
        lines.append(f"| {d['route']} | {d['concurrency']} | {d['server']} | "
                     f"{' / '.join(f'{x:,.0f}' for x in d['requests_per_s'])} | {d['median_requests_per_s']:,.0f} | "
                     f"{'-' if first else cell(d['throughput_vs_first'], '.2f')} | "
                     f"{' / '.join(cell(x, '.2f') for x in d['p50_ms'])} | {cell(d['median_p50_ms'], '.2f')} | "
                     f"{'-' if first else cell(d['p50_minus_first_ms'], '+.2f')} | {cell(d['median_p99_ms'], '.2f')} | "
                     f"{'-' if first else cell(d['p99_minus_first_ms'], '+.2f')} | {d['errors']} |")
    lines += ["", "vs server 1: the median over the rounds of each round's ratio (or difference) to server 1's "
              "step of the same round."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ report
STEP_FIGURES = ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "mean_batch", "engine_busy", "engine_ms_per_batch")


def step_medians(res: dict) -> list[dict]:
    """Per route and concurrency, each figure's median over the rounds (errors: the sum)."""
    out = []
    for route in res["routes"]:
        for c in res["concurrency"]:
            rows = [r for r in res["results"] if r["route"] == route and r["concurrency"] == c]
            if rows:
                med = {k: [r[k] for r in rows if r.get(k) is not None] for k in STEP_FIGURES}
                out.append({"route": route, "concurrency": c, **{k: float(np.median(v)) if v else None
                                                                  for k, v in med.items()},
                            "errors": sum(sum(r["errors"].values()) for r in rows)})
    return out


def serve_table(res: dict) -> str:
    m = res["server_model"]
    rounds = res.get("rounds", 1)
    rnd = (lambda r: f"| {r['round']} ") if rounds > 1 else (lambda r: "")  # a first column with several rounds
    rh, rs = ("| round ", "|---") if rounds > 1 else ("", "")
    lines = [f"Server {res['url']}, model {m['name']} version {m['version']} (K={m.get('K')}, L={m.get('L')}, "
             f"{m.get('num_items', 0):,} items); {res['seconds']:g} s per concurrency, one user per request"
             + (f"; {rounds} rounds, each every step in turn." if rounds > 1 else "."), "",
             f"server settings: {res.get('settings') or server_settings(m)}", "",
             rh + "| route | concurrency | requests/s | p50 ms | p90 ms | p99 ms | mean server batch | engine busy | "
             "engine ms/batch | errors |", rs + "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"{rnd(r)}| {r['route']} | {r['concurrency']} | {r['requests_per_s']:,.0f} | "
                     f"{cell(r['p50_ms'], '.2f')} | {cell(r['p90_ms'], '.2f')} | {cell(r['p99_ms'], '.2f')} | "
                     f"{cell(r['mean_batch'], '.1f')} | "
                     f"{cell(r.get('engine_busy'), '.0%')} | {cell(r.get('engine_ms_per_batch'), '.2f')} | {errs} |")
    if rounds > 1:
        lines += ["", "Medians over the rounds (errors: all rounds'):", "",
                  "| route | concurrency | requests/s | p50 ms | p90 ms | p99 ms | mean server batch | engine busy | "
                  "engine ms/batch | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
        for d in step_medians(res):
            lines.append(f"| {d['route']} | {d['concurrency']} | {d['requests_per_s']:,.0f} | {cell(d['p50_ms'], '.2f')} | "
                         f"{cell(d['p90_ms'], '.2f')} | {cell(d['p99_ms'], '.2f')} | {cell(d['mean_batch'], '.1f')} | "
                         f"{cell(d['engine_busy'], '.0%')} | {cell(d['engine_ms_per_batch'], '.2f')} | {d['errors']} |")
    near = [r for r in res["results"] if r.get("engine_near")]
    if near:
        lines += ["", "ONNX Runtime alone on the same graph (session defaults, histories of L items), timed right "
                  "before and right after the load step it is compared with:", "",
                  rh + "| route | concurrency | ORT batch | users/s before | users/s after | p50 ms before | p50 ms after |",
                  rs + "|---|---|---|---|---|---|---|"]
        for r in near:
            e = r["engine_near"]
            lines.append(f"{rnd(r)}| {r['route']} | {r['concurrency']} | {e['batch']} | {e['before']['users_per_s']:,.0f} | "
                         f"{e['after']['users_per_s']:,.0f} | {e['before']['p50_ms']:.3f} | "
                         f"{e['after']['p50_ms']:.3f} |")
        layouts = [r for r in near if "layout" in r["engine_near"]]
        if layouts:
            lay = layouts[0]["engine_near"]["layout"]
            lines += ["", f"The same in the server's engine layout ({lay['callers']} runs of {lay['threads']} "
                      "thread(s) side by side):", "",
                      rh + "| route | concurrency | ORT batch | users/s before | users/s after |",
                      rs + "|---|---|---|---|---|"]
            for r in layouts:
                e = r["engine_near"]["layout"]
                lines.append(f"{rnd(r)}| {r['route']} | {r['concurrency']} | 256 | {e['before']:,.0f} | "
                             f"{e['after']:,.0f} |")
        lines += ["", "Against the mean of the two timings around each step"
                  + (" (each round, then the median over the rounds):" if rounds > 1 else ":"), "",
                  rh + "| route | c64 req/s / ORT b256 users/s (target >= 0.60) | c64 req/s / ORT b256 in the server's "
                  "layout | c64 p99 ms (<= 50) | c1 p50 - ORT b1 p50 ms (<= 0.5) |", rs + "|---|---|---|---|---|"]
        by_round = res.get("ratios_by_round", []) if rounds > 1 else []
        rows = [(f"| {n} ", r) for n, r in enumerate(by_round, 1)] + [("| median " if rounds > 1 else "",
                                                                       res.get("ratios", {}))]
        for first, table in rows:
            for route, d in table.items():
                lines.append(f"{first}| {route} | {cell(d.get('c64_throughput_vs_ort_b256'), '.2f')} | "
                             f"{cell(d.get('c64_throughput_vs_ort_layout_b256'), '.2f')} | "
                             f"{cell(d.get('c64_p99_ms'), '.1f')} | {cell(d.get('c1_p50_minus_ort_b1_p50_ms'), '+.2f')} |")
    return "\n".join(lines)


def plot_serve(res: dict, out_dir: Path, name: str) -> list[str]:
    """Latency (p50 and p99) against throughput, one line per route, concurrency at each point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from cddrec.io import atomic_path

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for route in res["routes"]:
        rows = [d for d in step_medians(res) if d["route"] == route]  # the median over the rounds
        xs = [r["requests_per_s"] for r in rows]
        for key, style in (("p50_ms", "-o"), ("p99_ms", "--s")):
            ax.plot(xs, [r[key] for r in rows], style, label=f"{route} {key[:3]}")
        for r in rows:
            ax.annotate(f"c{r['concurrency']}", (r["requests_per_s"], r["p50_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    b256 = [r["engine_near"]["users_per_s"] for r in res["results"] if (r.get("engine_near") or {}).get("batch") == 256]
    if b256:
        ax.axvline(float(np.mean(b256)), color="k", ls=":", lw=1, label="ORT alone, batch 256 (mean)")
    layout = [r["engine_near"]["layout"]["users_per_s"] for r in res["results"]
              if "layout" in (r.get("engine_near") or {})]
    if layout:
        ax.axvline(float(np.mean(layout)), color="k", ls="-.", lw=1, label="ORT alone, server's layout, batch 256")
    ax.set_xlabel("throughput (requests/s, one user each)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"cddrec-serve: {res['server_model']['name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(out_dir) / f"{name}_latency_throughput.png"
    with atomic_path(p) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return [str(p)]


def bench_serve(urls: str | list[str], concurrency: list[int], seconds: float, routes: list[str],
                model: str | None, threads: int, out_dir: str | Path, name: str, echo: Callable[[str], None] = print,
                rounds: int | None = None) -> tuple[str, list]:
    """Run, then record JSON + markdown (+ plot) under ``out_dir``; returns the table and the written paths.
    One URL: the load steps (and ONNX Runtime alone with ``model``, checked to be the server's graph);
    ``rounds`` times over (the ratios per round and their medians); several (``URL1,URL2,...`` or a list;
    each once, none empty): ``compare_servers``, ``rounds`` of them
    (default: one per server), JSON and markdown only, where ``model`` (the servers' graph, checked) only
    gives the keys of the key route. Nothing is written when a run stops (an error, SIGINT, SIGTERM)."""
    import datetime

    from .record import command_line, git_commit, machine, record

    urls = server_urls(urls)
    bad = [r for r in routes if r not in ROUTES]
    if bad:
        raise ValueError(f"--serve-routes must be among {', '.join(ROUTES)}, got {bad}")
    meta = {"command": command_line(), "commit": git_commit(), "machine": machine(),  # of the code that ran
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(out_dir)
    if len(urls) > 1:
        res = compare_servers(urls, concurrency, seconds, routes, rounds or len(urls), model, echo)
        out.mkdir(parents=True, exist_ok=True)
        table = compare_table(res)
        paths = record(name, res, table, out, title="cddrec-serve settings compared under load", meta=meta)
        return table, [str(p) for p in paths]
    res = run_serve_load(urls[0], concurrency, seconds, routes, model, threads, echo, rounds or 1)
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = plot_serve(res, out, name)
    table = serve_table(res)
    paths = [*record(name, res, table, out, title="cddrec-serve under load", meta=meta), *res["plots"]]
    return table, [str(p) for p in paths]
