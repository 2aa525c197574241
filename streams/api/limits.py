"""Per-tenant admission: a concurrency cap and a token-bucket rate, decided in
microseconds so that a refusal (429 + Retry-After) is always fast. Pure; the clock is
passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # bucket size
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is due."""
        if self.tokens < 0:  # first use: a full bucket
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else math.inf


@dataclass
class Admission:
    """One tenant's limits in one API worker."""

    max_concurrency: int
    rate_per_s: float
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(self.rate_per_s, max(1.0, self.rate_per_s))

    def reconfigure(self, max_concurrency: int, rate_per_s: float) -> None:
        """New limits take effect at once; requests in flight finish."""
        if rate_per_s != self.rate_per_s:
            self.bucket = TokenBucket(rate_per_s, max(1.0, rate_per_s))
        self.max_concurrency, self.rate_per_s = max_concurrency, rate_per_s

    def admit(self, now: float) -> int | None:
        """None: admitted (call `release` when done); else Retry-After in whole seconds
        (at least 1, as HTTP wants)."""
        if self.in_flight >= self.max_concurrency:
            return 1
        wait = self.bucket.take(now)
        if wait > 0:
            return max(1, math.ceil(wait)) if math.isfinite(wait) else 60
        self.in_flight += 1
        return None

    def release(self) -> None:
        self.in_flight -= 1
