"""The rating processor's two hot codecs, written out by hand for the current schemas: an
adapter beside ``streams.codec`` (fastavro), which they match byte for byte.

- ``UsageReader``: a billing.usage record of the current writer schema, read and validated
  into a plain tuple (``usage_event`` makes of it the ``Usage`` that ``rating_records.decode_input``
  gives through fastavro and ``parse_event``). It takes only what is plainly valid and
  answers None for anything else, which then goes through the general path: it never
  decides a dead letter.
- ``InvoiceWriter``: an ``Invoice`` written as the bytes fastavro writes for its
  ``invoice_record`` (the same single-object header, the same minimal varints, decimals
  of as many bytes as fastavro gives them); anything it does not expect goes to fastavro.

Both check at start-up that the schema is the one they were written for, and step aside
(always the general path) if it is not. ``tests/test_rating_codecs.py`` holds each one
side by side with fastavro, on hostile and ordinary records.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

from streams.codec import (
    HEADER_LEN,
    LeftToFastavro,
    avro_decimal,
    avro_string,
    avro_timestamp_micros,
    codec,
)
from streams.codec import avro_long as _long
from streams.domain.events import Usage, UsageRecord
from streams.domain.invoice import Invoice
from streams.domain.validation import EARLIEST_US, MAX_FUTURE_MS, QUANTITY_LIMIT
from streams.invoice_record import line_period

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_UNSCALED = QUANTITY_LIMIT * 10**9  # the quantity rule, in 10^-9 units


def schema_layout(fields: list[dict[str, Any]]) -> tuple:
    """(name, type) of each field, logical types as (type, logicalType, precision,
    scale), records, arrays and maps unfolded: what a hand-written codec depends on."""

    def layout(t: Any) -> Any:
        if isinstance(t, dict):
            if t["type"] == "array":
                return ("array", schema_layout(t["items"]["fields"]))
            if t["type"] == "map":
                return ("map", layout(t["values"]))
            return (t["type"], t.get("logicalType"),
                    *(t[k] for k in ("precision", "scale") if k in t))  # fmt: skip
        if isinstance(t, list):
            return tuple(layout(branch) for branch in t)
        return t

    return tuple((f["name"], layout(f["type"])) for f in fields)


class UsageReader:
    """billing.usage records of the current writer schema, read without fastavro."""

    FIELDS = (
        ("event_id", "string"),
        ("timestamp", ("long", "timestamp-micros")),
        ("account_id", "string"),
        ("subscription_id", "string"),
        ("metric", "string"),
        ("quantity", ("bytes", "decimal", 38, 9)),
        ("properties", ("null", ("map", "string"))),
    )

    def __init__(self, schema: str) -> None:
        c = codec(schema)
        self.header = c.header
        self.enabled = schema_layout(c.schema["fields"]) == self.FIELDS

    def read(self, data: bytes | None, published_ms: int | None) -> UsageRecord | None:
        """(event_id, timestamp µs, account_id, subscription_id, metric, quantity in 10^-9
        units) of a plainly valid record: every string non-empty with a one-byte length
        (under 64 bytes) and valid UTF-8, a timestamp of an 8-byte varint (1978 to 3111)
        that ``streams.domain.validation`` accepts, a quantity above 0 that it accepts, null
        properties (the record's last byte, 0: its union's null branch), no trailing byte.
        None for anything else (properties included: version 2's unique_count reads them,
        through the general path). No Usage, datetime or Decimal is built here:
        ``usage_event`` makes the event when one is needed."""
        if not self.enabled or not data or not data.startswith(self.header):
            return None
        try:
            # each string: a one-byte zig-zag length (1 to 63), then its bytes; a string cut
            # short makes the next read (of a length, the timestamp) fail
            n = data[_H]
            if n & 0x81 or not n:
                return None
            pos = _H + 1 + (n >> 1)
            event_id = data[_H + 1 : pos].decode()
            # the timestamp: a zig-zag varint, taken only as 8 bytes (7 with the continuation
            # bit, the 8th without), its 7-bit groups gathered in three steps of masks
            (x,) = _U64(data, pos)
            if x & 0x8080808080808080 != 0x0080808080808080:
                return None
            x = (x & 0x007F007F007F007F) | ((x & 0x7F007F007F007F00) >> 1)
            x = (x & 0x00003FFF00003FFF) | ((x & 0x3FFF00003FFF0000) >> 2)
            x = (x & 0x000000000FFFFFFF) | ((x & 0x0FFFFFFF00000000) >> 4)
            pos += 8
            n = data[pos]
            if n & 0x81 or not n:
                return None
            start, pos = pos + 1, pos + 1 + (n >> 1)
            account_id = data[start:pos].decode()
            n = data[pos]
            if n & 0x81 or not n:
                return None
            start, pos = pos + 1, pos + 1 + (n >> 1)
            subscription_id = data[start:pos].decode()
            n = data[pos]
            if n & 0x81 or not n:
                return None
            start, pos = pos + 1, pos + 1 + (n >> 1)
            metric = data[start:pos].decode()
            # the quantity's length: 1 to 12 bytes hold any unscaled < 10^27; then null
            # properties (one 0 byte, the union's first branch) and the end
            n = data[pos]
            if n & 0x81 or not n or n > 24 or pos + 2 + (n >> 1) != len(data) or data[-1]:
                return None
            unscaled = int.from_bytes(data[pos + 1 : -1], "big", signed=True)
        except (IndexError, UnicodeDecodeError, struct.error):
            return None
        us = (x >> 1) ^ -(x & 1)
        if not 0 < unscaled < _MAX_UNSCALED or us < EARLIEST_US:
            return None
        if published_ms is not None and us // 1000 > published_ms + MAX_FUTURE_MS:
            return None
        return event_id, us, account_id, subscription_id, metric, unscaled


_H = HEADER_LEN
_U64 = struct.Struct("<Q").unpack_from
_DECIMALS = Context(prec=38)  # as fastavro reads decimal(38, 9)


def usage_event(rec: UsageRecord) -> Usage:
    """The domain event of a record UsageReader took: what decode_input gives for it."""
    event_id, us, _, subscription_id, metric, unscaled = rec
    quantity = Decimal(unscaled).scaleb(-9, _DECIMALS)  # exact: < 10^27
    return Usage(event_id, _EPOCH + timedelta(0, 0, us), subscription_id, metric, quantity)


_SCALE = 9
_decimal = avro_decimal(38, _SCALE)


class InvoiceWriter:
    """Invoices in the bytes fastavro writes for the current invoice schema."""

    LINE = (
        ("charge_id", "string"),
        ("kind", "string"),
        ("period_start", ("long", "timestamp-micros")),
        ("period_end", ("long", "timestamp-micros")),
        ("quantity", ("bytes", "decimal", 38, _SCALE)),
        ("amount", ("bytes", "decimal", 38, _SCALE)),
    )
    FIELDS = (
        ("invoice_id", "string"),
        ("account_id", "string"),
        ("subscription_id", "string"),
        ("plan_id", "string"),
        ("currency", "string"),
        ("issued_at", ("long", "timestamp-micros")),
        ("reason", "string"),
        ("lines", ("array", LINE)),
        ("total", ("bytes", "decimal", 38, _SCALE)),
        ("payment_method", ("null", "string")),
        ("finalized_at", ("null", ("long", "timestamp-micros"))),
        ("credit_applied", ("null", ("bytes", "decimal", 38, _SCALE))),
        ("amount_due", ("null", ("bytes", "decimal", 38, _SCALE))),
    )

    def __init__(self, schema: str, fallback: Callable[[Invoice, str, str | None], bytes]) -> None:
        c = codec(schema)
        self.header = c.header
        self.enabled = schema_layout(c.schema["fields"]) == self.FIELDS
        self.fallback = fallback  # fastavro, through the codec

    def encode(self, inv: Invoice, plan_id: str, payment_method: str | None) -> bytes:
        if self.enabled:
            try:
                return self._encode(inv, plan_id, payment_method)
            except LeftToFastavro:
                pass
        return self.fallback(inv, plan_id, payment_method)

    def _encode(self, inv: Invoice, plan_id: str, payment_method: str | None) -> bytes:
        out = [self.header]
        put, string, decimal = out.append, avro_string, _decimal
        put(string(inv.invoice_id))
        put(string(inv.account_id))
        put(string(inv.subscription_id))
        put(string(plan_id))
        put(string(inv.currency))
        put(avro_timestamp_micros(inv.issued_at))
        put(string(inv.reason))
        lines = inv.lines
        if lines:
            put(_long(len(lines)))
            for ln in lines:
                put(string(ln.charge_id))
                put(string(ln.kind))
                start, end = line_period(inv, ln)
                put(avro_timestamp_micros(start))
                put(avro_timestamp_micros(end))
                put(decimal(ln.quantity))
                put(decimal(ln.amount))
        put(b"\x00")  # end of the array
        put(decimal(inv.total))
        if payment_method is None:
            put(b"\x00")
        elif type(payment_method) is str:
            put(b"\x02")
            put(string(payment_method))
        else:
            raise LeftToFastavro
        # never null when written now (null stands for records written before they existed)
        put(b"\x02")
        put(avro_timestamp_micros(inv.finalized_at or inv.issued_at))
        put(b"\x02")
        put(decimal(inv.credit_applied))
        put(b"\x02")
        put(decimal(inv.due))
        return b"".join(out)
