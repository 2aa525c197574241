"""A load generator for the ingestion API: many concurrent keep-alive clients that honour
Retry-After, over lean HTTP/1.1 connections (``streams.httpclient``: asyncio + the
httptools parser), so that on a shared 2-core machine the generator leaves the CPU to the
server it measures.

Every request carries its own ``event_id`` and ``Idempotency-Key``: a retried signup is
the same event, and the caller can check that each accepted one reached Kafka."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from streams.httpclient import ConnectionPool


@dataclass
class LoadStats:
    accepted: list[str] = field(default_factory=list)  # event ids answered 2xx
    status: dict[int, int] = field(default_factory=dict)  # HTTP status -> responses
    latencies_ms: list[float] = field(default_factory=list)  # every response
    accepted_latencies_ms: list[float] = field(default_factory=list)
    timeouts: int = 0
    connection_errors: int = 0
    gave_up: list[str] = field(default_factory=list)  # event ids never accepted


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
    queue = iter(requests)
    accepted_now: set[str] = set()
    # at most `clients` requests in flight, so at most `clients` connections; one that
    # timed out or failed is closed, and the next request opens a new one
    pool = ConnectionPool(host, port)

    async def client() -> None:
        for event_id, data in queue:
            for _attempt in range(max_attempts):
                started = time.perf_counter()
                try:
                    resp = await pool.request(data, timeout_s)
                except TimeoutError:
                    stats.timeouts += 1
                    continue
                except (ConnectionError, httptools.HttpParserError):
                    stats.connection_errors += 1
                    await asyncio.sleep(0.1)
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
                    wait = float(resp.header("Retry-After") or 1)
                    await asyncio.sleep(wait * random.uniform(1.0, 1.5))
                    continue
                break  # any other answer is final: not retried
            if event_id not in accepted_now:
                stats.gave_up.append(event_id)

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        pool.close()
    return stats
