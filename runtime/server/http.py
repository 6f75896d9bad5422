"""The HTTP glue under the routes: each route is an ASGI endpoint (Starlette routes to it; the hot ones are
also reached directly by their exact path, without Starlette's middleware stack and request objects).

- ``Call``: one request: the scope's headers as a dict, its path parameters, and its body read
  with a size limit (413) and decompressed (gzip/deflate, as tritonclient can send; 415 otherwise);
- ``Reply``: status, body bytes, content type and extra headers;
- ``Endpoint``: an ASGI app of one handler ``async fn(call) -> Reply``: checks the method (405),
  turns a ``ProtocolError`` into ``{"error": ...}`` with its status and headers, answers 500 for a bug
  (logged), and counts and times every answer in the metrics under the route's template.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field

import orjson

from .protocol import ProtocolError

log = logging.getLogger("cddrec.serve")
JSON = b"application/json"
MAX_GZIP_MEMBERS = 64  # gzip members one body may hold (each costs a decompressor)


@dataclass
class Reply:
    body: bytes = b""
    status: int = 200
    content_type: bytes = JSON
    headers: list = field(default_factory=list)  # [(name bytes, value bytes)]


def json_reply(doc, status: int = 200) -> Reply:
    return Reply(orjson.dumps(doc), status)


def error_reply(message: str, status: int, headers: dict | None = None) -> Reply:
    return Reply(orjson.dumps({"error": message}), status,
                 headers=[(k.encode(), v.encode()) for k, v in (headers or {}).items()])


class Call:
    """One request: headers (lower-case names), path parameters, body."""

    __slots__ = ("scope", "receive", "headers", "path_params")

    def __init__(self, scope, receive, path_params: dict):
        self.scope, self.receive, self.path_params = scope, receive, path_params
        self.headers = dict(scope["headers"])

    def header(self, name: bytes) -> str | None:
        v = self.headers.get(name)
        return None if v is None else v.decode("latin-1")

    async def body(self, limit: int) -> bytes:
        """The body, at most ``limit`` bytes (413), decompressed for gzip/deflate (415 for another encoding)."""
        declared = self.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ProtocolError(f"request body of {int(declared)} bytes is over the limit of {limit} "
                                "(--max-body-bytes)", 413)
        chunks, n = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ProtocolError("the client disconnected", 499)
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > limit:
                raise ProtocolError(f"request body over the limit of {limit} bytes (--max-body-bytes)", 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = self.headers.get(b"content-encoding", b"identity").decode("latin-1").lower()
        if encoding == "identity":
            return data
        if encoding not in ("gzip", "deflate"):
            raise ProtocolError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)", 415)
        parts, size, rest = [], 0, data
        while True:  # gzip may hold several members one after another (RFC 1952); deflate is one stream
            d = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
            try:
                part = d.decompress(rest, limit + 1 - size)
            except zlib.error as e:
                raise ProtocolError(f"the body is not valid {encoding} data ({e})") from None
            size += len(part)
            if size > limit or d.unconsumed_tail:
                raise ProtocolError(f"decompressed request body over the limit of {limit} bytes (--max-body-bytes)",
                                    413)
            if not d.eof:
                raise ProtocolError(f"the body is truncated {encoding} data (the stream does not end)")
            parts.append(part)
            rest = d.unused_data
            if not rest:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):
                raise ProtocolError(f"the body has {len(rest)} bytes after the end of its {encoding} data")
            if len(parts) == MAX_GZIP_MEMBERS:
                raise ProtocolError(f"the gzip body has over {MAX_GZIP_MEMBERS} members")


async def send_reply(send, reply: Reply) -> None:
    headers = [(b"content-type", reply.content_type), (b"content-length", str(len(reply.body)).encode()),
               *reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


class Endpoint:
    """The ASGI app of one route: ``handler(call) -> Reply`` for ``methods``, timed and counted as ``route``."""

    def __init__(self, handler, route: str, methods: tuple[str, ...], metrics):
        self.handler, self.route, self.methods, self.metrics = handler, route, methods, metrics
        self.active = 0  # requests in flight: read when /metrics is scraped, not a gauge update per request
        metrics.track(metrics.in_flight.labels(route), lambda: self.active)

    async def __call__(self, scope, receive, send, path_params: dict | None = None) -> None:
        t0 = time.perf_counter()
        self.active += 1
        try:
            await self._answer(scope, receive, send, path_params, t0)
        finally:
            self.active -= 1

    async def _answer(self, scope, receive, send, path_params: dict | None, t0: float) -> None:
        if scope["method"] not in self.methods:
            reply = error_reply(f"method not allowed for {scope['method']} {scope['path']} (use "
                                f"{' or '.join(self.methods)})", 405)
        else:
            try:
                reply = await self.handler(Call(scope, receive, scope.get("path_params", {}) if path_params is None
                                                else path_params))
            except ProtocolError as e:
                reply = error_reply(e.message, e.status, e.headers)
            except Exception:  # noqa: BLE001 - a bug answers 500, the server keeps serving
                log.exception("%s %s failed", scope["method"], scope["path"])
                reply = error_reply("internal server error; see the server log", 500)
        if reply.status != 499:
            await send_reply(send, reply)
        self.metrics.observe_request(self.route, reply.status, time.perf_counter() - t0)
