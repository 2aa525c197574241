"""A run against its deadline: measured rate, ETA and margin, from progress samples.

A bill run or payment run reports how much of its work is done; its rate is measured
over the last few minutes only (a run slows when a gateway throttles or a worker dies,
and the ETA must follow at once, not average that away with a fast start). The projected
finish is now + what is left / that rate; the margin is the deadline less the projected
finish: negative means the run will miss it at its current pace, while there is still
time to add workers. Pure: the caller passes the clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

WINDOW_S = 120.0  # the rate is measured over this much of the recent past
MIN_SPAN_S = 5.0  # ... and over at least this much, before any estimate


@dataclass(frozen=True)
class Estimate:
    done: int
    total: int
    rate: float | None  # units per second over the window; None: not measured yet
    eta_s: float | None  # seconds to go at that rate (inf: no progress); None: unknown
    margin_s: float | None  # deadline - projected finish; None: no deadline or unknown

    def describe(self) -> str:
        """ETA and margin for a progress bar."""
        if self.done >= self.total:
            return "done"
        if self.eta_s is None:
            return "measuring the rate"
        text = f"{self.rate:,.0f}/s, ETA {duration(self.eta_s)}"
        if self.margin_s is not None:
            verdict = "misses its deadline by" if self.margin_s < 0 else "margin"
            text += f", {verdict} {duration(abs(self.margin_s))}"
        return text


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "never (no progress)"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Forecast:
    deadline: datetime | None
    window_s: float = WINDOW_S
    min_span_s: float = MIN_SPAN_S
    samples: deque[tuple[datetime, int]] = field(default_factory=deque)

    def observe(self, now: datetime, done: int, total: int) -> Estimate:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= timedelta(
            seconds=self.window_s
        ):
            self.samples.popleft()  # keep one sample at or beyond the window's start
        first_at, first_done = self.samples[0]
        span = (now - first_at).total_seconds()
        left = max(total - done, 0)
        if left == 0:
            return Estimate(done, total, None, 0.0, self._margin(now, 0.0))
        if span <= 0 or span < self.min_span_s:
            return Estimate(done, total, None, None, None)
        rate = max(done - first_done, 0) / span
        eta = left / rate if rate > 0 else math.inf
        return Estimate(done, total, rate, eta, self._margin(now, eta))

    def _margin(self, now: datetime, eta_s: float) -> float | None:
        if self.deadline is None:
            return None
        return (self.deadline - now).total_seconds() - eta_s
