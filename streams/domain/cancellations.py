"""Cancellations: which ``subscription.cancelled`` request is forwarded to billing, and the
entitlement deactivations that refunds and cancellations cause.

A cancellation is judged by the subscription's history on its partition
(``billing.subscriptions``): it must exist, belong to the requesting account and not be
cancelled already by another event. Pure: the lane processor feeds the history in and
writes the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from streams.domain.events import InvalidEvent, parse_event
from streams.domain.validation import timestamp_problem


class Subscription(NamedTuple):
    account_id: str
    cancelled_by: str | None = None  # event_id of its cancellation


@dataclass
class SubscriptionBook:
    """One partition's subscriptions, kept as plain tuples (untracked by the cyclic
    garbage collector, as ``streams.domain.refunds.RefundLedger`` explains)."""

    known: dict[str, tuple] = field(default_factory=dict)  # -> Subscription's fields

    def get(self, subscription_id: str) -> Subscription | None:
        fields = self.known.get(subscription_id)
        return None if fields is None else Subscription._make(fields)

    def record(self, subscription_id: str, sub: Subscription) -> None:
        self.known[subscription_id] = tuple(sub)

    def apply(self, event: dict[str, Any]) -> None:
        """A billing.subscriptions record: the first creation and the first cancellation
        of a subscription count."""
        sub_id = event["subscription_id"]
        sub = self.get(sub_id)
        if event["type"] == "subscription.created" and sub is None:
            self.record(sub_id, Subscription(event["account_id"]))
        elif event["type"] == "subscription.cancelled" and sub and not sub.cancelled_by:
            self.record(sub_id, sub._replace(cancelled_by=event["event_id"]))


def cancellation_problem(event: dict[str, Any], published: int | None) -> tuple[str, str] | None:
    """Why a decoded record of billing.cancellations is dead-lettered whatever the state
    knows: (reason, detail), or None. What is forwarded must be an event the rating
    processor accepts (the same validation), or the entitlement would be deactivated for a
    cancellation that is never billed. `published`: the record's Kafka timestamp (ms)."""
    if event["type"] != "subscription.cancelled":
        return "not_a_cancellation", f"type {event['type']!r}"
    if event["mode"] not in ("immediate", "end_of_period"):
        return "invalid_mode", f"mode {event['mode']!r}"
    try:
        parsed = parse_event(event)
    except InvalidEvent as exc:
        return "invalid_event", exc.reason
    problem = timestamp_problem(parsed.timestamp, published)
    if problem:
        return "invalid_event", f"{problem}: {parsed.timestamp.isoformat()}"
    return None


def cancellation_refusal(event: dict[str, Any], sub: Subscription | None) -> tuple[str, str] | None:
    """Why a valid cancellation is dead-lettered given its subscription as the partition
    knows it (None: unknown), or None."""
    if sub is None:
        return "unknown_subscription", event["subscription_id"]
    if sub.account_id != event["account_id"]:
        return "account_mismatch", f"{event['subscription_id']} belongs to another account"
    if sub.cancelled_by not in (None, event["event_id"]):
        return "already_cancelled", f"by {sub.cancelled_by}"
    return None


def deactivation(account_id: str, subscription_id: str, cause: str, at: datetime) -> dict[str, Any]:
    """A billing.entitlements record; cause: ``refund:<refund_id>`` or
    ``cancellation:<event_id>``. Its id is the cause's: a repeat deactivates again under
    the same id."""
    return {
        "entitlement_id": f"{cause}:deactivate",
        "account_id": account_id,
        "subscription_id": subscription_id,
        "action": "deactivate",
        "cause": cause,
        "timestamp": at,
    }
