"""Collecting an invoice: attempts, dunning and their outcomes (pure, no I/O).

An invoice with an amount due and a payment method on file is collected by attempts
1, 2, ... Attempt n has a deterministic payment id and gateway idempotency key, so a
crash, replay or rebalance that sends attempt n again can never charge twice. After a
decline (or an attempt that stayed unknown after every transient retry), the dunning
schedule says when the next attempt may run; after the last step the invoice is
uncollectible. Transient errors inside one attempt are retried by the dispatcher with
the same key (``backoff``); they never start a new attempt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

DEFAULT_DUNNING = (timedelta(days=1), timedelta(days=3), timedelta(days=7))

Status = Literal["succeeded", "declined", "failed", "uncollectible"]


def payment_id(invoice_id: str, attempt: int) -> str:
    return f"{invoice_id}:{attempt}"


def idempotency_key(invoice_id: str, attempt: int) -> str:
    # the gateway's key: one per (invoice, attempt), whatever happens to the dispatcher
    return f"streambill:{invoice_id}:{attempt}"


def parse_schedule(text: str) -> tuple[timedelta, ...]:
    """'1d,3d,7d' (units s, m, h, d) -> the delays after attempt 1, 2, 3."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        number, unit = part[:-1], part[-1]
        if unit not in units or not number.replace(".", "", 1).isdigit():
            raise ValueError(f"dunning step {part!r}: expected a number and one of s, m, h, d")
        out.append(timedelta(seconds=float(number) * units[unit]))
    if not out:
        raise ValueError("the dunning schedule needs at least one step")
    return tuple(out)


def payable(total: Decimal, payment_method: str | None) -> bool:
    return total > 0 and bool(payment_method)


@dataclass(frozen=True)
class Retry:
    attempt: int
    not_before: datetime


@dataclass(frozen=True)
class Final:
    status: Status


def after_attempt(
    outcome: Literal["succeeded", "declined", "failed"],
    attempt: int,
    completed_at: datetime,
    schedule: tuple[timedelta, ...] = DEFAULT_DUNNING,
) -> Retry | Final:
    """What follows attempt `attempt`: nothing (paid), another attempt not before some
    instant (dunning), or the verdict that the invoice is uncollectible."""
    if attempt < 1:
        raise ValueError("attempts count from 1")
    if outcome == "succeeded":
        return Final("succeeded")
    if attempt <= len(schedule):
        return Retry(attempt + 1, completed_at + schedule[attempt - 1])
    return Final("uncollectible")


def backoff(
    retry: int, base: float = 0.2, cap: float = 10.0, rng: random.Random | None = None
) -> float:
    """Seconds before transient retry number `retry` (0-based): exponential with full
    jitter, so retries of many payments spread out instead of arriving together."""
    ceiling = min(cap, base * 2**retry)
    return (rng or random).uniform(0, ceiling)
