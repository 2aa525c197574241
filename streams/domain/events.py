"""Typed input events and their validation from decoded JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import orjson

from streams.domain.catalog import CatalogError, Plan, is_country, parse_plan
from streams.domain.money import InvalidDecimal, UnknownCurrency, minor_units, parse_decimal
from streams.domain.timestamps import InvalidTimestamp, parse_timestamp, timestamp_from_datetime

CancelMode = Literal["immediate", "end_of_period"]
CANCEL_MODES: tuple[str, ...] = ("immediate", "end_of_period")
ExistingMode = Literal["keep", "next_period"]
EXISTING_MODES: tuple[str, ...] = ("keep", "next_period")
CouponDuration = Literal["once", "repeating", "forever"]
COUPON_DURATIONS: tuple[str, ...] = ("once", "repeating", "forever")


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
    received_at: datetime | None = None  # v2: its arrival, when not its timestamp
    # v2: property -> value as text (a non-string JSON value as "\0" + its JSON), for
    # unique_count; None values are left out
    properties: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Paused:
    timestamp: datetime
    subscription_id: str


@dataclass(frozen=True, slots=True)
class Resumed:
    timestamp: datetime
    subscription_id: str


@dataclass(frozen=True, slots=True)
class PlanPublished:
    timestamp: datetime
    plan: Plan  # validated; its version number is given when it is published
    existing: ExistingMode = "keep"


@dataclass(frozen=True, slots=True)
class PlanRetired:
    timestamp: datetime
    plan_id: str


@dataclass(frozen=True, slots=True)
class CustomerUpdated:
    """An upsert: None fields keep their value."""

    timestamp: datetime
    account_id: str
    country: str | None = None
    tax_exempt: bool | None = None
    grace_hours: int | None = None


@dataclass(frozen=True, slots=True)
class CouponApplied:
    timestamp: datetime
    subscription_id: str
    coupon_id: str
    percent_off: Decimal | None  # exactly one of percent_off and amount_off
    amount_off: Decimal | None
    duration: CouponDuration
    periods: int | None = None  # the number of invoices of a repeating coupon


@dataclass(frozen=True, slots=True)
class CreditGranted:
    timestamp: datetime
    credit_id: str
    account_id: str
    currency: str
    amount: Decimal


Event = SubscriptionCreated | PlanChanged | Cancelled | Usage
# version 2 of the contract: not (yet) on the streaming rater's topics
LifecycleEvent = Paused | Resumed
CatalogEvent = PlanPublished | PlanRetired
AccountEvent = CustomerUpdated | CreditGranted
AnyEvent = Event | LifecycleEvent | CatalogEvent | AccountEvent | CouponApplied

# A usage event as the rating processor reads it from Avro, before (and mostly instead of)
# a Usage: (event_id, timestamp µs, account_id, subscription_id, metric, quantity in
# integer 10^-9 units). See rating.UsageTally.
UsageRecord = tuple[str, int, str, str, str, int]

EVENT_TYPES: dict[str, type] = {
    "subscription.created": SubscriptionCreated,
    "subscription.plan_changed": PlanChanged,
    "subscription.cancelled": Cancelled,
    "usage": Usage,
    "subscription.paused": Paused,
    "subscription.resumed": Resumed,
    "plan.published": PlanPublished,
    "plan.retired": PlanRetired,
    "customer.updated": CustomerUpdated,
    "coupon.applied": CouponApplied,
    "credit.granted": CreditGranted,
}


def _str(d: dict, key: str) -> str:
    if key not in d:
        raise InvalidEvent(f"missing field {key!r}")
    v = d[key]
    if not isinstance(v, str) or not v:
        raise InvalidEvent(f"field {key!r} must be a non-empty string")
    return v


def _timestamp(d: dict, key: str = "timestamp") -> datetime:
    v = d.get(key)
    try:
        if isinstance(v, datetime):
            return timestamp_from_datetime(v)
        return parse_timestamp(_str(d, key))
    except InvalidTimestamp as e:
        raise InvalidEvent(f"{key}: {e}" if key != "timestamp" else str(e)) from None


def _properties(d: dict) -> Mapping[str, str] | None:
    raw = d.get("properties")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidEvent("field 'properties' must be an object")
    props = {}
    for k, v in raw.items():
        if v is None:
            continue
        props[k] = (
            v
            if isinstance(v, str)
            else "\0" + orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
        )
    return props


def _amount(d: dict, key: str, *, optional: bool = False) -> Decimal | None:
    if key not in d or d[key] is None:
        if optional:
            return None
        raise InvalidEvent(f"missing field {key!r}")
    try:
        v = parse_decimal(d[key])
    except InvalidDecimal as e:
        raise InvalidEvent(f"invalid {key}: {e}") from None
    if v <= 0:
        raise InvalidEvent(f"{key} must be greater than 0, got {d[key]!r}")
    return v


def _int(d: dict, key: str, *, minimum: int) -> int:
    v = d[key]
    if type(v) is not int or v < minimum:
        raise InvalidEvent(f"field {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _parse_v2(etype: str, d: dict, ts: datetime) -> Any:
    if etype in ("subscription.paused", "subscription.resumed"):
        cls = Paused if etype == "subscription.paused" else Resumed
        return cls(ts, _str(d, "subscription_id"))
    if etype == "plan.published":
        existing = d.get("existing", "keep")
        if existing not in EXISTING_MODES:
            raise InvalidEvent(f"existing must be keep or next_period, got {existing!r}")
        try:
            plan = parse_plan(d.get("plan"), "plan")
        except CatalogError as e:
            raise InvalidEvent(f"invalid plan: {e}") from None
        return PlanPublished(ts, plan, existing)
    if etype == "plan.retired":
        return PlanRetired(ts, _str(d, "plan_id"))
    if etype == "customer.updated":
        country = d.get("country")
        if "country" in d and not is_country(country):
            raise InvalidEvent(f"country must be an ISO 3166-1 alpha-2 code, got {country!r}")
        exempt = d.get("tax_exempt")
        if "tax_exempt" in d and not isinstance(exempt, bool):
            raise InvalidEvent(f"field 'tax_exempt' must be a boolean, got {exempt!r}")
        grace = _int(d, "grace_hours", minimum=0) if "grace_hours" in d else None
        return CustomerUpdated(ts, _str(d, "account_id"), country, exempt, grace)
    if etype == "coupon.applied":
        percent = _amount(d, "percent_off", optional=True)
        amount = _amount(d, "amount_off", optional=True)
        if (percent is None) == (amount is None):
            raise InvalidEvent("a coupon has exactly one of percent_off and amount_off")
        if percent is not None and percent > 100:
            raise InvalidEvent(f"percent_off must be at most 100, got {d['percent_off']!r}")
        duration = d.get("duration")
        if duration not in COUPON_DURATIONS:
            raise InvalidEvent(f"duration must be once, repeating or forever, got {duration!r}")
        periods = None
        if duration == "repeating":
            if "periods" not in d:
                raise InvalidEvent("a repeating coupon needs 'periods'")
            periods = _int(d, "periods", minimum=1)
        sub = _str(d, "subscription_id")
        return CouponApplied(ts, sub, _str(d, "coupon_id"), percent, amount, duration, periods)
    # credit.granted
    currency = _str(d, "currency")
    try:
        digits = minor_units(currency)
    except UnknownCurrency as e:
        raise InvalidEvent(str(e)) from None
    amount = _amount(d, "amount")
    if amount.as_tuple().exponent < -digits:  # type: ignore[operator]
        raise InvalidEvent(f"amount {d['amount']!r} has more digits than {currency} has")
    return CreditGranted(ts, _str(d, "credit_id"), _str(d, "account_id"), currency, amount)


def parse_event(d: Any) -> AnyEvent:
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
        received = d.get("received_at")
        if received is None and "properties" not in d:
            return Usage(event_id, ts, sub, metric, quantity)
        received_at = None if received is None else _timestamp(d, "received_at")
        return Usage(event_id, ts, sub, metric, quantity, received_at, _properties(d))
    if etype not in EVENT_TYPES:
        raise InvalidEvent(f"unknown event type {etype!r}")
    ts = _timestamp(d)
    if EVENT_TYPES[etype] not in (SubscriptionCreated, PlanChanged, Cancelled):
        return _parse_v2(etype, d, ts)
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


V1_EVENTS = (SubscriptionCreated, PlanChanged, Cancelled, Usage)


def parse_v1_event(d: Any) -> Event:
    """parse_event for the streaming path, whose topics carry version-1 events only (yet):
    a version-2 type is refused as unknown there rather than reaching a state machine
    that does not handle it."""
    event = parse_event(d)
    if not isinstance(event, V1_EVENTS):
        raise InvalidEvent(
            f"unknown event type {d.get('type')!r} for the streaming rater "
            "(version 2 of the rating contract is rated offline only, yet)"
        )
    return event
