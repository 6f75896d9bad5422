"""The Starlette application of ``cddrec-serve``: the same app on uvicorn or behind Ray Serve.

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
draining, with Retry-After; 504 timeout; 500 engine failure of that batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from functools import wraps

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cddrec import __version__
from cddrec.errors import ModelFileError

from .batcher import Batcher, BatchPolicy
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

    @property
    def policy(self) -> BatchPolicy:
        return BatchPolicy(self.max_batch, self.max_wait_ms / 1000, self.max_queue, self.timeout_ms / 1000)

    def repository(self) -> ModelRepository:
        return ModelRepository(model_source(self.model, self.name, self.backend), self.backend, self.threads,
                               self.engine_options)


def json_response(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers, media_type="application/json")


def error_response(message: str, status: int, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def endpoint(route: str):
    """Count and time every answer under ``route``; a ProtocolError becomes its JSON error response."""

    def deco(fn):
        @wraps(fn)
        async def handler(self: "Server", request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                resp = await fn(self, request)
            except ProtocolError as e:
                resp = error_response(e.message, e.status, e.headers)
            except Exception:  # noqa: BLE001 - a bug answers 500, the server keeps serving
                log.exception("%s %s failed", request.method, request.url.path)
                resp = error_response("internal server error; see the server log", 500)
            self.metrics.observe_request(route, resp.status_code, time.perf_counter() - t0)
            return resp

        return handler

    return deco


class Server:
    """The app's state: config, model repository, batcher, metrics; its methods are the routes."""

    def __init__(self, config: ServerConfig, models: ModelRepository | None = None):
        self.config, self.models = config, models
        self.metrics = ServerMetrics()
        self.batcher: Batcher | None = None
        self.ready = False

    # ----------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        if self.models is None:  # a Ray replica (the command loads before binding its port)
            self.models = self.config.repository()
        if self.models.current is None:
            await asyncio.to_thread(self.models.open)
        self.batcher = Batcher({"tensors": TensorRunner(self.models),
                                "keys": KeyRunner(self.models, self.config.max_batch)},
                               self.config.policy, self.metrics)
        self.batcher.start()
        self._set_version(self.models.current)
        self._install_sighup()
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            await self.batcher.close()  # uvicorn has drained the connections: run what is queued, stop
            self.models.close()

    def _install_sighup(self) -> None:
        if not self.config.reload_on_sighup or threading.current_thread() is not threading.main_thread() \
                or not hasattr(signal, "SIGHUP"):
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_logged()))

    async def _reload_logged(self) -> None:
        with contextlib.suppress(ProtocolError):
            await self.reload()

    async def reload(self) -> ServedModel:
        """Load the newest version and swap it in; a failure leaves the old one serving (ProtocolError 400)."""
        try:
            old, new = await self.models.reload(retire=self.batcher.on_engine_thread)
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
    def model(self, request: Request) -> ServedModel:
        """The served model named by the path (404 for another name or a version not loaded)."""
        m = self.models.current if self.models is not None else None
        if m is None:
            raise ProtocolError("the model is loading", 503, {"retry-after": "1"})
        name = request.path_params.get("name")
        if name != m.name:
            raise ProtocolError(f"unknown model {name!r}: this server serves {m.name!r}", 404)
        version = request.path_params.get("version")
        if version is not None and version != str(m.version):
            raise ProtocolError(f"model {name!r} version {version!r} is not loaded (serving version {m.version})", 404)
        return m

    async def body(self, request: Request) -> bytes:
        """The request body, at most ``max_body_bytes`` (413), decompressed for gzip/deflate (415 otherwise)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ProtocolError(f"request body of {int(declared)} bytes is over the limit of {limit} (--max-body-bytes)",
                                413)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ProtocolError(f"request body over the limit of {limit} bytes (--max-body-bytes)", 413)
            chunks.append(chunk)
        data = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding == "identity":
            return data
        if encoding not in ("gzip", "deflate"):
            raise ProtocolError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)", 415)
        d = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
        try:
            out = d.decompress(data, limit + 1)
        except zlib.error as e:
            raise ProtocolError(f"the body is not valid {encoding} data ({e})") from None
        if len(out) > limit or d.unconsumed_tail:
            raise ProtocolError(f"decompressed request body over the limit of {limit} bytes (--max-body-bytes)", 413)
        return out

    # -------------------------------------------------------------------- routes
    @endpoint("/v2/health/live")
    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    @endpoint("/v2/health/ready")
    async def health_ready(self, request: Request) -> Response:
        return json_response({"ready": self.ready}, 200 if self.ready else 503)

    @endpoint("/v2")
    async def server_metadata(self, request: Request) -> Response:
        return json_response({"name": "cddrec", "version": __version__, "extensions": EXTENSIONS})

    @endpoint("/v2/models/{name}")
    async def model_metadata(self, request: Request) -> Response:
        m = self.model(request)
        return json_response(model_metadata(m.name, [str(m.version)], m.contract, self.models.platform))

    @endpoint("/v2/models/{name}/ready")
    async def model_ready(self, request: Request) -> Response:
        self.model(request)
        return json_response({"name": request.path_params["name"], "ready": self.ready}, 200 if self.ready else 503)

    @endpoint("/v2/models/{name}/config")
    async def model_config(self, request: Request) -> Response:
        m = self.model(request)
        return json_response(model_config(m.name, m.contract, self.config.max_batch, self.models.platform))

    @endpoint("/v2/models/{name}/infer")
    async def infer(self, request: Request) -> Response:
        m = self.model(request)
        req = parse_infer(await self.body(request), request.headers.get(HEADER_LENGTH), m.contract,
                          self.config.max_batch)
        served, outputs = await self.batcher.submit("tensors", req, req.rows, req.width, req.timeout_s)
        body, headers = encode_infer_response(served.name, str(served.version), req, outputs)
        return Response(body, headers=headers)

    @endpoint("/v1/recommend")
    async def recommend(self, request: Request) -> Response:
        m = self.model_any()
        req = parse_recommend(await self.body(request), m.contract, self.config.max_batch)
        payload = await self.batcher.submit("keys", req, req.size, req.width)
        return Response(payload, media_type="application/json")

    def model_any(self) -> ServedModel:
        if self.models is None or self.models.current is None:
            raise ProtocolError("the model is loading", 503, {"retry-after": "1"})
        return self.models.current

    @endpoint("/v2/repository/index")
    async def repository_index(self, request: Request) -> Response:
        m = self.model_any()
        return json_response([{"name": m.name, "version": str(v), "state": "READY" if v == m.version else "UNAVAILABLE"}
                              for v in self.models.source.versions()])

    @endpoint("/v2/repository/models/{name}/load")
    async def repository_load(self, request: Request) -> Response:
        self.model(request)
        new = await self.reload()
        return json_response({"name": new.name, "version": str(new.version)})

    @endpoint("/v2/repository/models/{name}/unload")
    async def repository_unload(self, request: Request) -> Response:
        self.model(request)
        raise ProtocolError("cddrec-serve serves one model and does not unload it; stop the server instead", 400)

    @endpoint("/metrics")
    async def prometheus(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    # --------------------------------------------------------------------- table
    def routes(self) -> list[Route]:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        routes = [Route("/v2/health/live", self.live, methods=["GET"]),
                  Route("/v2/health/ready", self.health_ready, methods=["GET"]),
                  Route("/v2", self.server_metadata, methods=["GET"]),
                  Route("/v1/recommend", self.recommend, methods=["POST"]),
                  Route("/v2/repository/index", self.repository_index, methods=["POST"]),
                  Route("/v2/repository/models/{name}/load", self.repository_load, methods=["POST"]),
                  Route("/v2/repository/models/{name}/unload", self.repository_unload, methods=["POST"]),
                  Route("/metrics", self.prometheus, methods=["GET"])]
        for base in (model, versioned):
            routes += [Route(base, self.model_metadata, methods=["GET"]),
                       Route(base + "/ready", self.model_ready, methods=["GET"]),
                       Route(base + "/config", self.model_config, methods=["GET"]),
                       Route(base + "/infer", self.infer, methods=["POST"])]
        return routes


async def _not_found(request: Request, exc) -> Response:
    status = getattr(exc, "status_code", 404)
    what = "no route" if status == 404 else "method not allowed for"
    return error_response(f"{what} {request.method} {request.url.path} (see GET /v2 and POST /v1/recommend)", status)


class AccessLog:
    """ASGI middleware: one JSON line per request on the ``cddrec.serve.access`` logger."""

    def __init__(self, app):
        self.app = app

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


def create_app(config: ServerConfig, models: ModelRepository | None = None) -> Starlette:
    """The ASGI app; ``models`` already opened (the command) or None (opened at startup: Ray replicas)."""
    server = Server(config, models)
    app = Starlette(routes=server.routes(), lifespan=server.lifespan,
                    exception_handlers={404: _not_found, 405: _not_found})
    app.state.server = server
    if config.access_log:
        app.add_middleware(AccessLog)
    return app
