"""The rating processor's two hot codecs, written out by hand for the current schemas.

- ``UsageReader``: a billing.usage record of the current writer schema, read and validated
  straight into a ``Usage`` (what ``rating.decode_input`` does through fastavro and
  ``parse_event``). It takes only what is plainly valid and answers None for anything
  else, which then goes through the general path: it never decides a dead letter.
- ``InvoiceWriter``: an ``Invoice`` written as the bytes fastavro writes for its
  ``invoice_record`` (the same single-object header, the same minimal varints, decimals
  of as many bytes as fastavro gives them); anything it does not expect goes to fastavro.

Both check at start-up that the schema is the one they were written for, and step aside
(always the general path) if it is not. ``tests/test_rating_codecs.py`` holds each one
side by side with fastavro, on hostile and ordinary records.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

from streams.codec import HEADER_LEN, codec
from streams.codec import avro_long as _long
from streams.domain.events import Usage
from streams.domain.invoice import Invoice
from streams.domain.money import MAX_INTEGER_DIGITS
from streams.domain.timestamps import to_micros

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_UNSCALED = 10 ** (MAX_INTEGER_DIGITS + 9)  # quantities from 10^18 are refused


def schema_layout(fields: list[dict[str, Any]]) -> tuple:
    """(name, type) of each field, logical types as (type, logicalType, precision,
    scale), records and arrays unfolded: what a hand-written codec depends on."""
    out = []
    for f in fields:
        t = f["type"]
        if isinstance(t, dict):
            if t["type"] == "array":
                t = ("array", schema_layout(t["items"]["fields"]))
            else:
                t = (t["type"], t.get("logicalType"),
                     *(t[k] for k in ("precision", "scale") if k in t))  # fmt: skip
        elif isinstance(t, list):
            t = tuple(t)
        out.append((f["name"], t))
    return tuple(out)


class UsageReader:
    """billing.usage records of the current writer schema, read without fastavro."""

    FIELDS = (
        ("event_id", "string"),
        ("timestamp", ("long", "timestamp-micros")),
        ("account_id", "string"),
        ("subscription_id", "string"),
        ("metric", "string"),
        ("quantity", ("bytes", "decimal", 38, 9)),
    )

    def __init__(self, schema: str, earliest_us: int, max_future_ms: int) -> None:
        c = codec(schema)
        self.header = c.header
        self.enabled = schema_layout(c.schema["fields"]) == self.FIELDS
        self.earliest_us, self.max_future_ms = earliest_us, max_future_ms
        self.decimals = Context(prec=38)  # as fastavro reads decimal(38, 9)

    def read(self, data: bytes | None, published_ms: int | None) -> tuple[Usage, str, int] | None:
        """(event, account_id, timestamp µs) of a plainly valid record: every string
        non-empty with a one-byte length (under 64 bytes) and valid UTF-8, a quantity
        above 0 and below 10^18, a timestamp from the earliest accepted to at most
        max_future_ms after publication, no trailing byte. None for anything else."""
        if not self.enabled or not data or data[:HEADER_LEN] != self.header:
            return None
        size = len(data)
        strings = []
        try:
            pos = HEADER_LEN
            for i in range(5):
                if i == 1:  # the timestamp: a zig-zag varint, at most 9 bytes (no wrap-around)
                    us = shift = 0
                    while True:
                        b = data[pos]
                        pos += 1
                        us |= (b & 0x7F) << shift
                        if b < 0x80:
                            break
                        shift += 7
                        if shift > 56:
                            return None
                    continue
                b = data[pos]  # a string's length: one byte, zig-zag, 1 to 63
                if b & 0x81 or b == 0:
                    return None
                end = pos + 1 + (b >> 1)
                if end > size:
                    return None
                strings.append(data[pos + 1 : end].decode())
                pos = end
            b = data[pos]  # the quantity's length: 1 to 12 bytes hold any unscaled < 10^27
            if b & 0x81 or b == 0 or b > 24:
                return None
            pos += 1
            if pos + (b >> 1) != size:  # truncated, or trailing bytes
                return None
            unscaled = int.from_bytes(data[pos:], "big", signed=True)
        except (IndexError, UnicodeDecodeError):
            return None
        us = (us >> 1) ^ -(us & 1)
        if not 0 < unscaled < _MAX_UNSCALED or us < self.earliest_us:
            return None
        if published_ms is not None and us // 1000 > published_ms + self.max_future_ms:
            return None
        quantity = Decimal(unscaled).scaleb(-9, self.decimals)  # exact: < 10^27
        event_id, account_id, subscription_id, metric = strings
        usage = Usage(event_id, _EPOCH + timedelta(0, 0, us), subscription_id, metric, quantity)
        return usage, account_id, us


_SMALL_LONGS = [_long(n) for n in range(64)]
_SCALE = 9
_SCALED = Context(prec=38 + _SCALE)  # scaleb by 9 of up to 38 digits: exact


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
            except _Unexpected:
                pass
        return self.fallback(inv, plan_id, payment_method)

    def _encode(self, inv: Invoice, plan_id: str, payment_method: str | None) -> bytes:
        out = [self.header]
        put, string, decimal = out.append, _string, _decimal
        put(string(inv.invoice_id))
        put(string(inv.account_id))
        put(string(inv.subscription_id))
        put(string(plan_id))
        put(string(inv.currency))
        put(_long(_micros(inv.issued_at)))
        put(string(inv.reason))
        lines = inv.lines
        if lines:
            put(_long(len(lines)))
            for ln in lines:
                put(string(ln.charge_id))
                put(string(ln.kind))
                put(_long(_micros(ln.period_start)))
                put(_long(_micros(ln.period_end)))
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
            raise _Unexpected
        return b"".join(out)


class _Unexpected(Exception):
    """A value the hand-written encoder leaves to fastavro."""


def _string(s: str) -> bytes:
    if type(s) is not str:
        raise _Unexpected
    b = s.encode()
    n = len(b)
    return (_SMALL_LONGS[n] if n < 64 else _long(n)) + b


def _micros(dt: datetime) -> int:
    if type(dt) is not datetime or dt.tzinfo is None:
        raise _Unexpected
    return to_micros(dt)


def _decimal(d: Decimal) -> bytes:
    """decimal(38, 9) as fastavro writes it: the unscaled value, big-endian two's
    complement, in (bit length of its magnitude + 8) // 8 bytes, after a length."""
    if type(d) is not Decimal or not d.is_finite():
        raise _Unexpected
    sign, digits, exp = d.as_tuple()
    if len(digits) > 38 or exp + _SCALE < 0:
        raise _Unexpected  # fastavro refuses it: let it say so
    magnitude = int(d.copy_abs().scaleb(_SCALE, _SCALED))
    n = (magnitude.bit_length() + 8) // 8
    raw = (-magnitude if sign else magnitude).to_bytes(n, "big", signed=True)
    return _SMALL_LONGS[n] + raw
