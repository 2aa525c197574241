"""A lean HTTP/1.1 keep-alive client: asyncio protocols and the httptools response parser.

For the hot paths where an HTTP client's own CPU matters on a shared machine: the payment
gateway adapter (``streams.payments.http_gateway``, thousands of charges a second) and the
API load generator (``streams.testbed.loadgen``). Per request it does one ``transport.write``,
one parse and one timer; headers are kept as the raw pairs the parser hands over and
looked up only when asked for. What it leaves out: redirects, cookies, compression,
proxies, ``Expect: 100-continue``, pipelining.

- ``Connection``: one keep-alive connection, one request at a time.
- ``ConnectionPool``: the connections to one host (idle ones reused, last in first out;
  no cap on how many are open at once: the caller bounds its concurrency).
- ``HttpClient``: a pool per (scheme, host, port), requests by URL, a default time-out.

Errors: ``TimeoutError`` (no complete response in time; the connection is closed, as the
response may still come), ``ConnectionError`` (refused, reset, or ``ServerDisconnected``:
closed before the response was complete), ``httptools.HttpParserError`` (not HTTP), and
``InvalidURL`` (a ``ValueError``). A request that fails is not retried here: only the
caller knows whether sending it again is safe.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = [
    "Connection",
    "ConnectionPool",
    "HttpClient",
    "InvalidURL",
    "Response",
    "ServerDisconnected",
    "connect",
    "encode_request",
]


LateCallback = Callable[["asyncio.Future[Response]"], None]


class InvalidURL(ValueError):
    pass


class ServerDisconnected(ConnectionResetError):
    """The server closed the connection before the response was complete."""


class Response:
    __slots__ = ("body", "keep_alive", "raw_headers", "status")

    def __init__(
        self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool
    ) -> None:
        self.status = status
        self.raw_headers = raw_headers  # as received: (name, value), names in any case
        self.body = body
        self.keep_alive = keep_alive

    def header(self, name: str, default: str | None = None) -> str | None:
        """The last value of a header (name case-insensitive), decoded as Latin-1."""
        wanted = name.lower().encode("latin-1")
        for key, value in reversed(self.raw_headers):
            if key.lower() == wanted:
                return value.decode("latin-1")
        return default

    @property
    def headers(self) -> dict[str, str]:
        """Every header, names lower-cased (the last value of a repeated one)."""
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.raw_headers}


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time."""

    __slots__ = ("_body", "_headers", "closed", "parser", "transport", "waiter")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None  # (uvloop's is not an asyncio.Transport subclass)
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""

    # asyncio callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport: a half-closed connection is of no further use

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None:
            error = ServerDisconnected("server disconnected")
            error.__cause__ = exc
            self._fail(error)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = []
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        parser = self.parser
        response = Response(
            parser.get_status_code(), self._headers, self._body, parser.should_keep_alive()
        )
        waiter, self.waiter = self.waiter, None
        if waiter is None:  # nobody asked (an answer after a time-out): useless from now on
            self.close()
        elif not waiter.done():
            waiter.set_result(response)

    # use
    def send(self, data: bytes) -> asyncio.Future[Response]:
        """Write a complete request; the future gets its response."""
        if self.waiter is not None:
            raise RuntimeError("a request is already in flight on this connection")
        if self.closed or self.transport.is_closing():
            raise ServerDisconnected("the connection is closed")
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return waiter

    async def request(
        self, data: bytes, timeout_s: float, late: tuple[float, LateCallback] | None = None
    ) -> Response:
        """Send ``data`` and wait at most ``timeout_s`` for the response; on any failure
        (time-out and cancellation included) the connection is closed. ``late``: (seconds,
        callback) calls ``callback(waiter)`` if no response came within those seconds; the
        callback may end the wait by setting an exception on the waiter."""
        waiter = self.send(data)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout_s, _expire, waiter)
        late_timer = loop.call_later(late[0], late[1], waiter) if late else None
        try:
            return await waiter
        except BaseException:
            self.close()
            raise
        finally:
            timer.cancel()
            if late_timer is not None:
                late_timer.cancel()

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        self.waiter = None
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[Response]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def connect(
    host: str,
    port: int,
    ssl: _ssl.SSLContext | None = None,
    timeout_s: float | None = None,
) -> Connection:
    """A new connection (``TimeoutError`` if not connected within ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    opening = loop.create_connection(
        Connection, host, port, ssl=ssl, server_hostname=host if ssl else None
    )
    if timeout_s is None:
        _, conn = await opening
    else:
        _, conn = await asyncio.wait_for(opening, timeout_s)
    return conn


class ConnectionPool:
    """Keep-alive connections to one host, reused last in first out."""

    def __init__(
        self, host: str, port: int, ssl: _ssl.SSLContext | None = None, max_idle: int = 1024
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl
        self.max_idle = max_idle
        self.connects = 0  # connections opened so far
        self._idle: deque[Connection] = deque()
        self._busy: set[Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(
        self, data: bytes, timeout_s: float, late: tuple[float, LateCallback] | None = None
    ) -> Response:
        """Send one complete request (bytes, as ``encode_request`` makes them) on an idle
        connection or a new one; ``timeout_s`` bounds connecting and answering together;
        ``late`` as ``Connection.request``."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self._drop_all()
            self._loop = loop
        conn = self._take_idle()
        if conn is None:
            started = loop.time()
            conn = await connect(self.host, self.port, self.ssl, timeout_s)
            self.connects += 1
            timeout_s = max(0.0, timeout_s - (loop.time() - started))
        self._busy.add(conn)
        try:
            response = await conn.request(data, timeout_s, late)
        finally:
            self._busy.discard(conn)
        if response.keep_alive and not conn.closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return response

    def _take_idle(self) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    @property
    def open_connections(self) -> int:
        return sum(not c.closed for c in self._idle) + len(self._busy)

    def _drop_all(self) -> None:
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()

    def close(self) -> None:
        """Close every connection; requests in flight fail with ``ServerDisconnected``."""
        for conn in self._busy:
            conn._fail(ServerDisconnected("the client was closed"))
        self._drop_all()


