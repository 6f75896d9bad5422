"""One process: the app on uvicorn (uvloop, httptools), ready when it says so, drained on SIGTERM.

The port is bound first (a port in use is a one-line error), then the model is opened and warmed
up, and only then are connections accepted (a load balancer never sees a server that cannot
answer). SIGTERM or SIGINT stops accepting connections, lets the requests in flight finish
(uvicorn's graceful shutdown, then the batcher runs what is queued) and returns normally, so the
command exits 0. Responses leave in one system call each (``CoalescingTransport``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import sys
import threading
from typing import Callable

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

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {s: signal.signal(s, self.handle_exit) for s in sigs}
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


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          echo: Callable[[str], None] = print) -> None:
    """Bind ``host:port`` (0: any free port), load the model, say where, serve until SIGTERM/SIGINT."""
    import uvicorn

    models = config.repository()  # a missing model or a bad layout fails first
    sock = bind(host, port)  # then a port in use, before the model loads
    configure_logging(config.access_log)
    m = models.open()
    config.check_loaded(m.rec.backend)
    instances, threads = config.layout
    echo(f"cddrec-serve: {m.name} version {m.version} ({m.path}) on {config.backend}: K={m.contract.k}, "
         f"L={m.contract.max_len}, {m.contract.num_items:,} items; {instances} engine instance(s) x "
         f"{threads or 'default'} thread(s)")
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    uv = uvicorn.Config(create_app(config, models), host=host, port=port, loop=loop, http=_http_protocol_class(),
                        lifespan="on", access_log=False, log_level="warning", backlog=2048, timeout_keep_alive=30)
    server = _uvicorn_server_class()(uv)
    server.on_ready = lambda url: echo(
        f"cddrec-serve: ready at {url} (model {m.name!r}: POST {url}/v2/models/{m.name}/infer, "
        f"POST {url}/v1/recommend, GET {url}/metrics; max-batch {config.max_batch}, "
        f"max-wait {config.max_wait_ms:g} ms, max-queue {config.max_queue})")
    try:  # claim the port now: two servers may both bind it (SO_REUSEADDR) while neither listens
        sock.listen(uv.backlog)
    except OSError as e:
        sock.close()
        models.close()
        raise _port_taken(host, port, e) from None
    gc.collect()
    gc.freeze()  # the model and the libraries stay out of every later collection
    server.run(sockets=[sock])
    echo("cddrec-serve: stopped (requests in flight were answered)")
