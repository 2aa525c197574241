"""Flow control towards one merchant account: an AIMD concurrency limit and a circuit
breaker. Pure state machines (the caller passes the time), so they are tested alone.

AIMD (as TCP): each success raises the limit by 1/limit (about +1 per round of
requests), each 429 cuts it by `decrease`; the limit never exceeds `cap`, which leaves
the account's reserved slots to the priority lane. The dispatcher thus converges on what
the gateway allows instead of hammering it, and follows it when it changes. Until the
first 429 the limit is in slow start (as TCP's): each success raises it by 1, so it
doubles per round of requests and reaches a gateway's capacity in a few rounds instead of
one round per slot (from 32 to 240 slots: ~3 rounds instead of ~200, i.e. about a minute
of a payment run at 250 ms a round). The caller should count one 429 per round of
requests (``AccountThrottle`` does), or an overshoot of n slots would cut the limit n
times.

Circuit breaker: after `failure_threshold` consecutive transient failures the circuit
opens: no request is sent until `open_seconds` have passed (doubling while the gateway
keeps failing, up to `max_open_seconds`); then one probe is let through (half-open);
its success closes the circuit, its failure opens it again. Work waits meanwhile; it is
never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AimdLimit:
    cap: int
    limit: float = 10.0
    decrease: float = 0.9
    floor: float = 1.0
    slow_start: bool = True  # until the first overload: +1 per success

    def __post_init__(self) -> None:
        if self.cap < 1:
            raise ValueError("cap must be at least 1")
        self.limit = min(max(self.limit, self.floor), self.cap)

    @property
    def allowed(self) -> int:
        return max(1, int(self.limit))

    def on_success(self) -> None:
        step = 1.0 if self.slow_start else 1.0 / self.limit
        self.limit = min(self.cap, self.limit + step)

    def on_overload(self) -> None:
        self.slow_start = False
        self.limit = max(self.floor, self.limit * self.decrease)


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 20
    open_seconds: float = 1.0
    max_open_seconds: float = 30.0
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    current_open: float = field(default=0.0)
    probing: bool = False
    opened_count: int = 0

    def allow(self, now: float) -> bool:
        """May a request go now? In half-open state only one probe at a time."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now - self.opened_at >= self.current_open:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def retry_in(self, now: float) -> float:
        """Seconds until `allow` may say yes (0 when it may now)."""
        if self.state == OPEN:
            # (clamped: opened_at + current_open - now can round a hair above current_open)
            return min(self.current_open, max(0.0, self.opened_at + self.current_open - now))
        return 0.0 if self.state == CLOSED or not self.probing else 0.05

    def on_success(self) -> None:
        self.state, self.failures, self.probing, self.current_open = CLOSED, 0, False, 0.0

    def on_failure(self, now: float) -> None:
        if self.state == HALF_OPEN:
            self.probing = False
            self._open(now, min(self.max_open_seconds, self.current_open * 2))
            return
        self.failures += 1
        if self.state == CLOSED and self.failures >= self.failure_threshold:
            self._open(now, self.open_seconds)

    def _open(self, now: float, seconds: float) -> None:
        self.state, self.opened_at, self.current_open = OPEN, now, seconds
        self.opened_count += 1


@dataclass
class AnswerTimeout:
    """How long to wait for one account's answer before asking again with the same
    idempotency key: `multiple` times the p99 of its last `window` answers, within [floor,
    ceiling]; the ceiling (the configured time-out) until `min_samples` answers are known.
    Each time-out doubles the wait (as TCP's retransmission timer backs off) until an
    answer comes in time, so a gateway that slows down is followed, not hammered.

    Why: an answer that never comes (a lost connection, a stalled request) used to hold
    its payment for the whole configured time-out; at the end of a payment run those few
    payments were its last seconds. The retry is safe: the key makes the gateway return
    what it recorded, or say the first request is still in progress.

    `late_seconds` (the p99 itself, once known) is when an answer counts as late: the
    caller may then look the key up beside the call still open (a hedge), which finds an
    outcome recorded whose answer is stuck long before the wait runs out."""

    ceiling: float
    floor: float = 1.0
    multiple: float = 3.0
    window: int = 1000
    min_samples: int = 200
    recompute_every: int = 100
    answers: list[float] = field(default_factory=list)  # ring buffer of the last `window`
    base: float = 0.0  # multiple x p99, within [floor, ceiling]; 0 until min_samples
    p99: float = 0.0  # of the last `window` answers; 0 until min_samples
    backoff: float = 1.0
    _next: int = 0  # ring position
    _since: int = 0  # answers since the last recompute

    def __post_init__(self) -> None:
        if not 0 < self.floor <= self.ceiling:
            raise ValueError("need 0 < floor <= ceiling")

    @property
    def seconds(self) -> float:
        if not self.base:
            return self.ceiling
        return min(self.ceiling, self.base * self.backoff)

    @property
    def late_seconds(self) -> float | None:
        """When an answer is late (None while the usual answers are not known yet, or when
        late would not come before the wait runs out)."""
        late = self.p99 * self.backoff
        return late if 0 < late < self.seconds else None

    def on_answer(self, seconds: float) -> None:
        if len(self.answers) < self.window:
            self.answers.append(seconds)
        else:
            self.answers[self._next] = seconds
            self._next = (self._next + 1) % self.window
        self.backoff = 1.0
        self._since += 1
        if len(self.answers) >= self.min_samples and (
            not self.base or self._since >= self.recompute_every
        ):
            self._since = 0
            ordered = sorted(self.answers)
            self.p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            self.base = min(self.ceiling, max(self.floor, self.multiple * self.p99))

    def on_timeout(self) -> None:
        self.backoff = min(self.backoff * 2, 64.0)