def encode_request(
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> bytes:
    """A complete HTTP/1.1 request. Header names and values must not contain CR or LF
    (``ValueError``): they could smuggle another header or request."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    if headers:
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError(f"invalid header {name!r}: {value!r}")
            lines.append(f"{name}: {value}\r\n")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    return head + body if body else head


class HttpClient:
    """Requests by URL over one ``ConnectionPool`` per (scheme, host, port). Create, use
    and close it on one event loop (it moves to another one by dropping its connections)."""

    def __init__(self, timeout_s: float = 5.0, ssl: _ssl.SSLContext | None = None) -> None:
        self.timeout_s = timeout_s
        self._ssl = ssl
        self._pools: dict[tuple[str, str, int], tuple[ConnectionPool, str]] = {}

    def endpoint(self, url: str) -> tuple[ConnectionPool, str, str]:
        """(pool, request target, Host header) of an absolute http(s) URL."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidURL(f"invalid URL {url!r}: {exc}") from None
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in ("http", "https") or not host:
            raise InvalidURL(f"invalid URL {url!r}: need http(s)://host[:port]/path")
        if port is None:
            port = 443 if scheme == "https" else 80
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if any(c in target for c in " \r\n\t"):
            raise InvalidURL(f"invalid URL {url!r}: spaces or control characters in the path")
        key = (scheme, host, port)
        found = self._pools.get(key)
        if found is None:
            ssl = None
            if scheme == "https":
                ssl = self._ssl or _ssl.create_default_context()
            pool = ConnectionPool(host, port, ssl)
            default_port = 443 if scheme == "https" else 80
            shown = f"[{host}]" if ":" in host else host
            host_header = shown if port == default_port else f"{shown}:{port}"
            found = self._pools[key] = (pool, host_header)
        return found[0], target, found[1]

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        pool, target, host = self.endpoint(url)
        data = encode_request(method, target, host, headers, body)
        return await pool.request(data, self.timeout_s if timeout_s is None else timeout_s)

    async def close(self) -> None:
        for pool, _ in self._pools.values():
            pool.close()
        self._pools.clear()
