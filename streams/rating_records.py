"""The rating processor's records: its inputs decoded and validated, its bill-run commands
checked, its invoices encoded. Pure functions of bytes (and the fast codecs beside the
reference one, tested byte for byte against it in tests/test_rating_codecs.py)."""

from __future__ import annotations

import functools
from typing import Any

from streams.codec import DecodeError, codec
from streams.domain.events import Event, InvalidEvent, parse_v1_event
from streams.domain.timestamps import to_micros
from streams.domain.validation import MAX_FUTURE_MS, MAX_FUTURE_TEXT, timestamp_problem
from streams.fast_codec import InvoiceWriter, UsageReader
from streams.invoice_record import invoice_record
from streams.kafka.topics import CONTROL, INVOICES, SUBSCRIPTIONS, USAGE

# what this processor dead-letters, by reason: the codec's (empty_value, invalid_avro,
# unknown_schema); invalid_event (decoded, but not a valid event); rejected (a valid event
# the subscription's state refuses: unknown subscription, duplicate creation, late event,
# another account's subscription, ...); invalid_bill_run (a bill-run command it cannot run)
DEAD_LETTER_REASONS = frozenset({
    "empty_value", "invalid_avro", "unknown_schema", "invalid_event", "rejected",
    "invalid_bill_run",
})  # fmt: skip


def decode_input(
    value: bytes | None, usage: bool, published_ms: int | None = None
) -> tuple[Event | None, str | None, tuple[str, str] | None]:
    """One record of billing.usage (usage=True) or billing.subscriptions, decoded and
    validated: (event, the record's account_id, None), or (None, None, (reason, detail))
    for the dead letters. Pure; never raises."""
    try:
        if usage:
            rec = codec(USAGE.schema).decode(value)
            rec["type"] = "usage"
        else:
            rec = codec(SUBSCRIPTIONS.schema).decode(value)
        event = parse_v1_event(rec)
    except DecodeError as exc:
        return None, None, (exc.reason, exc.detail)
    except InvalidEvent as exc:
        return None, None, ("invalid_event", exc.reason)
    problem = timestamp_problem(event.timestamp, published_ms)
    if problem:
        return None, None, ("invalid_event", f"{problem}: {event.timestamp.isoformat()}")
    return event, rec["account_id"], None


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
