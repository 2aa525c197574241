"""Cancellation rules (streams.domain.cancellations): the subscriptions a partition knows,
which cancellation is forwarded, and the deactivation record."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from streams.domain.cancellations import (
    Subscription,
    SubscriptionBook,
    cancellation_problem,
    cancellation_refusal,
    deactivation,
)

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
PUBLISHED_MS = int(AT.timestamp() * 1000)


def event(type_: str = "subscription.cancelled", **fields: Any) -> dict[str, Any]:
    return {"event_id": "e-1", "type": type_, "timestamp": AT, "account_id": "acct-1",
            "subscription_id": "sub-1", "plan_id": None, "mode": "immediate",
            "payment_method": None, **fields}  # fmt: skip


def test_the_book_keeps_the_first_creation_and_the_first_cancellation() -> None:
    book = SubscriptionBook()
    book.apply(event("subscription.cancelled", event_id="e-0"))  # unknown yet: nothing
    assert book.get("sub-1") is None
    book.apply(event("subscription.created", plan_id="basic", mode=None))
    book.apply(event("subscription.created", account_id="acct-2", mode=None))
    assert book.get("sub-1") == Subscription("acct-1")
    book.apply(event(event_id="e-1"))
    book.apply(event(event_id="e-2"))
    assert book.get("sub-1") == Subscription("acct-1", "e-1")


@pytest.mark.parametrize(
    ("sub", "reason"),
    [
        (Subscription("acct-1"), None),
        (Subscription("acct-1", "e-1"), None),  # the same event again: a repeat, accepted
        (Subscription("acct-1", "e-0"), "already_cancelled"),
        (Subscription("acct-2"), "account_mismatch"),
        (None, "unknown_subscription"),
    ],
)
def test_cancellation_refusal(sub: Subscription | None, reason: str | None) -> None:
    refusal = cancellation_refusal(event(), sub)
    assert (refusal[0] if refusal else None) == reason


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, None),
        ({"mode": "end_of_period"}, None),
        ({"type": "subscription.created"}, "not_a_cancellation"),
        ({"mode": "whenever"}, "invalid_mode"),
        ({"mode": None}, "invalid_mode"),
        ({"subscription_id": ""}, "invalid_event"),
        ({"timestamp": datetime(1999, 12, 31, tzinfo=UTC)}, "invalid_event"),
        ({"timestamp": datetime(2026, 3, 3, tzinfo=UTC)}, "invalid_event"),  # the future
    ],
)
def test_cancellation_problem(fields: dict[str, Any], reason: str | None) -> None:
    problem = cancellation_problem(event(**fields), PUBLISHED_MS)
    assert (problem[0] if problem else None) == reason


def test_a_deactivation_is_identified_by_its_cause() -> None:
    record = deactivation("acct-1", "sub-1", "refund:r-1", AT)
    assert record == {"entitlement_id": "refund:r-1:deactivate", "account_id": "acct-1",
                      "subscription_id": "sub-1", "action": "deactivate",
                      "cause": "refund:r-1", "timestamp": AT}  # fmt: skip
    assert (
        deactivation("acct-1", "sub-1", "cancellation:e-1", AT)["entitlement_id"]
        != (record["entitlement_id"])
    )
