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
        # fingerprint -> writer schema; the current one is read without resolution
        self.writers: dict[bytes, dict | None] = {self.header[2:]: None}
        for old in sorted((schemas_dir / "history").glob(f"{name}.*.avsc")):
            parsed = parse_schema(load_schema_json(old))
            self.writers.setdefault(schema_fingerprint(parsed), parsed)

    def encode(self, record: dict[str, Any]) -> bytes:
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
