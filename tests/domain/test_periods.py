from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.periods import Interval, period_bounds, period_index_at, period_start

from .helpers import ts


def starts(anchor, interval, n):
    return [period_start(anchor, interval, k) for k in range(n)]


def test_month_end_anchor_does_not_drift():
    got = starts(ts("2026-01-31T10:00:00"), Interval.MONTH, 6)
    assert got == [
        ts("2026-01-31T10:00:00"),
        ts("2026-02-28T10:00:00"),
        ts("2026-03-31T10:00:00"),
        ts("2026-04-30T10:00:00"),
        ts("2026-05-31T10:00:00"),
        ts("2026-06-30T10:00:00"),
    ]


def test_month_end_anchor_in_leap_year():
    got = starts(ts("2024-01-31T23:59:59.5"), Interval.MONTH, 3)
    assert got == [
        ts("2024-01-31T23:59:59.5"),
        ts("2024-02-29T23:59:59.5"),
        ts("2024-03-31T23:59:59.5"),
    ]


def test_anchor_on_30th_and_29th():
    assert starts(ts("2025-01-30T00:00:00"), Interval.MONTH, 3)[1:] == [
        ts("2025-02-28T00:00:00"),
        ts("2025-03-30T00:00:00"),
    ]
    assert period_start(ts("2023-12-29T08:00:00"), Interval.MONTH, 2) == ts("2024-02-29T08:00:00")


def test_year_wraps():
    assert period_start(ts("2026-11-15T00:00:00"), Interval.MONTH, 3) == ts("2027-02-15T00:00:00")


def test_yearly_feb_29_anchor():
    got = starts(ts("2024-02-29T12:00:00"), Interval.YEAR, 5)
    assert got == [
        ts("2024-02-29T12:00:00"),
        ts("2025-02-28T12:00:00"),
        ts("2026-02-28T12:00:00"),
        ts("2027-02-28T12:00:00"),
        ts("2028-02-29T12:00:00"),
    ]


def test_period_index_at_boundaries():
    anchor = ts("2026-01-31T10:00:00")
    assert period_index_at(anchor, Interval.MONTH, anchor) == 0
    assert period_index_at(anchor, Interval.MONTH, ts("2026-02-28T09:59:59.999999")) == 0
    assert period_index_at(anchor, Interval.MONTH, ts("2026-02-28T10:00:00")) == 1
    assert period_index_at(anchor, Interval.MONTH, ts("2026-03-31T09:00:00")) == 1


anchors = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2100, 12, 31), timezones=st.just(UTC)
)
intervals = st.sampled_from(list(Interval))


@settings(max_examples=200, deadline=None)
@given(anchors, intervals, st.integers(0, 400))
def test_periods_strictly_increase_and_tile(anchor, interval, k):
    s0, e0 = period_bounds(anchor, interval, k)
    s1, e1 = period_bounds(anchor, interval, k + 1)
    assert s0 < e0 == s1 < e1  # no gap, no overlap
    # the anchor's time of day is kept
    assert (s0.hour, s0.minute, s0.second, s0.microsecond) == (
        anchor.hour,
        anchor.minute,
        anchor.second,
        anchor.microsecond,
    )
    assert s0.day == anchor.day or s0.day < anchor.day  # clamped only, never later
    # monthly periods are 28..31 days, yearly 365..366
    days = (e0 - s0) / timedelta(days=1)
    assert (28 <= days <= 31) if interval is Interval.MONTH else (365 <= days <= 366)


@settings(max_examples=200, deadline=None)
@given(anchors, intervals, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=20000)))
def test_every_instant_is_in_exactly_the_period_index_at(anchor, interval, offset):
    t = anchor + offset
    k = period_index_at(anchor, interval, t)
    start, end = period_bounds(anchor, interval, k)
    assert start <= t < end
