"""The ASGI application of ``cddrec-serve``: the same app on uvicorn or behind Ray Serve.

Each route is an ``Endpoint`` (``http.py``) of a ``Server`` method; Starlette routes to them (and
runs the lifespan: open the model, start the batcher; drain and close at shutdown), and the two
hot routes (infer of the served model, ``/v1/recommend``) are also reached by their exact path
without Starlette's middleware stack.

Routes (KServe v2 / Triton HTTP, plus the key route and metrics):

========================================================  =====================================
``GET  /v2/health/live``, ``/v2/health/ready``            liveness; readiness (model loaded, not draining)
``GET  /v2``                                              server metadata and extensions
``GET  /v2/models/{name}[/versions/{v}]``                 model metadata from the graph contract
``GET  /v2/models/{name}[/versions/{v}]/ready``           model readiness
``GET  /v2/models/{name}[/versions/{v}]/config``          Triton-style model configuration
``POST /v2/models/{name}[/versions/{v}]/infer``           inference: JSON or binary tensors
``POST /v2/repository/index``                             the model and its versions
``POST /v2/repository/models/{name}/load``                load the newest version (atomic swap)
``POST /v1/recommend``                                    item keys in, item keys out
``GET  /metrics``                                         Prometheus text format
========================================================  =====================================

Every error is ``{"error": "..."}`` with a 4xx (the request's fault: 400 bad field, 404 unknown
model or route, 413 body too large, 415 unknown content encoding) or a 5xx (503 queue full or
draining, with Retry-After; 504 timeout; 500 engine failure of that batch; 409 a request parsed for
a model that a reload replaced by one with other inputs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cddrec.errors import ModelFileError

from ..backends import available_cores, backend_class
from .batcher import Batcher, BatchPolicy
from .http import Call, Endpoint, Reply, error_reply, json_reply
from .keys import KeyRunner, parse_recommend
from .metrics import ServerMetrics
from .models import ModelRepository, ServedModel, model_source
from .protocol import HEADER_LENGTH, ProtocolError, encode_infer_response, model_config, model_metadata, parse_infer
from .tensors import TensorRunner

log = logging.getLogger("cddrec.serve")
access_log = logging.getLogger("cddrec.serve.access")
EXTENSIONS = ["binary_tensor_data", "model_repository"]


@dataclass
class ServerConfig:
    """Everything a server (or each Ray replica) needs to start; picklable."""

    model: str
    name: str | None = None
    backend: str = "ort-cpu"
    threads: int = 0
    engine_options: dict = field(default_factory=dict)
    max_batch: int = 256
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    timeout_ms: float = 10_000.0
    max_body_bytes: int = 4 << 20
    access_log: bool = False
    reload_on_sighup: bool = True
    instances: int = 0  # engine workers side by side on one model (0: the backend's choice)
    idle_poll_ms: float = 1.0  # after a lone request ran inline, the loop polls this long for the next
    workers: int = 1  # server processes sharing the port (standalone.serve_workers), each with this config
    pin: bool = False  # several workers: each bound to its own share of the cores (standalone.core_shares)
    cpus: tuple[int, ...] = ()  # in a pinned worker: the cores it is bound to

    @property
    def layout(self) -> tuple[int, int]:
        """(engine instances, threads each) of one worker process, from ``--instances`` and ``--threads`` by
        the backend's rule, on its share of the cores."""
        cores = len(self.cpus) or max(1, available_cores() // self.workers)
        return backend_class(self.backend).serving_instances(self.threads, self.instances, cores)

    def check_loaded(self, backend) -> None:
        """A loaded backend whose runs cannot overlap (e.g. ort-cpu opened with ``buckets=``: one bound
        buffer per bucket) refuses several engine instances."""
        instances = self.layout[0]
        if instances > 1 and not backend.concurrent_runs:
            raise ModelFileError(f"this {backend.name} backend runs one batch at a time with these options: use "
                                 f"--instances 1, not {instances}")

    @property
    def policy(self) -> BatchPolicy:
        """The batcher's rules; a lone one-user request runs on the loop's thread (and the loop then polls
        for the next) only on backends whose runs may overlap (ONNX Runtime on the CPU: fast, and no
        per-thread CUDA graph captures)."""
        inline = backend_class(self.backend).concurrent_runs
        return BatchPolicy(self.max_batch, self.max_wait_ms / 1000, self.max_queue, self.timeout_ms / 1000,
                           instances=self.layout[0], inline_single=inline,
                           idle_poll_s=self.idle_poll_ms / 1000 if inline else 0.0)

    def repository(self) -> ModelRepository:
        return ModelRepository(model_source(self.model, self.name, self.backend), self.backend, self.layout[1],
                               self.engine_options)


class Server:
    """The app's state: config, model repository, batcher, metrics; its methods are the routes."""

    def __init__(self, config: ServerConfig, models: ModelRepository | None = None):
        self.config, self.models = config, models
        self.metrics = ServerMetrics()
        self.batcher: Batcher | None = None
        self.ready = False
        self._tasks: set[asyncio.Task] = set()
        self.after_load: Callable[[], None] | None = None  # called after POST .../load succeeded

    # ----------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        if self.models is None:  # a Ray replica (the command loads before binding its port)
            self.models = self.config.repository()
        if self.models.current is None:
            await asyncio.to_thread(self.models.open)
        policy = self.config.policy
        self.config.check_loaded(self.models.current.rec.backend)
        self.batcher = Batcher({"tensors": TensorRunner(self.models),
                                "keys": KeyRunner(self.models, self.config.max_batch)},
                               policy, self.metrics)
        self.batcher.start()
        self.metrics.instances.set(policy.instances)
        self._set_version(self.models.current)
        self._install_sighup()
        refresher = (asyncio.get_running_loop().create_task(self._refresh_metrics())
                     if self.metrics.multiprocess else None)  # several workers: gauges written for any scrape
        self.ready = True
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
            self.ready = False
            await self.batcher.close()  # uvicorn has drained the connections: run what is queued, stop
            self.models.close()

    def _install_sighup(self) -> None:
        if not self.config.reload_on_sighup or threading.current_thread() is not threading.main_thread() \
                or not hasattr(signal, "SIGHUP"):
            return
        loop = asyncio.get_running_loop()

        def on_sighup() -> None:
            task = loop.create_task(self._reload_logged())
            self._tasks.add(task)  # a reference until it is done: the loop keeps only a weak one
            task.add_done_callback(self._tasks.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)

    async def _refresh_metrics(self, period: float = 0.25) -> None:
        while True:
            self.metrics.refresh()
            await asyncio.sleep(period)

    async def _reload_logged(self) -> None:
        """A SIGHUP reload: its outcome is logged (``reload`` logs a failed load), never raised into the loop."""
        try:
            await self.reload()
        except ProtocolError:
            pass  # already logged by reload: the old version keeps serving
        except Exception:  # noqa: BLE001 - e.g. the engine closing during shutdown: logged, not left unretrieved
            log.exception("reload on SIGHUP failed; the running version keeps serving")

    async def reload(self) -> ServedModel:
        """Load the newest version and swap it in; a failure leaves the old one serving (ProtocolError 400)."""
        try:
            old, new = await self.models.reload(retire=self.batcher.after_running)
        except ModelFileError as e:
            self.metrics.reloads.labels("failed").inc()
            log.error("%s", e)
            raise ProtocolError(str(e), 400) from None
        self.metrics.reloads.labels("ok").inc()
        self._set_version(new)
        log.info("serving %s version %d (was %d)", new.name, new.version, old.version)
        return new

    def _set_version(self, m: ServedModel) -> None:
        self.metrics.version.labels(m.name).set(m.version)

    # ------------------------------------------------------------------- helpers
    def model(self, call: Call) -> ServedModel:
        """The served model named by the path (404 for another name or a version not loaded)."""
        m = self.model_any()
        name = call.path_params.get("name")
        if name != m.name:
            raise ProtocolError(f"unknown model {name!r}: this server serves {m.name!r}", 404)
        version = call.path_params.get("version")
        if version is not None and version != str(m.version):
            raise ProtocolError(f"model {name!r} version {version!r} is not loaded (serving version {m.version})", 404)
        return m

    def model_any(self) -> ServedModel:
        if self.models is None or self.models.current is None:
            raise ProtocolError("the model is loading", 503, {"retry-after": "1"})
        return self.models.current

    # -------------------------------------------------------------------- routes
    async def infer(self, call: Call) -> Reply:
        m = self.model(call)
        req = parse_infer(await call.body(self.config.max_body_bytes), call.header(HEADER_LENGTH.encode()), m.contract,
                          self.config.max_batch)
        served, outputs = await self.batcher.submit("tensors", req, req.rows, req.width, req.timeout_s)
        body, headers = encode_infer_response(served.name, str(served.version), req, outputs)
        extra = [(HEADER_LENGTH.encode(), headers[HEADER_LENGTH].encode())] if HEADER_LENGTH in headers else []
        return Reply(body, content_type=headers["content-type"].encode(), headers=extra)

    async def recommend(self, call: Call) -> Reply:
        m = self.model_any()
        req = parse_recommend(await call.body(self.config.max_body_bytes), m.contract, self.config.max_batch)
        return Reply(await self.batcher.submit("keys", req, req.size, req.width))

    async def live(self, call: Call) -> Reply:
        return json_reply({"live": True})

    async def health_ready(self, call: Call) -> Reply:
        return json_reply({"ready": self.ready}, 200 if self.ready else 503)

    async def server_metadata(self, call: Call) -> Reply:
        return json_reply({"name": "cddrec", "version": _version(), "extensions": EXTENSIONS})

    async def model_metadata(self, call: Call) -> Reply:
        m = self.model(call)
        return json_reply(model_metadata(m.name, [str(m.version)], m.contract, self.models.platform))

    async def model_ready(self, call: Call) -> Reply:
        m = self.model(call)
        return json_reply({"name": m.name, "ready": self.ready}, 200 if self.ready else 503)

    async def model_config(self, call: Call) -> Reply:
        m = self.model(call)
        return json_reply(model_config(m.name, m.contract, self.config.max_batch, self.models.platform,
                                       self.batcher.policy.instances * self.config.workers, m.rec.backend.device,
                                       self.config.layout[1], self.batcher.policy, self.config.workers,
                                       bool(self.config.cpus)))

    async def repository_index(self, call: Call) -> Reply:
        m = self.model_any()
        return json_reply([{"name": m.name, "version": str(v), "state": "READY" if v == m.version else "UNAVAILABLE"}
                           for v in self.models.source.versions()])

    async def repository_load(self, call: Call) -> Reply:
        self.model(call)
        new = await self.reload()
        if self.after_load is not None:  # a worker process: the supervisor has the others load it too
            self.after_load()
        return json_reply({"name": new.name, "version": str(new.version)})

    async def repository_unload(self, call: Call) -> Reply:
        self.model(call)
        raise ProtocolError("cddrec-serve serves one model and does not unload it; stop the server instead", 400)

    async def prometheus(self, call: Call) -> Reply:
        body, content_type = self.metrics.render()
        return Reply(body, content_type=content_type.encode())

    # --------------------------------------------------------------------- table
    def endpoints(self) -> list[tuple[str, Endpoint]]:
        """(path template, endpoint) of every route; the ones in ``HOT_ROUTES`` are also reached by exact path."""
        def ep(handler, route: str, *methods: str) -> Endpoint:
            return Endpoint(handler, route, methods or ("GET", "HEAD"), self.metrics)  # HEAD: uvicorn drops the body

        model, versioned = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
        infer = ep(self.infer, model + "/infer", "POST")
        metadata, ready = ep(self.model_metadata, model), ep(self.model_ready, model + "/ready")
        config = ep(self.model_config, model + "/config")
        return [(model + "/infer", infer), ("/v1/recommend", ep(self.recommend, "/v1/recommend", "POST")),
                (versioned + "/infer", infer),
                ("/v2/health/live", ep(self.live, "/v2/health/live")),
                ("/v2/health/ready", ep(self.health_ready, "/v2/health/ready")),
                ("/v2", ep(self.server_metadata, "/v2")),
                ("/metrics", ep(self.prometheus, "/metrics")),
                (model, metadata), (versioned, metadata), (model + "/ready", ready), (versioned + "/ready", ready),
                (model + "/config", config), (versioned + "/config", config),
                ("/v2/repository/index", ep(self.repository_index, "/v2/repository/index", "POST")),
                ("/v2/repository/models/{name}/load", ep(self.repository_load, "/v2/repository/models/{name}/load",
                                                         "POST")),
                ("/v2/repository/models/{name}/unload", ep(self.repository_unload,
                                                           "/v2/repository/models/{name}/unload", "POST"))]


def _version() -> str:
    """The installed cddrec's version (read from the distribution: ``cddrec/__init__`` reaches the torch modules)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cddrec")
    except PackageNotFoundError:
        return "unknown"


async def _not_found(request: Request, exc) -> Response:
    reply = error_reply(f"no route {request.method} {request.url.path} (see GET /v2 and POST /v1/recommend)", 404)
    return Response(reply.body, 404, media_type="application/json")


HOT_ROUTES = ("/v2/models/{name}/infer", "/v1/recommend")  # by exact path, outside Starlette's routing


class App:
    """The ASGI app: the hot routes (infer of the served model, /v1/recommend) by their exact path, everything
    else (and lifespan) through Starlette's router, which reaches the same endpoints."""

    def __init__(self, server: Server, endpoints: list[tuple[str, Endpoint]]):
        self.server = server
        self.router = Starlette(routes=[Route(path, ep) for path, ep in endpoints], lifespan=self._lifespan,
                                exception_handlers={404: _not_found})
        self.router.router.redirect_slashes = False  # a path with a trailing slash is a JSON 404, not an empty 307
        self.state = self.router.state
        self.state.server = server
        self._hot = {path: ep for path, ep in endpoints if path in HOT_ROUTES}
        self.fast: dict[str, tuple[Endpoint, dict]] = {}

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        async with self.server.lifespan(app):
            name = self.server.models.name
            self.fast = {path.replace("{name}", name): (ep, {"name": name} if "{name}" in path else {})
                         for path, ep in self._hot.items()}
            yield

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            hit = self.fast.get(scope["path"])
            if hit is not None:
                return await hit[0](scope, receive, send, hit[1])
        await self.router(scope, receive, send)


class AccessLog:
    """ASGI middleware: one JSON line per request on the ``cddrec.serve.access`` logger."""

    def __init__(self, app):
        self.app = app
        self.state = getattr(app, "state", None)
        self.server = getattr(app, "server", None)  # the app's Server, as on the app itself

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        seen = {"status": 500, "bytes": 0}

        async def sending(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("", 0)
            access_log.info(orjson.dumps({"time": round(time.time(), 3), "client": f"{client[0]}:{client[1]}",
                                          "method": scope["method"], "path": scope["path"],
                                          "status": seen["status"], "bytes": seen["bytes"],
                                          "ms": round((time.perf_counter() - t0) * 1000, 3)}).decode())


def create_app(config: ServerConfig, models: ModelRepository | None = None):
    """The ASGI app; ``models`` already opened (the command) or None (opened at startup: Ray replicas)."""
    server = Server(config, models)
    app = App(server, server.endpoints())
    return AccessLog(app) if config.access_log else app
