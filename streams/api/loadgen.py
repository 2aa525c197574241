"""A load generator for the ingestion API: many concurrent keep-alive clients that honour
Retry-After, each a lean HTTP/1.1 connection (asyncio + the httptools parser), so that
on a shared 2-core machine the generator leaves the CPU to the server it measures.

Every request carries its own ``event_id`` and ``Idempotency-Key``: a retried signup is
the same event, and the caller can check that each accepted one reached Kafka."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools


@dataclass
class LoadStats:
    accepted: list[str] = field(default_factory=list)  # event ids answered 2xx
    status: dict[int, int] = field(default_factory=dict)  # HTTP status -> responses
    latencies_ms: list[float] = field(default_factory=list)  # every response
    accepted_latencies_ms: list[float] = field(default_factory=list)
    timeouts: int = 0
    connection_errors: int = 0
    gave_up: list[str] = field(default_factory=list)  # event ids never accepted


class _Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.waiter: asyncio.Future[_Response] | None = None
        self.response = _Response()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # (uvloop's is not an asyncio.Transport subclass)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.response = _Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.response.body += body

    def on_message_complete(self) -> None:
        self.response.status = self.parser.get_status_code()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.response)

    def request(self, data: bytes, timeout_s: float) -> asyncio.Future[_Response]:
        """The response's future; it fails with TimeoutError after timeout_s. (A timer
        handle, not asyncio.wait_for, which would wrap every request in a task.)"""
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self._fail, TimeoutError())
        waiter.add_done_callback(lambda _: timer.cancel())
        self.transport.write(data)
        return waiter


def signup_request(host: str, key: str, event_id: str, body: bytes) -> bytes:
    return (
        f"POST /v1/subscriptions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {event_id}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def run_load(
    host: str,
    port: int,
    requests: list[tuple[str, bytes]],
    clients: int,
    progress: Callable[[int], None] | None = None,
    timeout_s: float = 10.0,
    max_attempts: int = 50,
) -> LoadStats:
    """Send every (event_id, request bytes) once accepted, over `clients` connections;
    a 429/503 waits its Retry-After, a time-out or a dropped connection retries on a new
    connection; after `max_attempts` a request is given up (and reported)."""
    stats = LoadStats()
    loop = asyncio.get_running_loop()
    queue = iter(requests)
    accepted_now: set[str] = set()

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(_Connection, host, port)
        return conn

    async def client() -> None:
        conn = await connect()
        for event_id, data in queue:
            for _attempt in range(max_attempts):
                started = time.perf_counter()
                try:
                    resp = await conn.request(data, timeout_s)
                except TimeoutError:
                    stats.timeouts += 1
                    conn.transport.close()  # type: ignore[union-attr]
                    conn = await connect()
                    continue
                except (ConnectionError, httptools.HttpParserError):
                    stats.connection_errors += 1
                    await asyncio.sleep(0.1)
                    conn = await connect()
                    continue
                ms = (time.perf_counter() - started) * 1000
                stats.latencies_ms.append(ms)
                stats.status[resp.status] = stats.status.get(resp.status, 0) + 1
                if 200 <= resp.status < 300:
                    stats.accepted.append(event_id)
                    accepted_now.add(event_id)
                    stats.accepted_latencies_ms.append(ms)
                    if progress and len(stats.accepted) % 500 == 0:
                        progress(500)  # (a progress bar costs more than a request)
                    break
                if resp.status in (429, 503):
                    # at least Retry-After, spread so that refused clients do not return
                    # all at the same instant
                    wait = float(resp.headers.get(b"retry-after", b"1"))
                    await asyncio.sleep(wait * random.uniform(1.0, 1.5))
                    continue
                break  # any other answer is final: not retried
            if event_id not in accepted_now:
                stats.gave_up.append(event_id)
        conn.transport.close()  # type: ignore[union-attr]

    await asyncio.gather(*(client() for _ in range(clients)))
    return stats
