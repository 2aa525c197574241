"""A run's forecast against its deadline: the rate of the recent past only, an ETA that
follows a slowdown at once, a margin that turns negative before the deadline is missed
and back when the run catches up."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from streams.ops.deadline import Forecast, duration

T0 = datetime(2026, 12, 1, 1, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_no_estimate_before_the_rate_is_measured_then_eta_and_margin() -> None:
    f = Forecast(deadline=at(3600))
    assert f.observe(at(0), 0, 10_000).eta_s is None
    assert f.observe(at(4), 400, 10_000).margin_s is None  # under MIN_SPAN_S
    e = f.observe(at(10), 1_000, 10_000)
    assert e.rate == 100 and e.eta_s == 90 and e.margin_s == 3600 - 10 - 90
    assert "ETA 1m30s" in e.describe() and "margin" in e.describe()


def test_a_slowdown_moves_the_eta_within_the_window_and_the_margin_goes_negative() -> None:
    f = Forecast(deadline=at(1_100), window_s=60)
    done = 0
    for t in range(0, 301, 10):  # 100/s for 5 minutes
        done = t * 100
        e = f.observe(at(t), done, 100_000)
    assert e.margin_s == 100  # 70,000 left at 100/s: 700 s of the 800 left
    for t in range(310, 431, 10):  # then 20/s: the last minute's rate only
        done += 200
        e = f.observe(at(t), done, 100_000)
    assert e.rate == 20 and e.margin_s is not None and e.margin_s < 0
    assert "misses its deadline by" in e.describe()
    # it catches up: fast again, the margin is positive once the window has passed
    for t in range(440, 561, 10):
        done += 10_000
        e = f.observe(at(t), min(done, 100_000), 100_000)
    assert e.margin_s is not None and e.margin_s >= 0


def test_no_progress_is_an_infinite_eta_and_a_miss_and_done_is_done() -> None:
    f = Forecast(deadline=at(100))
    f.observe(at(0), 5, 10)
    e = f.observe(at(30), 5, 10)
    assert e.eta_s == math.inf and e.margin_s == -math.inf
    assert "never" in e.describe()
    e = f.observe(at(31), 10, 10)
    assert e.eta_s == 0 and e.margin_s == 69 and e.describe() == "done"
    assert Forecast(None).observe(at(0), 1, 1).margin_s is None  # no deadline, no margin


@given(
    steps=st.lists(st.tuples(st.integers(1, 120), st.integers(0, 10_000)), min_size=2,
                   max_size=60),
    window=st.integers(10, 300),
)  # fmt: skip
def test_the_rate_is_the_progress_over_the_retained_samples(
    steps: list[tuple[int, int]], window: int
) -> None:
    f = Forecast(deadline=None, window_s=window, min_span_s=0)
    t, done = 0, 0
    for dt, more in steps:
        t += dt
        done += more
        e = f.observe(at(t), done, 10**9)
    first_at, first_done = f.samples[0]
    span = (at(t) - first_at).total_seconds()
    assert e.rate is not None and math.isclose(e.rate, (done - first_done) / span)
    # the oldest sample kept is the last one at or before the window's start: the next
    # one is inside the window
    assert len(f.samples) < 3 or (at(t) - f.samples[1][0]).total_seconds() < window


def test_durations_read_as_a_person_says_them() -> None:
    assert [duration(s) for s in (5, 90, 3_720, math.inf)] == [
        "5s", "1m30s", "1h02m", "never (no progress)"]  # fmt: skip


def test_a_deadline_is_an_instant_a_time_from_now_or_the_configured_one() -> None:
    from types import SimpleNamespace

    from streams.cli import _run_deadline

    none, five_h = SimpleNamespace(run_deadline=""), SimpleNamespace(run_deadline="5h")
    assert _run_deadline(None, none) is None
    assert _run_deadline("2026-12-08T06:00:00Z", five_h) == datetime(2026, 12, 8, 6, tzinfo=UTC)
    soon = _run_deadline("90m", none)
    assert soon is not None and abs((soon - datetime.now(UTC)).total_seconds() - 5_400) < 5
    configured = _run_deadline(None, five_h)
    assert configured is not None
    assert abs((configured - datetime.now(UTC)).total_seconds() - 18_000) < 5
