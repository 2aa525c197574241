"""The rating processor's records: its inputs decoded and validated (and, the other way,
an event as the record of its input topic), its bill-run commands checked, its invoices
encoded. Pure functions of bytes (and the fast codecs beside the reference one, tested
byte for byte against it in tests/test_rating_codecs.py).

Version 2 of the rating contract travels on the same two topics: billing.usage (usage,
with its ``properties``) and billing.subscriptions (the subscription events, coupons, and
the account events credit.granted and customer.updated, whose ``subscription_id`` is "").
Amounts and percentages are decimal strings there, so their digits arrive as written. A
usage event's arrival (the contract's ``received_at``) is its record's Kafka timestamp.
Plan events belong on billing.catalog, never on these topics."""

from __future__ import annotations

import functools
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, overload

from streams.codec import DecodeError, codec
from streams.domain.events import (
    EVENT_TYPES,
    AnyEvent,
    Cancelled,
    CouponApplied,
    CreditGranted,
    CustomerUpdated,
    Event,
    InvalidEvent,
    Paused,
    PlanChanged,
    PlanPublished,
    PlanRetired,
    Resumed,
    SubscriptionCreated,
    Usage,
    parse_event,
    parse_v1_event,
)
from streams.domain.timestamps import from_micros, to_micros
from streams.domain.validation import MAX_FUTURE_MS, MAX_FUTURE_TEXT, timestamp_problem
from streams.fast_codec import InvoiceWriter, UsageReader
from streams.invoice_record import invoice_record
from streams.kafka.topics import CONTROL, INVOICES, SUBSCRIPTIONS, USAGE, TopicSpec

# what this processor dead-letters, by reason: the codec's (empty_value, invalid_avro,
# unknown_schema); invalid_event (decoded, but not a valid event); rejected (a valid event
# the subscription's state refuses: unknown subscription, duplicate creation, late event,
# another account's subscription, ...); invalid_bill_run (a bill-run command it cannot run)
DEAD_LETTER_REASONS = frozenset({
    "empty_value", "invalid_avro", "unknown_schema", "invalid_event", "rejected",
    "invalid_bill_run",
})  # fmt: skip


CONTRACTS = (1, 2)
PLAN_TYPES = frozenset({"plan.published", "plan.retired"})
PLAN_EVENTS_DETAIL = "plan events belong on billing.catalog"
# the fields version 2 added to the input schemas: null when the event has none, which
# parse_event must see as absent (a customer.updated with a null country keeps its country)
V2_FIELDS = (
    "coupon_id", "percent_off", "amount_off", "duration", "periods", "credit_id", "currency",
    "amount", "country", "tax_exempt", "grace_hours", "properties",
)  # fmt: skip


Decoded = tuple[AnyEvent | None, str | None, tuple[str, str] | None]


@overload
def decode_input(
    value: bytes | None, usage: bool, published_ms: int | None = None, *, contract: Literal[1] = 1
) -> tuple[Event | None, str | None, tuple[str, str] | None]: ...
@overload
def decode_input(
    value: bytes | None, usage: bool, published_ms: int | None = None, *, contract: int
) -> Decoded: ...
def decode_input(
    value: bytes | None, usage: bool, published_ms: int | None = None, *, contract: int = 1
) -> Decoded:
    """One record of billing.usage (usage=True) or billing.subscriptions, decoded and
    validated: (event, the record's account_id, None), or (None, None, (reason, detail))
    for the dead letters. Pure; raises nothing for any value (ValueError for a contract
    version that does not exist).

    ``contract=1`` (the version-1 rater): the record read as before version 2's fields:
    version-1 events only (any other type is an ``invalid_event``), usage without its
    properties. ``contract=2``: every type these topics carry (plan events are
    ``invalid_event``: they belong on billing.catalog), null fields absent (a
    customer.updated keeps what it does not give), usage with its properties and, when
    ``published_ms`` (the record's Kafka timestamp: the event's arrival) is another
    millisecond than its timestamp's, its ``received_at`` (``arrival``)."""
    if contract not in CONTRACTS:
        raise ValueError(f"rating contract version {contract!r}: one of {CONTRACTS}")
    try:
        if usage:
            rec = codec(USAGE.schema).decode(value)
            rec["type"] = "usage"
        else:
            rec = codec(SUBSCRIPTIONS.schema).decode(value)
        if contract == 1:
            for name in V2_FIELDS:  # the record as version 1 knew it
                rec.pop(name, None)
            event: AnyEvent = parse_v1_event(rec)
        else:
            event = parse_event(_v2_fields(rec))
    except DecodeError as exc:
        return None, None, (exc.reason, exc.detail)
    except InvalidEvent as exc:
        return None, None, ("invalid_event", exc.reason)
    problem = timestamp_problem(event.timestamp, published_ms)
    if problem:
        return None, None, ("invalid_event", f"{problem}: {event.timestamp.isoformat()}")
    if contract == 2 and isinstance(event, Usage) and published_ms is not None:
        try:
            received = arrival(event.timestamp, published_ms)
        except (OverflowError, ValueError):  # a Kafka timestamp no datetime can hold
            return None, None, ("invalid_event", f"record timestamp {published_ms} out of range")
        if received is not None:
            event = Usage(event.event_id, event.timestamp, event.subscription_id, event.metric,
                          event.quantity, received, event.properties)  # fmt: skip
    return event, rec["account_id"], None


