"""Avro encoding of every Kafka value, in Avro's single-object encoding.

Each value is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint + the
schemaless Avro body, so a consumer knows which schema wrote a record without a
schema registry, and can resolve an older writer schema against the current reader.
Schemas live in ``schemas/<name>.avsc``; versions that were replaced are kept in
``schemas/history/<name>.<n>.avsc`` so old records stay readable.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Context, Decimal
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from streams.config import SCHEMAS_DIR

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8


def avro_long(n: int) -> bytes:
    """Avro's encoding of a long: zig-zag, then base-128 little-endian varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_LONGS = [avro_long(n) for n in range(64)]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DOUBLE = struct.Struct("<d").pack


class LeftToFastavro(Exception):
    """A value a hand-written Avro writer leaves to fastavro (which writes it, or says
    what is wrong). The avro_* functions below raise it for any value they do not
    expect; they write exactly what fastavro writes for the others."""


def avro_string(value: Any) -> bytes:
    if type(value) is not str:
        raise LeftToFastavro
    b = value.encode()
    n = len(b)
    return (_SMALL_LONGS[n] if n < 64 else avro_long(n)) + b


def _bytes(value: Any) -> bytes:
    if type(value) is not bytes:
        raise LeftToFastavro
    n = len(value)
    return (_SMALL_LONGS[n] if n < 64 else avro_long(n)) + value


def _integer(bits: int) -> Callable[[Any], bytes]:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def write(value: Any) -> bytes:
        if type(value) is not int or not low <= value <= high:
            raise LeftToFastavro
        return _SMALL_LONGS[value] if 0 <= value < 64 else avro_long(value)

    return write


def _double(value: Any) -> bytes:
    if type(value) is not float:
        raise LeftToFastavro
    return _DOUBLE(value)


def _boolean(value: Any) -> bytes:
    if type(value) is not bool:
        raise LeftToFastavro
    return b"\x01" if value else b"\x00"


