"""The app on uvicorn (uvloop, httptools), ready when it says so, drained on SIGTERM; in one process or
in several worker processes sharing the port.

The port is bound first (a port in use is a one-line error), then the model is opened and warmed
up, and only then are connections accepted (a load balancer never sees a server that cannot
answer). SIGTERM or SIGINT stops accepting connections, lets the requests in flight finish
(uvicorn's graceful shutdown, then the batcher runs what is queued) and returns normally, so the
command exits 0. Responses leave in one system call each (``CoalescingTransport``).

With ``workers`` > 1 (``serve_workers``) this process claims the port, then supervises that many
worker processes, each with its own model, batcher and event loop and its own listening socket on
the port (``SO_REUSEPORT``: the kernel spreads the connections evenly over the workers; on one
shared socket, measured here, one worker took 62 of 64 keep-alive connections): the HTTP work and
the engines no longer share one interpreter lock. With ``pin`` (cddrec-serve ``--pin``, Linux) each
worker is bound to its own equal share of the cores (``core_shares``). It is ready when every worker is; it forwards
SIGTERM/SIGINT (each worker drains) and SIGHUP (each worker loads the newest version); a load
through one worker's ``POST /v2/repository/models/NAME/load`` is passed on to the others. Metrics
are shared through prometheus_client's multiprocess files (``metrics.py``). A worker that dies
stops the server (exit 1, the others drained).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import Callable, Sequence

from cddrec.errors import ConfigError

from .app import ServerConfig, create_app

log = logging.getLogger("cddrec.serve")


def configure_logging(access_log: bool) -> None:
    """Server events (loads, reloads, engine failures) on stderr; access lines as bare JSON when asked for."""
    events = logging.getLogger("cddrec.serve")
    if not events.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s cddrec-serve: %(message)s"))
        events.addHandler(h)
        events.setLevel(logging.INFO)
    access = logging.getLogger("cddrec.serve.access")
    access.propagate = False  # not also through cddrec.serve's handler
    if access_log and not access.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(h)
        access.setLevel(logging.INFO)


class CoalescingTransport:
    """A transport whose writes of one event-loop step leave in one ``send``: uvicorn writes a response's
    head and body separately, and on a small (virtual) machine the second system call costs as much as the
    rest of a small request's handling. Everything else is the wrapped transport's."""

    def __init__(self, transport, loop):
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def _http_protocol_class():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, writing each response with one system call."""

        def connection_made(self, transport) -> None:
            super().connection_made(CoalescingTransport(transport, self.loop))

    return CoalescingHttpToolsProtocol


def _uvicorn_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, announcing readiness, and returning normally after SIGTERM/SIGINT (uvicorn
        re-raises the signal after its graceful shutdown, which would end the process with 143)."""

        on_ready: Callable[[str], None] | None = None
        signals: tuple = (signal.SIGINT, signal.SIGTERM)  # a worker process leaves SIGINT to its supervisor

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {s: signal.signal(s, self.handle_exit) for s in self.signals}
            try:
                yield
            finally:
                for s, handler in original.items():
                    signal.signal(s, handler)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and self.on_ready is not None:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                self.on_ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}")

    return GracefulServer


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: any free port), not listening yet (``serve`` listens once the model
    is loaded, so connections are refused until then); a port in use is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"--host {host}: {e.strerror or e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise _port_taken(host, port, e) from None
    sock.set_inheritable(True)
    return sock


def _port_taken(host: str, port: int, e: OSError) -> ConfigError:
    return ConfigError(f"{host}:{port}: {e.strerror or e} (choose another --port)")


def _model_line(config: ServerConfig, m) -> str:
    instances, threads = config.layout
    workers = (f"{config.workers} worker processes{' (each bound to its share of the cores)' if config.cpus else ''}"
               " x " if config.workers > 1 else "")
    return (f"cddrec-serve: {m.name} version {m.version} ({m.path}) on {config.backend}: K={m.contract.k}, "
            f"L={m.contract.max_len}, {m.contract.num_items:,} items; {workers}{instances} engine instance(s) x "
            f"{threads or 'default'} thread(s)")


def _ready_line(config: ServerConfig, name: str, url: str) -> str:
    return (f"cddrec-serve: ready at {url} (model {name!r}: POST {url}/v2/models/{name}/infer, "
            f"POST {url}/v1/recommend, GET {url}/metrics; max-batch {config.max_batch}, "
            f"max-wait {config.max_wait_ms:g} ms, max-queue {config.max_queue})")


def _uvicorn_server(config: ServerConfig, app):
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    uv = uvicorn.Config(app, loop=loop, http=_http_protocol_class(), lifespan="on", access_log=False,
                        log_level="warning", backlog=BACKLOG, timeout_keep_alive=30)
    return _uvicorn_server_class()(uv)


BACKLOG = 2048


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          echo: Callable[[str], None] = print) -> None:
    """Bind ``host:port`` (0: any free port), load the model, say where, serve until SIGTERM/SIGINT
    (with ``config.workers`` > 1: ``serve_workers``)."""
    if config.workers > 1:
        return serve_workers(config, host, port, echo)
    models = config.repository()  # a missing model or a bad layout fails first
    sock = bind(host, port)  # then a port in use, before the model loads
    configure_logging(config.access_log)
    m = models.open()
    config.check_loaded(m.rec.backend)
    echo(_model_line(config, m))
    server = _uvicorn_server(config, create_app(config, models))
    server.on_ready = lambda url: echo(_ready_line(config, m.name, url))
    try:  # claim the port now: two servers may both bind it (SO_REUSEADDR) while neither listens
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        models.close()
        raise _port_taken(host, port, e) from None
    gc.collect()
    gc.freeze()  # the model and the libraries stay out of every later collection
    server.run(sockets=[sock])
    echo("cddrec-serve: stopped (requests in flight were answered)")


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity where the platform tells it)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def pin_problem(workers: int, cores: Sequence[int]) -> str | None:
    """Why ``workers`` worker processes cannot each be bound to an equal share of ``cores`` (the CPUs
    this process may use), None when they can."""
    if not hasattr(os, "sched_setaffinity"):
        return "this platform does not bind processes to cores (Linux does)"
    if workers < 2:
        return "it binds worker processes to shares of the cores: use it with --workers N (N >= 2)"
    if len(cores) % workers:
        return f"{workers} workers cannot share the {len(cores)} CPU(s) this process may use equally"
    return None


def core_shares(cores: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """``n`` equal shares of ``cores`` (``pin_problem`` None): consecutive runs in the machine's topology
    order (package, core, CPU), so that a core's hyperthreads and a package's cores stay together."""
    order = sorted(cores, key=_topology_key)
    per = len(order) // n
    return [tuple(sorted(order[i * per:(i + 1) * per])) for i in range(n)]


def _topology_key(cpu: int) -> tuple[int, int, int]:
    """(package, core, cpu) from Linux's sysfs; (0, cpu, cpu) where it does not say."""
    base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
    try:
        with open(base + "physical_package_id") as pkg, open(base + "core_id") as core:
            return int(pkg.read()), int(core.read()), cpu
    except (OSError, ValueError):
        return 0, cpu, cpu


