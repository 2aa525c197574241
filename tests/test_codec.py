"""Avro codec (pure: no broker); schema evolution is tests/test_schema_evolution.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.codec import Codec, DecodeError, codec
from streams.config import SCHEMAS_DIR
from streams.kafka.topics import ALL_TOPICS

SCHEMA_FILES = sorted(SCHEMAS_DIR.glob("*.avsc"))


def test_every_topic_schema_exists() -> None:
    for topic in ALL_TOPICS:
        if topic.schema:
            assert (SCHEMAS_DIR / f"{topic.schema}.avsc").exists(), topic.schema


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.stem)
def test_money_is_never_a_float(path: Path) -> None:
    text = path.read_text()
    assert '"float"' not in text and '"double"' not in text.replace(
        '"latency_ms", "type": "double"', ""
    )


def test_old_writer_schema_is_resolved(tmp_path: Path) -> None:
    """A record written with a kept older version decodes under the current schema."""
    current = json.loads((SCHEMAS_DIR / "subscription_event.avsc").read_text())
    old = {**current, "fields": [f for f in current["fields"] if f["name"] != "payment_method"]}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "subscription_event.avsc").write_text(json.dumps(old))
    (tmp_path / "new" / "history").mkdir(parents=True)
    (tmp_path / "new" / "subscription_event.avsc").write_text(json.dumps(current))
    (tmp_path / "new" / "history" / "subscription_event.1.avsc").write_text(json.dumps(old))
    old_codec = Codec("subscription_event", tmp_path / "old")
    created_at = datetime(2026, 1, 1, tzinfo=UTC)
    data = old_codec.encode({
        "event_id": "e", "type": "subscription.created", "timestamp": created_at,
        "account_id": "a", "subscription_id": "s", "plan_id": "p", "mode": None,
    })  # fmt: skip
    decoded = Codec("subscription_event", tmp_path / "new").decode(data)
    assert decoded["payment_method"] is None and decoded["plan_id"] == "p"


def usage(quantity: Decimal) -> dict:
    return {
        "event_id": "e1", "timestamp": datetime(2026, 3, 1, 12, tzinfo=UTC), "account_id": "a",
        "subscription_id": "s", "metric": "api_calls", "quantity": quantity,
    }  # fmt: skip


@given(st.decimals(min_value=0, max_value=10**20, places=9, allow_nan=False))
@settings(max_examples=200)
def test_usage_round_trip_is_exact(q: Decimal) -> None:
    c = codec("usage_event")
    assert c.decode(c.encode(usage(q)))["quantity"] == q


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_random_bytes_never_decode_silently(data: bytes) -> None:
    try:
        codec("usage_event").decode(data)
    except DecodeError as exc:
        assert exc.reason in {"empty_value", "invalid_avro", "unknown_schema"}


def test_truncated_record_is_rejected() -> None:
    c = codec("usage_event")
    data = c.encode(usage(Decimal("12.5")))
    for cut in range(1, len(data)):
        with pytest.raises(DecodeError):
            c.decode(data[:cut])


@given(
    ids=st.tuples(*[st.text(max_size=40)] * 3),
    cut=st.integers(min_value=0, max_value=400),
)
@settings(max_examples=300)
def test_leading_strings_read_what_decode_reads(ids: tuple[str, str, str], cut: int) -> None:
    """The lane reads an invoice's first ids without decoding its lines: the same values
    as a full decode, or None (then it decodes) for anything it cannot read that way."""
    from tests.samples import sample

    inv = codec("invoice")
    record = {**sample("invoice", 3), "invoice_id": ids[0], "account_id": ids[1],
              "subscription_id": ids[2]}  # fmt: skip
    data = inv.encode(record)
    assert inv.leading_strings(data, 3) == ids
    assert inv.leading_strings(data, 1) == ids[:1]
    truncated = inv.leading_strings(data[:cut], 3)
    assert truncated is None or truncated == ids  # never a wrong value
    other_writer = b"\xc3\x01" + bytes(8) + data[10:]
    assert inv.leading_strings(other_writer, 3) is None
    assert inv.leading_strings(b"", 3) is None
    with pytest.raises(ValueError, match="not all strings"):
        inv.leading_strings(data, 6)  # the sixth field is a timestamp


FLAT_SCHEMAS = ["alert", "dead_letter", "entitlement", "payment_request", "payment_result",
                "payment_run", "refund_request", "refund_result", "subscription_event",
                "usage_event"]  # fmt: skip


def _fastavro_body(c: Codec, record: dict) -> bytes:
    import io

    import fastavro

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, c.schema, record)
    return buf.getvalue()


def _value_strategy(t: object) -> st.SearchStrategy:
    """Values of one field type, ordinary and extreme (the flat writer's domain)."""
    if isinstance(t, list):
        inner = next(x for x in t if x != "null")
        return st.one_of(st.none(), _value_strategy(inner))
    if isinstance(t, dict):
        if t.get("logicalType") == "timestamp-micros":
            return st.datetimes(timezones=st.just(UTC))
        if t.get("logicalType") == "decimal":
            places = t.get("scale", 0)
            bound = Decimal("9" * (t["precision"] - places) + "." + "9" * places)  # exact
            fits = lambda d: len(d.as_tuple().digits) <= t["precision"]  # noqa: E731
            return st.decimals(-bound, bound, places=places, allow_nan=False).filter(fits)
        if t.get("type") == "map":
            return st.dictionaries(st.text(max_size=20), _value_strategy(t["values"]), max_size=4)
        return _value_strategy(t["type"])
    return {
        "string": st.text(max_size=80), "bytes": st.binary(max_size=80),
        "int": st.integers(-(2**31), 2**31 - 1), "long": st.integers(-(2**63), 2**63 - 1),
        "double": st.floats(allow_nan=False), "boolean": st.booleans(),
    }[t]  # fmt: skip


@pytest.mark.parametrize("name", FLAT_SCHEMAS)
@settings(max_examples=150)
@given(data=st.data())
def test_the_flat_writer_writes_what_fastavro_writes(name: str, data: st.DataObject) -> None:
    c = codec(name)
    assert c.flat.fields is not None  # the fast path is the one under test
    record = {f["name"]: data.draw(_value_strategy(f["type"]), label=f["name"])
              for f in c.schema["fields"]}  # fmt: skip
    # fields with a null default may be left out (a record written before they existed)
    for f in c.schema["fields"]:
        if "default" in f and f["default"] is None and data.draw(st.booleans(), label=f["name"]):
            del record[f["name"]]
    body = c.flat.write(record)
    assert body is not None and body == _fastavro_body(c, record)
    assert c.encode(record) == c.header + body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", 12.5),  # a float for a decimal
        ("amount", Decimal("1.0000000001")),  # more digits than the scale
        ("amount", Decimal("NaN")),
        ("completed_at", datetime(2026, 1, 1)),  # naive
        ("attempt", True),  # a bool for an int
        ("attempt", 2**31),  # out of an int's range
        ("latency_ms", 3),  # an int for a double: fastavro writes it
        ("gateway_reference", 7),  # no branch of the union
        ("invoice_id", ...),  # missing, with no default (one with a null default is null)
    ],
)
def test_values_the_flat_writer_does_not_expect_are_left_to_fastavro(field, value) -> None:
    from tests.samples import sample

    c = codec("payment_result")
    record = sample("payment_result", 3)
    if value is ...:
        del record[field]
    else:
        record[field] = value
    assert c.flat.write(record) is None
    try:
        expected = c.header + _fastavro_body(c, record)
    except Exception as exc:  # whatever fastavro raises, encode raises too
        with pytest.raises(type(exc)):
            c.encode(record)
    else:
        assert c.encode(record) == expected


def test_the_flat_writer_is_off_for_nested_schemas() -> None:
    assert codec("invoice").flat.fields is None  # lines: an array of records
    assert codec("bill_run").flat.fields is None  # a map and an array