def avro_timestamp_micros(value: Any) -> bytes:
    if type(value) is not datetime or value.tzinfo is None:
        raise LeftToFastavro
    d = value - _EPOCH
    return avro_long((d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds)


def avro_decimal(precision: int, scale: int) -> Callable[[Any], bytes]:
    exact = Context(prec=precision + scale)  # scaleb of up to `precision` digits: exact

    def write(value: Any) -> bytes:
        """The unscaled value, big-endian two's complement, in (bit length of its
        magnitude + 8) // 8 bytes, after a length: as fastavro writes it."""
        if type(value) is not Decimal or not value.is_finite():
            raise LeftToFastavro
        sign, digits, exp = value.as_tuple()
        if len(digits) > precision or exp + scale < 0:  # type: ignore[operator]
            raise LeftToFastavro  # fastavro refuses it: let it say so
        magnitude = int(value.copy_abs().scaleb(scale, exact))
        n = (magnitude.bit_length() + 8) // 8
        return _SMALL_LONGS[n] + (-magnitude if sign else magnitude).to_bytes(n, "big", signed=True)

    return write


def _optional(write: Callable[[Any], bytes], null_first: bool) -> Callable[[Any], bytes]:
    null, some = (b"\x00", b"\x02") if null_first else (b"\x02", b"\x00")

    def write_optional(value: Any) -> bytes:
        return null if value is None else some + write(value)

    return write_optional


def _map(write: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def write_map(value: Any) -> bytes:
        """One block of every entry, then the end (0): as fastavro writes a map."""
        if type(value) is not dict:
            raise LeftToFastavro
        if not value:
            return b"\x00"
        parts = [avro_long(len(value))]
        for k, v in value.items():
            parts.append(avro_string(k))
            parts.append(write(v))
        parts.append(b"\x00")
        return b"".join(parts)

    return write_map


def _field_writer(t: Any) -> Callable[[Any], bytes] | None:
    """The writer of one field type, or None for a type the flat writer leaves alone."""
    if isinstance(t, list):
        if len(t) != 2 or "null" not in t:
            return None
        inner = _field_writer(t[1 - t.index("null")])
        return _optional(inner, t[0] == "null") if inner else None
    if isinstance(t, dict):
        logical = t.get("logicalType")
        if logical == "timestamp-micros" and t.get("type") == "long":
            return avro_timestamp_micros
        if logical == "decimal" and t.get("type") == "bytes":
            return avro_decimal(t["precision"], t.get("scale", 0))
        if t.get("type") == "map" and not logical:
            inner = _field_writer(t.get("values"))
            return _map(inner) if inner else None
        return None if logical else _field_writer(t.get("type"))
    return {
        "string": avro_string, "bytes": _bytes, "int": _integer(32), "long": _integer(64),
        "double": _double, "boolean": _boolean,
    }.get(t)  # fmt: skip


class FlatWriter:
    """Records of a flat schema (strings, bytes, ints, longs, doubles, booleans, decimals,
    timestamps, and optional ones of these) written as fastavro writes them, about twice
    as fast: one small function per field instead of fastavro's general walk. Any value
    it does not expect (a float for a decimal, a naive datetime, a missing field) is left
    to fastavro, which writes it or raises what it always raised."""

    def __init__(self, schema: dict) -> None:
        writers = [(f["name"], _field_writer(f["type"])) for f in schema["fields"]]
        self.fields: list[tuple[str, Callable[[Any], bytes]]] | None = (
            [(n, w) for n, w in writers if w is not None]
            if all(w is not None for _, w in writers)
            else None
        )
        # fields a record may leave out: fastavro writes their default, null
        self.null_default = frozenset(
            f["name"] for f in schema["fields"] if "default" in f and f["default"] is None
        )

    def write(self, record: dict[str, Any]) -> bytes | None:
        """The body, or None when fastavro must write this record."""
        if self.fields is None:
            return None
        try:
            return b"".join([write(record[name]) for name, write in self.fields])
        except KeyError:
            return self._write_with_defaults(record)
        except (LeftToFastavro, TypeError):
            return None

    def _write_with_defaults(self, record: dict[str, Any]) -> bytes | None:
        """A record that leaves out fields with a null default (one written before they
        existed, e.g. a version-1 subscription event): those are written as null."""
        if self.fields is None or not set(self.null_default).issuperset(
            name for name, _ in self.fields if name not in record
        ):
            return None
        try:
            get = record.get
            return b"".join([write(get(name)) for name, write in self.fields])
        except (LeftToFastavro, TypeError):
            return None


class DecodeError(ValueError):
    """A value that cannot be read; ``reason`` is a short code for the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_schema_json(path: Path) -> dict:
    return json.loads(path.read_text())


def schema_fingerprint(parsed: dict) -> bytes:
    return int(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"), 16).to_bytes(
        8, "little"
    )


class Codec:
    """Encoder/decoder for one schema (and the older versions of it in schemas/history)."""

    def __init__(self, name: str, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.name = name
        self.schema = parse_schema(load_schema_json(schemas_dir / f"{name}.avsc"))
        self.header = MAGIC + schema_fingerprint(self.schema)
        self.flat = FlatWriter(self.schema)
        # fingerprint -> writer schema; the current one is read without resolution
        self.writers: dict[bytes, dict | None] = {self.header[2:]: None}
        for old in sorted((schemas_dir / "history").glob(f"{name}.*.avsc")):
            parsed = parse_schema(load_schema_json(old))
            self.writers.setdefault(schema_fingerprint(parsed), parsed)

    def encode(self, record: dict[str, Any]) -> bytes:
        body = self.flat.write(record)
        if body is not None:
            return self.header + body
        buf = io.BytesIO()
        buf.write(self.header)
        fastavro.schemaless_writer(buf, self.schema, record)
        return buf.getvalue()

    def decode(self, data: bytes | None) -> dict[str, Any]:
        if not data:
            raise DecodeError("empty_value", f"{self.name}: no value (tombstone or empty)")
        if data[:2] != MAGIC or len(data) < HEADER_LEN:
            raise DecodeError("invalid_avro", f"{self.name}: not Avro single-object encoding")
        try:
            writer = self.writers[data[2:HEADER_LEN]]
        except KeyError:
            raise DecodeError(
                "unknown_schema", f"{self.name}: writer fingerprint {data[2:HEADER_LEN].hex()}"
            ) from None
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            if writer is None:
                record = fastavro.schemaless_reader(buf, self.schema, None)
            else:
                record = fastavro.schemaless_reader(buf, writer, self.schema)
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise DecodeError("invalid_avro", f"{self.name}: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(
                "invalid_avro", f"{self.name}: {len(data) - buf.tell()} trailing bytes"
            )
        return record

    def leading_strings(self, data: bytes | None, n: int) -> tuple[str, ...] | None:
        """The first n fields of a record written with the current schema, when they are
        all strings, read without decoding the rest (a reader that needs two ids of a
        large record, e.g. an invoice with its lines); None when this cannot be done
        (another writer schema, not Avro), and the caller decodes the whole record."""
        fields = self.schema["fields"][:n]
        if len(fields) < n or any(f["type"] != "string" for f in fields):
            raise ValueError(f"{self.name}: the first {n} fields are not all strings")
        if not data or data[:HEADER_LEN] != self.header:
            return None
        out, pos, end = [], HEADER_LEN, len(data)
        for _ in range(n):
            length = shift = 0
            while True:  # zig-zag varint
                if pos >= end or shift > 63:
                    return None
                byte = data[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            length = (length >> 1) ^ -(length & 1)
            if length < 0 or pos + length > end:
                return None
            try:
                out.append(data[pos : pos + length].decode())
            except UnicodeDecodeError:
                return None
            pos += length
        return tuple(out)


@cache
def codec(name: str) -> Codec:
    return Codec(name)
