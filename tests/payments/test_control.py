"""AIMD limit, circuit breaker and answer time-out: pure state machines, driven with a fake
clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.payments.control import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    AimdLimit,
    AnswerTimeout,
    CircuitBreaker,
)


@given(st.lists(st.booleans(), max_size=2000), st.integers(1, 300))
def test_aimd_limit_stays_between_one_and_the_cap(events, cap) -> None:
    limit = AimdLimit(cap=cap)
    for overload in events:
        limit.on_overload() if overload else limit.on_success()
        assert 1 <= limit.allowed <= cap


def test_aimd_converges_to_what_the_gateway_allows() -> None:
    """A gateway allowing 200 in flight answers 429 above it: the limit saws just under
    it, using the account at over 90 % of its capacity without exceeding it for long;
    with a gateway allowing more, the cap (the priority reserve) holds."""
    for gateway_allows, cap in ((200, 240), (250, 240)):
        limit, seen = AimdLimit(cap=cap, limit=10), []
        for _ in range(100_000):
            if limit.allowed > gateway_allows:
                limit.on_overload()
            else:
                limit.on_success()
            seen.append(limit.allowed)
        tail = seen[-20_000:]
        ceiling = min(gateway_allows, cap)
        assert max(tail) <= ceiling + 1
        assert sum(tail) / len(tail) >= 0.9 * ceiling


def test_aimd_backs_off_multiplicatively() -> None:
    limit = AimdLimit(cap=250, limit=200)
    limit.on_overload()
    assert limit.allowed == 180


def test_breaker_opens_after_consecutive_failures_and_probes_until_recovery() -> None:
    b = CircuitBreaker(failure_threshold=3, open_seconds=1.0, max_open_seconds=4.0)
    now = 100.0
    for _ in range(3):
        assert b.allow(now)
        b.on_failure(now)
    assert b.state == OPEN and not b.allow(now + 0.5)
    assert b.retry_in(now + 0.5) == 0.5
    assert b.allow(now + 1.0) and b.state == HALF_OPEN  # one probe
    assert not b.allow(now + 1.0)  # ... only one
    b.on_failure(now + 1.2)  # the probe failed: open again, for twice as long
    assert b.state == OPEN and b.current_open == 2.0
    assert not b.allow(now + 3.0)
    assert b.allow(now + 3.2)
    b.on_success()
    assert b.state == CLOSED and b.allow(now + 3.3) and b.failures == 0


def test_a_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(failure_threshold=3)
    b.on_failure(0)
    b.on_failure(0)
    b.on_success()
    b.on_failure(0)
    b.on_failure(0)
    assert b.state == CLOSED


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 5)), max_size=300))
def test_breaker_open_time_is_bounded(events) -> None:
    b, now = CircuitBreaker(failure_threshold=2, open_seconds=0.5, max_open_seconds=8), 0.0
    for fail, dt in events:
        now += dt
        if b.allow(now):
            b.on_failure(now) if fail else b.on_success()
        assert b.current_open <= 8
        assert b.retry_in(now) <= 8


def test_slow_start_doubles_per_round_until_the_first_overload() -> None:
    limit = AimdLimit(cap=240, limit=32)
    for _ in range(3):  # a round: one answer per slot
        for _ in range(limit.allowed):
            limit.on_success()
    assert limit.allowed == 240  # 32 -> 64 -> 128 -> 240 (the cap)
    limit = AimdLimit(cap=1000, limit=32)
    for _ in range(32):
        limit.on_success()
    limit.on_overload()
    assert limit.allowed == 57 and not limit.slow_start  # 64 * 0.9
    for _ in range(57):  # now about +1 per round
        limit.on_success()
    assert limit.allowed == 58


def test_a_throttle_counts_one_429_per_round_and_wakes_every_free_slot() -> None:
    """An overshoot answered by many 429s cuts the limit once, not once per 429 (that
    would take it to the floor); a release wakes as many waiting calls as slots are free,
    and the calls in flight never exceed the limit."""
    import asyncio

    from streams.payments.throttle import AccountThrottle

    async def scenario() -> None:
        throttle = AccountThrottle("test-account", cap=100)
        throttle.limit.limit = 10
        tickets = [await throttle.acquire() for _ in range(10)]
        assert tickets == list(range(1, 11)) and throttle.in_flight == 10
        for ticket in tickets:  # the gateway refuses all ten: one decrease
            throttle.release("overload", ticket)
        assert throttle.limit.allowed == 9 and throttle.in_flight == 0
        eleventh = await throttle.acquire()
        throttle.release("overload", eleventh)  # sent after the decrease: counts
        assert throttle.limit.allowed == 8

        peak = 0

        async def call() -> None:
            nonlocal peak
            ticket = await throttle.acquire()
            peak = max(peak, throttle.in_flight)
            assert throttle.in_flight <= throttle.limit.allowed
            await asyncio.sleep(0.001)
            throttle.release("ok", ticket)

        await asyncio.gather(*(call() for _ in range(200)))
        assert throttle.in_flight == 0 and throttle.waking == 0
        assert all(w.done() for w in throttle.waiters)
        assert peak > 8  # the limit grew while the calls queued, and waiters filled it

    asyncio.run(scenario())


def test_answer_timeout_is_the_ceiling_until_enough_answers_are_known() -> None:
    timeout = AnswerTimeout(ceiling=5.0)
    for _ in range(199):
        timeout.on_answer(0.5)
        assert timeout.seconds == 5.0
    timeout.on_answer(0.5)
    assert timeout.seconds == pytest.approx(1.5)  # 3 x p99 of 0.5 s


def test_answer_timeout_is_three_times_the_p99_within_floor_and_ceiling() -> None:
    # 99 % of answers at 0.2 s, 1 % at 1 s: the p99 is 1 s
    timeout = AnswerTimeout(ceiling=5.0)
    for i in range(1000):
        timeout.on_answer(1.0 if i % 100 == 99 else 0.2)
    assert timeout.seconds == pytest.approx(3.0)
    fast = AnswerTimeout(ceiling=5.0, floor=1.0)
    for _ in range(300):
        fast.on_answer(0.01)
    assert fast.seconds == 1.0  # the floor
    slow = AnswerTimeout(ceiling=5.0)
    for _ in range(300):
        slow.on_answer(4.0)
    assert slow.seconds == 5.0  # the ceiling


def test_answer_timeout_backs_off_on_time_outs_and_resets_on_an_answer() -> None:
    timeout = AnswerTimeout(ceiling=8.0)
    for _ in range(300):
        timeout.on_answer(0.5)
    assert timeout.seconds == pytest.approx(1.5)
    timeout.on_timeout()
    assert timeout.seconds == pytest.approx(3.0)
    timeout.on_timeout()
    timeout.on_timeout()
    assert timeout.seconds == 8.0  # 12 s, held to the ceiling
    timeout.on_answer(0.5)
    assert timeout.seconds == pytest.approx(1.5)


def test_answer_timeout_follows_a_gateway_that_slows_down() -> None:
    timeout = AnswerTimeout(ceiling=10.0, window=1000)
    for _ in range(1000):
        timeout.on_answer(0.25)
    assert timeout.seconds == 1.0  # 3 x 0.25 s is below the floor
    for _ in range(1000):  # the whole window replaced by slower answers
        timeout.on_answer(2.0)
    assert timeout.seconds == pytest.approx(6.0)


@given(
    st.lists(st.one_of(st.floats(0, 60), st.none()), max_size=1500),
    st.floats(0.1, 10),
    st.floats(1, 60),
)
def test_answer_timeout_stays_within_floor_and_ceiling(events, floor, ceiling) -> None:
    if floor > ceiling:
        floor, ceiling = ceiling, floor
    timeout = AnswerTimeout(ceiling=ceiling, floor=floor)
    for seconds in events:
        timeout.on_timeout() if seconds is None else timeout.on_answer(seconds)
        assert 0 < timeout.seconds <= ceiling
        if timeout.base:
            assert timeout.seconds >= floor


def test_an_answer_is_late_past_the_p99_and_never_after_the_wait_runs_out() -> None:
    timeout = AnswerTimeout(ceiling=8.0)
    for _ in range(199):
        timeout.on_answer(0.5)
    assert timeout.late_seconds is None  # the usual answers are not known yet
    timeout = AnswerTimeout(ceiling=8.0)
    for i in range(1000):  # the window: 99 % at 0.2 s, 1 % at 1 s
        timeout.on_answer(1.0 if i % 100 == 99 else 0.2)
    assert timeout.late_seconds == pytest.approx(1.0)  # the p99
    timeout.on_timeout()
    assert timeout.late_seconds == pytest.approx(2.0)  # follows the backed-off wait
    # a p99 above the ceiling: late would come after the time-out, so never
    slow = AnswerTimeout(ceiling=2.0)
    for _ in range(300):
        slow.on_answer(3.0)
    assert slow.late_seconds is None


@given(st.lists(st.floats(0.001, 20.0), min_size=200, max_size=1200), st.integers(0, 5))
def test_late_comes_before_the_wait_runs_out(answers, timeouts) -> None:
    timeout = AnswerTimeout(ceiling=5.0)
    for seconds in answers:
        timeout.on_answer(seconds)
    for _ in range(timeouts):
        timeout.on_timeout()
    late = timeout.late_seconds
    assert late is None or 0 < late < timeout.seconds
