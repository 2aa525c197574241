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
