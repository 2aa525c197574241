"""Bulk landing into the embedded warehouse: ClickHouse decodes the sink's Avro, not Python.

Decoding Avro record by record in Python costs ~60 µs per invoice, more than landing
it; ClickHouse's own Avro reader is far faster. A batch of one topic's messages is
therefore re-framed, without decoding, as an Avro object container file whose schema
wraps the topic's (``_partition``, ``_offset``, ``value``), one record per block, and
each landing table is filled by one ``INSERT ... SELECT ... FROM file(..., 'Avro')``.
A block's declared size makes ClickHouse refuse a truncated or garbled message; bytes
left over after a complete record are skipped (the Python decoder refuses those: the
processor that consumes the topic dead-letters such a message, the sink lands the
record it starts with).

Only messages written with the topic's current schema take this path; older writer
schemas, foreign bytes and any batch ClickHouse refuses go through the Python decoder,
which dead-letters what it cannot read. It needs ClickHouse to read a local file, i.e.
the embedded engine; against a server the sink lands through Python.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from streams.codec import HEADER_LEN, SCHEMAS_DIR, codec, load_schema_json
from streams.codec import avro_long as _varint

SYNC = b"streambill-sink!"  # 16 bytes; any value works, it only has to be the file's


def container_header(schema_name: str) -> bytes:
    value_schema = load_schema_json(SCHEMAS_DIR / f"{schema_name}.avsc")
    wrapper = orjson.dumps({
        "type": "record", "name": "Landed", "namespace": "io.streambill.sink",
        "fields": [
            {"name": "_partition", "type": "int"},
            {"name": "_offset", "type": "long"},
            {"name": "value", "type": value_schema},
        ],
    })  # fmt: skip
    meta = [(b"avro.schema", wrapper), (b"avro.codec", b"null")]
    out = [b"Obj\x01", _varint(len(meta))]
    for key, value in meta:
        out += [_varint(len(key)), key, _varint(len(value)), value]
    out += [_varint(0), SYNC]
    return b"".join(out)


def landing_sql(schema_name: str, columns: dict[str, list[str]], path: str) -> str:
    """The one statement that lands a container file of `schema_name` records."""
    source = "file('{}', 'Avro')".format(path.replace("\\", "\\\\").replace("'", "\\'"))
    table = BULK_TABLES[schema_name]
    if table == "invoices_avro":  # materialized views split it into invoices and lines
        return f"INSERT INTO invoices_avro SELECT _partition, _offset, value FROM {source}"
    cols = [c for c in columns[table] if not c.startswith("_")]
    values = ", ".join([*(f"value.{c}" for c in cols), "_partition", "_offset"])
    return (
        f"INSERT INTO {table} ({', '.join([*cols, '_partition', '_offset'])}) "
        f"SELECT {values} FROM {source}"
    )


# value schema -> the table its container files are inserted into (dead letters are
# few and carry raw bytes: they keep the Python path)
BULK_TABLES = {
    "invoice": "invoices_avro",  # -> invoices + invoice_lines (deploy/clickhouse/0003)
    "subscription_event": "subscription_events",
    "usage_event": "usage_events",
    "payment_result": "payment_attempts",
    "refund_result": "refunds",
    "entitlement": "entitlements",
}


class BulkLander:
    """Lands messages of the bulk topics through container files in `workdir`."""

    def __init__(self, client: Any, workdir: Path, columns: dict[str, list[str]]) -> None:
        self.client = client
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.columns = columns
        self.headers: dict[str, bytes] = {}

    def split(self, schema_name: str, msgs: list[Any]) -> tuple[list[Any], list[Any]]:
        """(messages written with the current schema, the others)."""
        current = codec(schema_name).header
        fast, slow = [], []
        for msg in msgs:
            value = msg.value()
            (fast if value and value[:HEADER_LEN] == current else slow).append(msg)
        return fast, slow

    def land(self, schema_name: str, msgs: list[Any]) -> None:
        """Insert the messages into their tables; raises if ClickHouse refuses them (a
        table may then hold part of them: landing again collapses into one row per id)."""
        header = self.headers.get(schema_name)
        if header is None:
            header = self.headers[schema_name] = container_header(schema_name)
        parts = [header]
        for msg in msgs:
            record = _varint(msg.partition()) + _varint(msg.offset()) + msg.value()[HEADER_LEN:]
            parts += [b"\x02", _varint(len(record)), record, SYNC]
        path = self.workdir / f"{schema_name}.avro"
        path.write_bytes(b"".join(parts))
        try:
            self.client.command(landing_sql(schema_name, self.columns, str(path)))
        finally:
            os.unlink(path)
