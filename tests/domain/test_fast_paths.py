"""The optimized hot paths behave exactly like the straightforward versions."""

import calendar
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.catalog import Aggregation
from streams.domain.money import UnknownCurrency, minor_units, round_money
from streams.domain.periods import Interval, add_months, period_bounds, period_start
from streams.domain.rating import SubscriptionState, apply_event, close_periods, next_period_end

from .helpers import D, catalog, created, ts, usage

# A version-1 state as written before the optimizations (and before payment methods):
# still read; written back as version 2, which only appends the payment method.
GOLDEN = (
    b'[1,"s1","a1","basic","EUR","month",1769853600000000,1,1772272800000000,"active",'
    b'{"api_calls":{"sum":"1000.5"},"seats":{"max":"3"}},["e1","e2"],0]'
)
GOLDEN_V2 = GOLDEN.replace(b"[1,", b"[2,", 1)[:-1] + b',"tok_9"]'


def test_golden_state_bytes_still_read_and_written_identically():
    s = SubscriptionState.from_bytes(GOLDEN)
    assert s.anchor == ts("2026-01-31T10:00:00") and s.anchor.tzinfo is UTC
    assert s.segment_start == ts("2026-02-28T10:00:00")
    assert s.interval is Interval.MONTH
    assert s.usage == {"api_calls": {"sum": D("1000.5")}, "seats": {"max": D(3)}}
    assert s.seen_event_ids == {"e1", "e2"}
    assert s.period_bounds() == (ts("2026-02-28T10:00:00"), ts("2026-03-31T10:00:00"))
    assert s.payment_method is None
    assert s.to_bytes() == GOLDEN_V2.replace(b'"tok_9"', b"null")
    v2 = SubscriptionState.from_bytes(GOLDEN_V2)
    assert v2.payment_method == "tok_9" and v2.to_bytes() == GOLDEN_V2


@pytest.mark.parametrize(
    "raw",
    [
        GOLDEN.replace(b"[1,", b"[2,", 1),
        GOLDEN.replace(b'"active"', b'"paused"'),
        GOLDEN.replace(b'"month"', b'"week"'),
        GOLDEN.replace(b'"month"', b'["month"]'),
        GOLDEN.replace(b",0]", b"]"),
        GOLDEN_V2[:-9] + b"]",
        b"{}",
    ],
)
def test_corrupt_state_bytes_raise_value_error(raw):
    with pytest.raises(ValueError):
        SubscriptionState.from_bytes(raw)


def test_period_memo_follows_index_and_anchor():
    s, _, _ = apply_event(None, created("2024-01-31T10:00:00"), catalog())
    assert s is not None
    for k in range(30):
        s.period_index = k
        assert s.period_bounds() == period_bounds(s.anchor, s.interval, k)
    s.anchor = ts("2024-03-15T00:00:00")
    assert s.period_bounds() == period_bounds(s.anchor, s.interval, 29)
    s.interval = Interval.YEAR
    assert next_period_end(s) == period_start(s.anchor, Interval.YEAR, 30)
    # the memo is neither serialized nor compared
    assert SubscriptionState.from_bytes(s.to_bytes()) == s


def test_close_periods_over_many_periods_uses_the_right_bounds():
    s, _, _ = apply_event(None, created("2024-01-31T10:00:00"), catalog())
    s, _, _ = apply_event(s, usage("2024-02-01T00:00:00", "5", "e1"), catalog())
    s, invoices = close_periods(s, ts("2025-01-31T10:00:00"), catalog())
    ends = [inv.issued_at for inv in invoices]
    assert ends == [
        period_start(ts("2024-01-31T10:00:00"), Interval.MONTH, k) for k in range(1, 13)
    ]
    assert ends[0] == ts("2024-02-29T10:00:00")
    for k, inv in enumerate(invoices, start=1):
        (flat,) = [ln for ln in inv.lines if ln.kind == "flat"]
        assert (flat.period_start, flat.period_end) == period_bounds(s.anchor, s.interval, k)
    assert next_period_end(s) == period_start(s.anchor, s.interval, 13)


def reference_add_months(anchor: datetime, months: int) -> datetime:
    index = anchor.year * 12 + (anchor.month - 1) + months
    year, month0 = divmod(index, 12)
    day = min(anchor.day, calendar.monthrange(year, month0 + 1)[1])
    return anchor.replace(year=year, month=month0 + 1, day=day)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9998, 12, 31)),
    st.integers(0, 2000),
)
def test_add_months_matches_calendar_reference(anchor, months):
    anchor = anchor.replace(tzinfo=UTC)
    try:
        expected = reference_add_months(anchor, months)
    except ValueError:
        with pytest.raises(ValueError):
            add_months(anchor, months)
        return
    assert add_months(anchor, months) == expected


def test_period_start_accepts_plain_strings_and_refuses_unknown_intervals():
    a = ts("2024-01-31T10:00:00")
    assert period_start(a, "year", 1) == period_start(a, Interval.YEAR, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        period_start(a, "week", 1)  # type: ignore[arg-type]
    assert add_months(a, 1) == a + timedelta(days=29)


def test_plan_derived_views():
    plan = catalog().plan("basic")
    assert [c.charge_id for c in plan.flat_charges] == ["base"]
    assert [c.charge_id for c in plan.usage_charges] == ["api", "seats"]
    assert plan.aggregations() == {
        "api_calls": (Aggregation.SUM,),
        "seats": (Aggregation.MAX,),
    }
    assert dict(plan.aggregation_names()) == {"api_calls": ("sum",), "seats": ("max",)}
    assert plan == catalog().plan("basic") and hash(plan) == hash(catalog().plan("basic"))


def test_currency_cache_keeps_refusing_unknown_codes():
    assert minor_units("KWD") == 3 and minor_units("KWD") == 3
    for _ in range(2):
        with pytest.raises(UnknownCurrency):
            minor_units("XYZ")
        with pytest.raises(UnknownCurrency):
            round_money(D("1.005"), "XYZ")
    with pytest.raises(UnknownCurrency):
        minor_units(["EUR"])  # type: ignore[arg-type]
    assert str(round_money(D("1.005"), "EUR")) == "1.00"
    assert str(round_money(D("2.5"), "JPY")) == "2"
