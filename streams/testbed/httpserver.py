"""A lean HTTP/1.1 server: asyncio protocols and the httptools request parser.

Test bed: for the gateway simulator (``streams.testbed.gateway_simulator``), whose
per-request CPU counts against the payment run it serves on a shared machine: aiohttp's
server spent about 0.2 ms of CPU per request on routing, request/response objects and
writers. Here a request is the parser's raw pieces, a route is a tuple of path segments,
and a reply is one ``transport.write``.

What it does: keep-alive (HTTP/1.1, and HTTP/1.0 with ``Connection: keep-alive``),
pipelined requests answered in order, chunked request bodies, a body size limit (413),
404/405 for unknown paths and methods, 400 (and close) for what is not HTTP, a handler's
exception as a 500. Handlers may close the connection without answering
(``Request.drop``). What it leaves out: TLS, ``Expect: 100-continue``, streaming
responses, HEAD.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import httptools
import structlog

log = structlog.get_logger(__name__)

MAX_BODY = 1024**2  # as aiohttp's default client_max_size


class Request:
    __slots__ = ("_conn", "body", "method", "params", "path", "query_string", "raw_headers")

    def __init__(
        self,
        conn: _Connection,
        method: str,
        path: str,
        query_string: str,
        raw_headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path = path  # still percent-encoded
        self.query_string = query_string
        self.raw_headers = raw_headers
        self.body = body
        self.params: dict[str, str] = {}  # the route's {name} segments, decoded

    def header(self, name: str) -> str | None:
        """The last value of a header (name case-insensitive), decoded as Latin-1."""
        exact = name.encode("latin-1")
        wanted = exact.lower()
        for key, value in reversed(self.raw_headers):
            if key == exact or key.lower() == wanted:
                return value.decode("latin-1")
        return None

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string, keep_blank_values=True))

    def drop(self) -> None:
        """Close the connection now, without an answer (a simulated network failure)."""
        self._conn.close()


class Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(
        self, body: bytes = b"", status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.headers = headers  # besides Content-Length (and Connection: close)


Handler = Callable[[Request], Awaitable[Reply]]
_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _encode_reply(reply: Reply, close: bool) -> bytes:
    status = reply.status
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    if reply.headers:
        for name, value in reply.headers.items():
            head.append(f"{name}: {value}\r\n")
    if close:
        head.append("Connection: close\r\n")
    head.append(f"Content-Length: {len(reply.body)}\r\n\r\n")
    return "".join(head).encode("latin-1") + reply.body


def _text(status: int, text: str) -> Reply:
    return Reply(text.encode(), status, {"Content-Type": "text/plain; charset=utf-8"})


class Router:
    """Routes by method and path segments: ``/v1/accounts/{account}/charges``."""

    CACHE_SIZE = 1024  # resolved (method, path)s kept: the few a hot path repeats

    def __init__(self) -> None:
        # segment count -> [(pattern, {method: handler})]; a pattern is a tuple of
        # literal segments and None (a parameter), with the parameters' names
        self._routes: dict[int, list[tuple[tuple[str | None, ...], list[str], dict]]] = {}
        self._cache: dict[tuple[str, str], tuple[Handler | None, dict[str, str], int]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        segments = path.strip("/").split("/")
        pattern = tuple(None if s.startswith("{") else s for s in segments)
        names = [s[1:-1] for s in segments if s.startswith("{")]
        routes = self._routes.setdefault(len(segments), [])
        for existing, _, methods in routes:
            if existing == pattern:
                methods[method] = handler
                return
        routes.append((pattern, names, {method: handler}))
        self._cache.clear()

    def resolve(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], int]:
        """(handler, parameters, 0), or (None, {}, 404 or 405). The parameters are shared
        by every request of a cached path: handlers read them, never change them."""
        found = self._cache.get((method, path))
        if found is None:
            found = self._resolve(method, path)
            if len(self._cache) < self.CACHE_SIZE:
                self._cache[(method, path)] = found
        return found

    def _resolve(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], int]:
        segments = path.strip("/").split("/")
        found = 404
        for pattern, names, methods in self._routes.get(len(segments), ()):
            params = []
            for want, got in zip(pattern, segments, strict=True):
                if want is None:
                    params.append(got)
                elif want != got:
                    break
            else:
                handler = methods.get(method)
                if handler is None:
                    found = 405
                    continue
                return handler, dict(zip(names, map(unquote, params), strict=True)), 0
        return None, {}, found


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed as they come, answered one at a time in
    order (pipelined requests wait in a queue, reading paused meanwhile)."""

    __slots__ = (
        "_body",
        "_headers",
        "_too_large",
        "_url",
        "busy",
        "closed",
        "parser",
        "queue",
        "server",
        "transport",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.queue: deque[tuple[Request, bool]] = deque()
        self.busy = False
        self.closed = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""
        self._too_large = False

    # asyncio callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.queue.clear()
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(_text(400, "400: upgrades are not supported"))
        except httptools.HttpParserError:
            self._refuse(_text(400, "400: Bad Request"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = b""
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > self.server.max_body:
            self._too_large = True
        else:
            self._body += body

    def on_message_complete(self) -> None:
        if self.closed:
            return
        parser = self.parser
        if self._too_large:
            self._refuse(_text(413, "413: Request Entity Too Large"))
            return
        try:
            url = httptools.parse_url(self._url)
            path = url.path.decode("latin-1")
            query = (url.query or b"").decode("latin-1")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            self._refuse(_text(400, "400: Bad Request (URL)"))
            return
        method = parser.get_method().decode("latin-1")
        request = Request(self, method, path, query, self._headers, self._body)
        keep_alive = parser.should_keep_alive()
        if self.busy:
            self.queue.append((request, keep_alive))
            self.transport.pause_reading()  # no unbounded queue of pipelined requests
            return
        self._start(request, keep_alive)

    # answering
    def _start(self, request: Request, keep_alive: bool) -> None:
        handler, params, status = self.server.router.resolve(request.method, request.path)
        if handler is None:
            reason = "Not Found" if status == 404 else "Method Not Allowed"
            self._answer(_text(status, f"{status}: {reason}"), keep_alive)
            return
        request.params = params
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._run(handler, request, keep_alive))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _run(self, handler: Handler, request: Request, keep_alive: bool) -> None:
        try:
            reply = await handler(request)
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception:
            log.exception("request handler failed", method=request.method, path=request.path)
            reply = _text(500, "500: Internal Server Error")
            keep_alive = False
        self.busy = False
        self._answer(reply, keep_alive)

    def _answer(self, reply: Reply, keep_alive: bool) -> None:
        if self.closed:  # dropped by the handler, or by the client meanwhile
            return
        self.transport.write(_encode_reply(reply, close=not keep_alive))
        if not keep_alive:
            self.close()
        elif self.queue:
            request, keep_alive = self.queue.popleft()
            if not self.queue:
                self.transport.resume_reading()
            self._start(request, keep_alive)

    def _refuse(self, reply: Reply) -> None:
        if not self.closed:
            self.transport.write(_encode_reply(reply, close=True))
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.clear()
            self.transport.close()


class HttpServer:
    def __init__(self, router: Router, max_body: int = MAX_BODY) -> None:
        self.router = router
        self.max_body = max_body
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, backlog: int = 4096) -> tuple[str, int]:
        """Listen (port 0: any free port); returns the bound (host, port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[:2]

    async def close(self, timeout_s: float = 1.0) -> None:
        """Stop listening; handlers still running get ``timeout_s`` to finish, then are
        cancelled; every connection is closed."""
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout_s)
        for task in set(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout_s)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout_s)
            self._server = None