def _v2_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """A decoded record as parse_event reads it: version 2's null fields absent."""
    if rec["type"] in PLAN_TYPES:
        raise InvalidEvent(PLAN_EVENTS_DETAIL)
    return {k: v for k, v in rec.items() if v is not None or k not in V2_FIELDS}


def arrival_us(timestamp_us: int, published_ms: int | None) -> int:
    """When an event arrived (µs), as the rating processor takes it: its record's timestamp,
    or its own timestamp when that lies in the record's millisecond (Kafka stamps records
    in ms: an event is never taken to arrive before it happened) or the record has none."""
    if published_ms is None or timestamp_us // 1000 == published_ms:
        return timestamp_us
    return published_ms * 1000


def arrival(timestamp: datetime, published_ms: int) -> datetime | None:
    """A usage event's ``received_at`` on Kafka: its record's timestamp (epoch ms), or None
    when that is the millisecond of the event's own timestamp (Kafka stamps records in
    milliseconds: it then arrived at its timestamp). Raises OverflowError for a record
    timestamp beyond the datetimes."""
    us = to_micros(timestamp)
    at = arrival_us(us, published_ms)  # the one rule of when a record's event arrived
    return None if at == us else from_micros(at)


def arrival_ms(event: AnyEvent) -> int:
    """The Kafka timestamp (epoch ms) to stamp an event's record with: its arrival
    (a usage event's ``received_at`` if it has one, else its timestamp), so that
    ``decode_input(..., contract=2)`` gives the event back."""
    at = event.received_at if isinstance(event, Usage) and event.received_at else event.timestamp
    return to_micros(at) // 1000


_TYPE_OF = {cls: name for name, cls in EVENT_TYPES.items()}
_AVRO_INT = (-(2**31), 2**31 - 1)


def _decimal_text(d: Decimal) -> str:
    return f"{d:f}"  # digits as they are, never an exponent


def _avro_int(name: str, n: int | None) -> int | None:
    if n is not None and not _AVRO_INT[0] <= n <= _AVRO_INT[1]:
        raise ValueError(f"{name} {n} does not fit an Avro int")
    return n


