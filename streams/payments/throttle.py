"""Flow control per merchant account, for every processor that calls a gateway.

An ``AccountThrottle`` is one merchant account's AIMD concurrency limit and circuit
breaker (``streams.payments.control``): calls wait for a slot under the limit, 429s shrink
it (once per round), and a failing account is stopped and probed until it recovers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import structlog

from streams.metrics import CIRCUIT_OPEN, GATEWAY_IN_FLIGHT, GATEWAY_LIMIT
from streams.payments.control import CLOSED, AimdLimit, CircuitBreaker

log = structlog.get_logger(__name__)


class AccountThrottle:
    """One merchant account's flow control: AIMD concurrency limit + circuit breaker."""

    def __init__(self, name: str, cap: int, processor: str = "payments") -> None:
        self.name = name
        self.limit = AimdLimit(cap=cap, limit=min(cap, 32))
        self.breaker = CircuitBreaker()
        self.in_flight = 0
        self.sent = 0  # calls let through so far: the ticket of the last one
        self.round_end = 0  # 429s to calls let through up to this one are already counted
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.waking = 0  # waiters woken that have not taken their slot yet
        self._was_open = False
        # read when Prometheus scrapes: nothing is updated per call
        GATEWAY_IN_FLIGHT.labels(processor, name).set_function(lambda: self.in_flight)
        GATEWAY_LIMIT.labels(processor, name).set_function(lambda: self.limit.allowed)
        CIRCUIT_OPEN.labels(processor, name).set_function(
            lambda: float(self.breaker.state != CLOSED)
        )

    async def acquire(self) -> int:
        """Wait for a slot; returns the call's ticket, for ``release``."""
        while True:
            # (slots promised to woken waiters that have not run yet are not free)
            if self.in_flight + self.waking < self.limit.allowed:
                if self.breaker.allow(time.monotonic()):
                    self.in_flight += 1
                    self.sent += 1
                    return self.sent
                await asyncio.sleep(max(0.01, self.breaker.retry_in(time.monotonic())))
                continue
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter.done() and not waiter.cancelled():
                    self.waking -= 1

    def release(self, outcome: str, ticket: int | None = None) -> None:
        """outcome: ok (an answer), overload (429) or failure (transient). A 429 to a call
        let through before the last decrease (its ticket is at most ``round_end``) answers
        for the same excess and does not cut the limit again: one decrease per round, as
        TCP does, or the many 429s of one overshoot would cut it to the floor."""
        self.in_flight -= 1
        now = time.monotonic()
        if outcome == "ok":
            self.limit.on_success()
            self.breaker.on_success()
        elif outcome == "overload":
            if ticket is None or ticket > self.round_end:
                self.limit.on_overload()
                self.round_end = self.sent
            self.breaker.probing = False  # a 429 is an answer: the account is up
        else:
            opened = self.breaker.opened_count
            self.breaker.on_failure(now)
            if self.breaker.opened_count > opened:
                log.warning(
                    "circuit open: gateway account keeps failing, probing it",
                    merchant_account=self.name,
                    seconds=self.breaker.current_open,
                )
        if self.breaker.state == "closed" and self._was_open:
            log.info("circuit closed: gateway account recovered", merchant_account=self.name)
        self._was_open = self.breaker.state != "closed"
        # wake as many waiters as there are free slots (a success can free two: its own
        # and one more allowed)
        free = self.limit.allowed - self.in_flight - self.waking
        while free > 0 and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.waking += 1
                free -= 1
