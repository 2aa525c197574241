"""Typed input events and their validation from decoded JSON."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from streams.domain.money import InvalidDecimal, parse_decimal
from streams.domain.timestamps import InvalidTimestamp, parse_timestamp, timestamp_from_datetime

CancelMode = Literal["immediate", "end_of_period"]
CANCEL_MODES: tuple[str, ...] = ("immediate", "end_of_period")


class InvalidEvent(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SubscriptionCreated:
    timestamp: datetime
    account_id: str
    subscription_id: str
    plan_id: str
    payment_method: str | None = None  # a gateway token: where invoices are collected from


@dataclass(frozen=True, slots=True)
class PlanChanged:
    timestamp: datetime
    subscription_id: str
    plan_id: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    timestamp: datetime
    subscription_id: str
    mode: CancelMode


@dataclass(frozen=True, slots=True)
class Usage:
    event_id: str
    timestamp: datetime
    subscription_id: str
    metric: str
    quantity: Decimal


Event = SubscriptionCreated | PlanChanged | Cancelled | Usage

# A usage event as the rating processor reads it from Avro, before (and mostly instead of)
# a Usage: (event_id, timestamp µs, account_id, subscription_id, metric, quantity in
# integer 10^-9 units). See rating.UsageTally.
UsageRecord = tuple[str, int, str, str, str, int]

EVENT_TYPES: dict[str, type] = {
    "subscription.created": SubscriptionCreated,
    "subscription.plan_changed": PlanChanged,
    "subscription.cancelled": Cancelled,
    "usage": Usage,
}


def _str(d: dict, key: str) -> str:
    if key not in d:
        raise InvalidEvent(f"missing field {key!r}")
    v = d[key]
    if not isinstance(v, str) or not v:
        raise InvalidEvent(f"field {key!r} must be a non-empty string")
    return v


def _timestamp(d: dict) -> datetime:
    v = d.get("timestamp")
    try:
        if isinstance(v, datetime):
            return timestamp_from_datetime(v)
        return parse_timestamp(_str(d, "timestamp"))
    except InvalidTimestamp as e:
        raise InvalidEvent(str(e)) from None


def parse_event(d: Any) -> Event:
    """Validate a decoded event. Extra keys (e.g. account_id on non-created events in
    the streaming pipeline) are ignored.

    Two input shapes, validated alike: decoded JSON (the offline rater's contract:
    ``timestamp`` an ISO 8601 string with an offset, ``quantity`` a decimal string or
    an integer) and decoded Avro (the streaming path: ``timestamp`` an aware
    ``datetime``, ``quantity`` a ``decimal.Decimal``). Naive datetimes, floats,
    negative, non-finite or over-long quantities are refused in both.
    """
    if not isinstance(d, dict):
        raise InvalidEvent("event must be a JSON object")
    etype = d.get("type")
    if etype == "usage":  # the hot path first
        ts = _timestamp(d)
        sub = _str(d, "subscription_id")
        event_id = _str(d, "event_id")
        metric = _str(d, "metric")
        if "quantity" not in d:
            raise InvalidEvent("missing field 'quantity'")
        raw = d["quantity"]
        try:
            quantity = parse_decimal(raw, allow_negative=True)
        except InvalidDecimal as e:
            raise InvalidEvent(f"invalid quantity: {e}") from None
        if quantity < 0:
            raise InvalidEvent(f"negative quantity {raw!r}")
        return Usage(event_id, ts, sub, metric, quantity)
    if etype not in EVENT_TYPES:
        raise InvalidEvent(f"unknown event type {etype!r}")
    ts = _timestamp(d)
    sub = _str(d, "subscription_id")
    if etype == "subscription.created":
        method = d.get("payment_method")
        if method is not None and (not isinstance(method, str) or not method):
            raise InvalidEvent("field 'payment_method' must be a non-empty string or null")
        return SubscriptionCreated(ts, _str(d, "account_id"), sub, _str(d, "plan_id"), method)
    if etype == "subscription.plan_changed":
        return PlanChanged(ts, sub, _str(d, "plan_id"))
    mode = _str(d, "mode")
    if mode not in CANCEL_MODES:
        raise InvalidEvent(f"cancellation mode must be immediate or end_of_period, got {mode!r}")
    return Cancelled(ts, sub, mode)  # type: ignore[arg-type]