def _worker(config: ServerConfig, sock: socket.socket, conn) -> None:
    """One worker process of ``serve_workers`` (bound to ``config.cpus`` from its start, where pinned): its
    model, app and event loop on its socket (listening once the model is loaded); tells the supervisor
    ("ready", model line, name, url), ("failed", why) or ("load",) after a load through its route. It
    stops when the supervisor dies (Linux)."""
    from cddrec.errors import first_line

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the supervisor, which stops the workers
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app takes it: a reload asked during the load
    _stop_with_parent()
    configure_logging(config.access_log)
    models = config.repository()
    try:
        m = models.open()
        config.check_loaded(m.rec.backend)
    except Exception as e:  # noqa: BLE001 - reported by the supervisor as one line
        conn.send(("failed", first_line(e, 2000)))
        sys.exit(1)
    app = create_app(config, models)
    app.server.after_load = lambda: conn.send(("load",))
    server = _uvicorn_server(config, app)
    server.signals = (signal.SIGTERM,)
    server.on_ready = lambda url: conn.send(("ready", _model_line(config, m), m.name, url))
    sock.listen(BACKLOG)
    gc.collect()
    gc.freeze()
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)  # the app's startup failed (uvicorn logged why)


def _stop_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux ``PR_SET_PDEATHSIG``): no orphaned worker keeps the port."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` sockets bound to ``host:port`` with ``SO_REUSEPORT``, not listening yet (each worker listens once
    its model is loaded). The port is claimed first by a plain bind and listen (a port in use, even by
    another server's reuse-port group, is a one-line error), then released and rebound at once. Where
    the kernel does not spread connections over such sockets (not Linux), one shared socket."""
    claim = bind(host, port)
    try:
        claim.listen(1)
    except OSError as e:
        claim.close()
        raise _port_taken(host, port, e) from None
    family, address = claim.family, claim.getsockname()
    claim.close()
    if not (sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")):
        return [bind(host, address[1])] * n
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(address)
            s.set_inheritable(True)
    except OSError as e:
        for s in socks:
            s.close()
        raise _port_taken(host, address[1], e) from None
    return socks


@contextlib.contextmanager
def _bound(cpus: tuple[int, ...]):
    """This thread bound to ``cpus`` inside the block (what a process started there inherits), then unbound."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return "failed to start" if code == 3 else f"exited with code {code}"


class _Workers:
    """The supervisor's view of its workers: processes, pipes, which are ready, which owe a reload."""

    def __init__(self, ctx, config: ServerConfig, socks: list[socket.socket]):
        self.procs, self.conns = [], []
        self.ready: set[int] = set()
        self.owed: set[int] = set()  # asked to reload while loading: told once ready
        shares = None
        if config.pin:
            cores = usable_cpus()
            problem = pin_problem(config.workers, cores)
            if problem:
                raise ConfigError(f"--pin: {problem}")
            shares = core_shares(cores, config.workers)
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()  # started now, unbound, rather than by the first worker's start
        for i in range(config.workers):
            parent, child = ctx.Pipe()
            own = dataclasses.replace(config, cpus=shares[i]) if shares else config
            p = ctx.Process(target=_worker, args=(own, socks[i], child), daemon=False)
            with _bound(own.cpus):  # from its first instruction: every thread it starts (its libraries' at
                p.start()  # import too) inherits the binding
            child.close()
            if len(set(map(id, socks))) > 1:
                socks[i].close()  # the worker has its own: this copy would keep the port listening after it
            self.procs.append(p)
            self.conns.append(parent)

    def reload(self, but: int | None = None) -> None:
        """SIGHUP every live worker but ``but``: ready ones now, loading ones once ready."""
        for i, p in enumerate(self.procs):
            if i != but and p.is_alive():
                if i in self.ready:
                    os.kill(p.pid, signal.SIGHUP)
                else:
                    self.owed.add(i)

    def became_ready(self, i: int) -> None:
        self.ready.add(i)
        if i in self.owed:
            self.owed.discard(i)
            os.kill(self.procs[i].pid, signal.SIGHUP)

    def stop(self, events: dict, metrics_dir: str) -> bool:
        """SIGTERM all (each drains), wait; a second stop signal (since the first) kills them: True then."""
        from prometheus_client import multiprocess

        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        killed = False
        while any(p.is_alive() for p in self.procs):
            for p in self.procs:
                p.join(0.2)
            if events["stops"] > 1 and not killed:
                killed = any(p.is_alive() for p in self.procs)
                for p in self.procs:
                    if p.is_alive():
                        p.kill()
        for p in self.procs:
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(p.pid, metrics_dir)
        return killed


def serve_workers(config: ServerConfig, host: str, port: int, echo: Callable[[str], None] = print) -> None:
    """``config.workers`` worker processes on one port, supervised here (see the module's doc)."""
    import multiprocessing
    from multiprocessing.connection import wait

    from .metrics import MULTIPROCESS_ENV, WORKERS_ENV

    config.repository()  # a missing model or a bad layout fails first
    events = {"stops": 0, "hup": False, "first": None}

    def on_signal(signum, frame):
        if signum == getattr(signal, "SIGHUP", None):
            events["hup"] = True
        else:
            events["stops"] += 1
            events["first"] = events["first"] or signum

    sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, on_signal) for s in sigs}
    saved_env = {k: os.environ.get(k) for k in (MULTIPROCESS_ENV, WORKERS_ENV)}
    metrics_dir = None
    failed = workers = None
    killed = ready = False
    socks: list[socket.socket] = []
    try:
        socks = _worker_sockets(host, port, config.workers)
        configure_logging(config.access_log)
        metrics_dir = tempfile.mkdtemp(prefix="cddrec-serve-metrics-")
        os.environ[MULTIPROCESS_ENV] = os.environ[WORKERS_ENV] = metrics_dir  # the workers are spawned with it
        # ignored while the workers are started, which they inherit through exec: a Ctrl-C during their
        # imports reaches the supervisor only, which stops them (one given in these few milliseconds is lost)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            workers = _Workers(multiprocessing.get_context("spawn"), config, socks)  # fresh interpreters
        finally:
            signal.signal(signal.SIGINT, on_signal)
        sentinels = [p.sentinel for p in workers.procs]
        while not events["stops"] and failed is None:
            for obj in wait(workers.conns + sentinels, timeout=0.5):
                if events["stops"]:  # a signal during the wait: acted on before any message (a ready line)
                    break
                if obj in sentinels:
                    i = sentinels.index(obj)
                    workers.procs[i].join(5)
                    if not events["stops"]:
                        failed = f"worker {i + 1} (pid {workers.procs[i].pid}) {_ended(workers.procs[i].exitcode)}"
                    continue
                i = workers.conns.index(obj)
                try:
                    msg = obj.recv()
                except EOFError:
                    continue  # its process ended: its sentinel says so
                if msg[0] == "ready":
                    workers.became_ready(i)
                    if len(workers.ready) == len(workers.procs):
                        ready = True
                        echo(msg[1])
                        echo(_ready_line(config, msg[2], msg[3]))
                elif msg[0] == "failed":
                    failed = f"worker {i + 1}: {msg[1]}"
                elif msg[0] == "load":  # one worker loaded the newest version through its route: the others too
                    workers.reload(but=i)
            if events["hup"]:
                events["hup"] = False
                workers.reload()
    finally:
        if workers is not None:
            killed = workers.stop(events, metrics_dir)
        for s in set(socks):
            s.close()
        for s, h in previous.items():
            signal.signal(s, h)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if failed is not None:
        raise ConfigError(f"{failed}; the server stopped")
    if not ready:  # stopped before it served: as one process, SIGINT is "interrupted" (130), SIGTERM 143
        if events["first"] == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    if killed:
        raise ConfigError("stopped at once by a second signal: the requests still in flight were dropped")
    echo("cddrec-serve: stopped (requests in flight were answered)")
