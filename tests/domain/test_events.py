from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from streams.domain.events import (
    Cancelled,
    InvalidEvent,
    PlanChanged,
    SubscriptionCreated,
    Usage,
    parse_event,
)

from .helpers import D, ts


def test_parse_all_types():
    assert parse_event(
        {
            "type": "subscription.created",
            "timestamp": "2026-01-31T10:00:00Z",
            "account_id": "a",
            "subscription_id": "s",
            "plan_id": "p",
        }
    ) == SubscriptionCreated(ts("2026-01-31T10:00:00"), "a", "s", "p")
    assert parse_event(
        {
            "type": "subscription.plan_changed",
            "timestamp": "2026-01-31T11:00:00+01:00",  # normalized to UTC
            "subscription_id": "s",
            "plan_id": "q",
            "account_id": "ignored",
        }
    ) == PlanChanged(ts("2026-01-31T10:00:00"), "s", "q")
    assert parse_event(
        {
            "type": "subscription.cancelled",
            "timestamp": "2026-01-31T10:00:00.250000Z",
            "subscription_id": "s",
            "mode": "end_of_period",
        }
    ) == Cancelled(ts("2026-01-31T10:00:00.25"), "s", "end_of_period")
    u = parse_event(
        {
            "type": "usage",
            "event_id": "e",
            "timestamp": "2026-01-31T10:00:00Z",
            "subscription_id": "s",
            "metric": "m",
            "quantity": "1.50",
        }
    )
    assert u == Usage("e", ts("2026-01-31T10:00:00"), "s", "m", D("1.50"))
    assert u.timestamp.utcoffset().total_seconds() == 0


BASE = {
    "type": "usage",
    "event_id": "e",
    "timestamp": "2026-01-31T10:00:00Z",
    "subscription_id": "s",
    "metric": "m",
    "quantity": "1",
}


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"type": "nope"}, "unknown event type 'nope'"),
        ({"quantity": "-1"}, "negative quantity '-1'"),
        ({"quantity": 0.5}, "JSON float"),
        ({"quantity": "abc"}, "invalid quantity"),
        ({"quantity": None}, "invalid quantity"),
        ({"timestamp": "2026-01-31T10:00:00"}, "no UTC offset"),
        ({"timestamp": "yesterday"}, "invalid ISO 8601"),
        ({"timestamp": 1769853600}, "'timestamp' must be a non-empty string"),
        ({"subscription_id": ""}, "non-empty string"),
        ({"event_id": None}, "'event_id' must be a non-empty string"),
    ],
)
def test_invalid_usage(patch, reason):
    with pytest.raises(InvalidEvent) as err:
        parse_event({**BASE, **patch})
    assert reason in err.value.reason


def test_missing_fields_and_non_objects():
    for key in ("event_id", "timestamp", "subscription_id", "metric", "quantity"):
        d = dict(BASE)
        del d[key]
        with pytest.raises(InvalidEvent, match=f"missing field '{key}'"):
            parse_event(d)
    with pytest.raises(InvalidEvent, match="JSON object"):
        parse_event([1, 2])
    with pytest.raises(InvalidEvent, match="mode"):
        parse_event(
            {
                "type": "subscription.cancelled",
                "timestamp": "2026-01-01T00:00:00Z",
                "subscription_id": "s",
                "mode": "later",
            }
        )


# --- the streaming path: the Avro decoder's datetime and Decimal ----------------------

AVRO = {
    **BASE,
    "timestamp": datetime(2026, 1, 31, 10, 0, 0, 250000, tzinfo=UTC),
    "quantity": Decimal("1.500000000"),  # Avro decimal(38, 9)
}


def test_avro_shaped_usage_is_accepted():
    u = parse_event(AVRO)
    assert u == Usage("e", ts("2026-01-31T10:00:00.25"), "s", "m", D("1.5"))
    assert u.timestamp.tzinfo is UTC
    # the same event as the offline rater's JSON strings
    assert u == parse_event({**BASE, "timestamp": "2026-01-31T10:00:00.25Z", "quantity": "1.5"})
    assert str(u.quantity) == "1.500000000"  # as exact as the string "1.500000000" gives


def test_aware_non_utc_datetime_is_normalized_to_utc():
    plus_one = timezone(timedelta(hours=1))
    u = parse_event({**AVRO, "timestamp": datetime(2026, 1, 31, 11, 0, tzinfo=plus_one)})
    assert u.timestamp == ts("2026-01-31T10:00:00") and u.timestamp.tzinfo is UTC


def test_datetime_timestamps_on_subscription_events():
    t = datetime(2026, 1, 31, 10, 0, tzinfo=UTC)
    assert parse_event(
        {
            "type": "subscription.created",
            "timestamp": t,
            "account_id": "a",
            "subscription_id": "s",
            "plan_id": "p",
            "mode": None,
        }
    ) == SubscriptionCreated(t, "a", "s", "p")
    with pytest.raises(InvalidEvent, match="no UTC offset"):
        parse_event(
            {
                "type": "subscription.cancelled",
                "timestamp": t.replace(tzinfo=None),
                "subscription_id": "s",
                "mode": "immediate",
            }
        )


def test_zero_and_negative_zero_decimal():
    assert parse_event({**AVRO, "quantity": Decimal("0E-9")}).quantity == 0
    q = parse_event({**AVRO, "quantity": Decimal("-0")}).quantity
    assert q == 0 and not q.is_signed()


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"timestamp": datetime(2026, 1, 31, 10, 0)}, "no UTC offset"),
        ({"quantity": 0.5}, "JSON float"),
        ({"quantity": Decimal("-1")}, "negative quantity Decimal('-1')"),
        ({"quantity": Decimal("-0.000000001")}, "negative quantity"),
        ({"quantity": Decimal("NaN")}, "must be finite"),
        ({"quantity": Decimal("sNaN")}, "must be finite"),
        ({"quantity": Decimal("Infinity")}, "must be finite"),
        ({"quantity": Decimal("1E+18")}, "too large"),
        ({"quantity": Decimal("1E-19")}, "more than 18 fractional digits"),
        ({"quantity": True}, "boolean"),
        ({"timestamp": date(2026, 1, 31)}, "'timestamp' must be a non-empty string"),
    ],
)
def test_invalid_avro_shaped_usage(patch, reason):
    with pytest.raises(InvalidEvent) as err:
        parse_event({**AVRO, **patch})
    assert reason in err.value.reason


def test_out_of_range_datetime_is_invalid_not_a_crash():
    edge = datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    with pytest.raises(InvalidEvent, match="out of range"):
        parse_event({**AVRO, "timestamp": edge})
    # as for the equivalent string
    with pytest.raises(InvalidEvent, match="out of range"):
        parse_event({**BASE, "timestamp": "0001-01-01T00:30:00+01:00"})