def input_record(event: AnyEvent, account_id: str, event_id: str) -> tuple[TopicSpec, dict]:
    """An event as the record of its input topic: (USAGE, record) for usage,
    (SUBSCRIPTIONS, record) for every other type; what ``decode_input(..., contract=2)``
    decodes back into the same event (stamp the record with ``arrival_ms(event)``).

    ``account_id``: the account the record belongs to (its key), for the events that do
    not name one; a creation, credit.granted and customer.updated carry their own.
    ``event_id``: the record's id (usage carries its own). ValueError for plan events
    (billing.catalog's) and for what the schema cannot hold (an int beyond Avro's)."""
    if isinstance(event, Usage):
        props = None if event.properties is None else dict(event.properties)
        return USAGE, {"event_id": event.event_id, "timestamp": event.timestamp,
                       "account_id": account_id, "subscription_id": event.subscription_id,
                       "metric": event.metric, "quantity": event.quantity,
                       "properties": props}  # fmt: skip
    if isinstance(event, PlanPublished | PlanRetired):
        raise ValueError(PLAN_EVENTS_DETAIL)
    etype = _TYPE_OF.get(type(event))
    if etype is None:
        raise ValueError(f"not an event of the rating contract: {event!r}")
    rec: dict[str, Any] = {
        "event_id": event_id, "type": etype, "timestamp": event.timestamp,
        "account_id": account_id, "subscription_id": "", "plan_id": None, "mode": None,
        "payment_method": None, "coupon_id": None, "percent_off": None, "amount_off": None,
        "duration": None, "periods": None, "credit_id": None, "currency": None,
        "amount": None, "country": None, "tax_exempt": None, "grace_hours": None,
    }  # fmt: skip
    if isinstance(event, CreditGranted):
        rec |= {"account_id": event.account_id, "credit_id": event.credit_id,
                "currency": event.currency, "amount": _decimal_text(event.amount)}  # fmt: skip
        return SUBSCRIPTIONS, rec
    if isinstance(event, CustomerUpdated):
        rec |= {"account_id": event.account_id, "country": event.country,
                "tax_exempt": event.tax_exempt,
                "grace_hours": _avro_int("grace_hours", event.grace_hours)}  # fmt: skip
        return SUBSCRIPTIONS, rec
    rec["subscription_id"] = event.subscription_id
    if isinstance(event, SubscriptionCreated):
        rec |= {"account_id": event.account_id, "plan_id": event.plan_id,
                "payment_method": event.payment_method}  # fmt: skip
    elif isinstance(event, PlanChanged):
        rec["plan_id"] = event.plan_id
    elif isinstance(event, Cancelled):
        rec["mode"] = event.mode
    elif isinstance(event, CouponApplied):
        rec |= {
            "coupon_id": event.coupon_id,
            "percent_off": None if event.percent_off is None else _decimal_text(event.percent_off),
            "amount_off": None if event.amount_off is None else _decimal_text(event.amount_off),
            "duration": event.duration, "periods": _avro_int("periods", event.periods),
        }  # fmt: skip
    else:
        assert isinstance(event, Paused | Resumed), event
    return SUBSCRIPTIONS, rec


@functools.cache
def usage_reader() -> UsageReader:
    """decode_input's fast path for ordinary usage records (None: take decode_input)."""
    return UsageReader(USAGE.schema)


@functools.cache
def invoice_writer() -> InvoiceWriter:
    """An invoice's Avro value: the bytes codec(INVOICES.schema) writes for invoice_record."""
    encode = codec(INVOICES.schema).encode
    return InvoiceWriter(INVOICES.schema, lambda *args: encode(invoice_record(*args)))


def decode_bill_run(
    value: bytes | None, input_topics: tuple[str, ...], published_ms: int | None = None
) -> dict[str, Any]:
    """A bill-run command, decoded and checked; raises DecodeError (reason
    invalid_bill_run for a record that decodes but cannot be run: a barrier on a topic this
    processor does not consume would never be reached, and an `until` more than MAX_FUTURE
    after the run was published would invoice periods, up to years of them, in advance)."""
    rec = codec(CONTROL.schema).decode(value)
    unknown = sorted(set(rec["barrier"]) - set(input_topics))
    if unknown:
        raise DecodeError("invalid_bill_run", f"barrier on topics not rated: {unknown}")
    if any(offset < 0 for offset in rec["barrier"].values()):
        raise DecodeError("invalid_bill_run", f"negative barrier offset in {rec['barrier']}")
    until_ms = to_micros(rec["until"]) // 1000
    issued_ms = published_ms if published_ms is not None else to_micros(rec["issued_at"]) // 1000
    if until_ms > issued_ms + MAX_FUTURE_MS:
        raise DecodeError("invalid_bill_run", f"until {rec['until'].isoformat()} is more than "
                          f"{MAX_FUTURE_TEXT} after the run was issued")  # fmt: skip
    return rec
