"""Version 2 of the rating contract on the input topics: every event type that travels on
billing.usage and billing.subscriptions, encoded with the topics' schemas (the reference
codec) and decoded by ``decode_input(..., contract=2)`` into exactly the event
``parse_event`` gives for the contract's JSON; ``input_record`` writes the same bytes as a
record built field by field from that JSON. The worked examples of the contract
(tests/data/contract-v2/) are the input: each of their lines that is not a plan event."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from fastavro.schema import parse_schema

from streams.codec import MAGIC, codec, schema_fingerprint
from streams.config import SCHEMAS_DIR
from streams.domain.events import (
    EVENT_TYPES,
    CouponApplied,
    CreditGranted,
    CustomerUpdated,
    Paused,
    PlanRetired,
    SubscriptionCreated,
    Usage,
    parse_event,
)
from streams.domain.timestamps import parse_timestamp, to_micros
from streams.kafka.topics import SUBSCRIPTIONS, USAGE
from streams.rating_records import (
    PLAN_EVENTS_DETAIL,
    PLAN_TYPES,
    arrival,
    arrival_ms,
    decode_input,
    input_record,
)

EXAMPLES = Path(__file__).parent / "data" / "contract-v2"
TOPIC_TYPES = sorted(set(EVENT_TYPES) - PLAN_TYPES)  # what the two input topics carry
T = datetime(2026, 3, 1, 12, tzinfo=UTC)


def example_lines() -> list[tuple[str, dict[str, Any], str]]:
    """(id, the JSON event, the account its record is keyed by) of every line of the
    examples; a subscription's events go under the account that created it."""
    out = []
    for folder in sorted(p for p in EXAMPLES.iterdir() if p.is_dir()):
        owners: dict[str, str] = {}
        for n, text in enumerate((folder / "events.jsonl").read_text().splitlines(), start=1):
            if not text.strip():
                continue
            raw = orjson.loads(text)
            if raw["type"] == "subscription.created":
                owners.setdefault(raw["subscription_id"], raw["account_id"])
            account = raw.get("account_id") or owners.get(raw.get("subscription_id", ""), "")
            out.append((f"{folder.name}:{n}:{raw['type']}", raw, account))
    return out


LINES = example_lines()
TOPIC_LINES = [line for line in LINES if line[1]["type"] not in PLAN_TYPES]


def internal_properties(raw: dict[str, Any]) -> dict[str, str]:
    """The contract's properties as the topic carries them: strings as they are, any other
    value "\\0" + its JSON with sorted keys, null values left out."""
    return {k: v if isinstance(v, str) else "\0" + orjson.dumps(v, option=orjson.OPT_SORT_KEYS)
            .decode() for k, v in raw.items() if v is not None}  # fmt: skip


def record_from_json(raw: dict[str, Any], account: str, event_id: str) -> dict[str, Any]:
    """The Avro record of a JSON event, field by field from the topic's schema (not
    through input_record): every JSON field of the schema as the schema holds it; the
    others null; an account event's subscription_id empty."""
    usage = raw["type"] == "usage"
    schema = json.loads((SCHEMAS_DIR / f"{(USAGE if usage else SUBSCRIPTIONS).schema}.avsc")
                        .read_text())  # fmt: skip
    rec: dict[str, Any] = {}
    for field in schema["fields"]:
        name = field["name"]
        value = raw.get(name)
        if name == "timestamp":
            value = parse_timestamp(value)
        elif name == "quantity":
            value = Decimal(value)
        elif name == "properties" and value is not None:
            value = internal_properties(value)
        elif name == "event_id" and not usage:
            value = event_id
        elif name == "account_id":
            value = raw.get("account_id", account)
        elif name == "subscription_id":
            value = raw.get("subscription_id", "")
        rec[name] = value
    return rec


def encoded(raw: dict[str, Any], account: str, event_id: str) -> tuple[bool, bytes]:
    """(usage?, the record's value) of a JSON event, through the reference codec."""
    usage = raw["type"] == "usage"
    return usage, codec((USAGE if usage else SUBSCRIPTIONS).schema).encode(
        record_from_json(raw, account, event_id)
    )


@pytest.mark.parametrize(("line", "raw", "account"), TOPIC_LINES, ids=[x[0] for x in TOPIC_LINES])
def test_every_example_event_round_trips(line: str, raw: dict[str, Any], account: str) -> None:
    """JSON -> Avro record (by the schema) -> decode_input(contract=2): the very event
    parse_event gives for the JSON, under its account; input_record writes the same bytes."""
    expected = parse_event(raw)
    usage, value = encoded(raw, account, line)
    event, got_account, error = decode_input(value, usage, arrival_ms(expected), contract=2)
    assert error is None, error
    assert event == expected and type(event) is type(expected)
    assert got_account == account
    topic, record = input_record(expected, account, line)
    assert (topic is USAGE) == usage
    assert codec(topic.schema).encode(record) == value
    # the digits of every decimal string as written (a credit's amount is checked against
    # them); a usage quantity is an Avro decimal of scale 9, equal in value
    for name in ("amount", "percent_off", "amount_off"):
        if isinstance(getattr(expected, name, None), Decimal):
            assert getattr(event, name).as_tuple() == getattr(expected, name).as_tuple()


def test_every_type_of_the_input_topics_is_in_the_examples() -> None:
    """The round trip above covers each type these topics carry: a type added to the
    contract and not handled here (nor in the examples) fails."""
    assert sorted({raw["type"] for _, raw, _ in TOPIC_LINES}) == TOPIC_TYPES
    assert {raw["type"] for _, raw, _ in LINES} >= PLAN_TYPES


@pytest.mark.parametrize("etype", TOPIC_TYPES)
def test_each_type_decodes_to_its_own_class(etype: str) -> None:
    (line, raw, account) = next(x for x in TOPIC_LINES if x[1]["type"] == etype)
    usage, value = encoded(raw, account, line)
    event = decode_input(value, usage, None, contract=2)[0]
    assert type(event) is EVENT_TYPES[etype]


def test_version_1_refuses_the_version_2_types_and_reads_the_rest_as_before() -> None:
    for line, raw, account in TOPIC_LINES:
        usage, value = encoded(raw, account, line)
        event, got_account, error = decode_input(value, usage, None)
        v2 = decode_input(value, usage, None, contract=2)[0]
        if EVENT_TYPES[raw["type"]] in (SubscriptionCreated, Usage) or raw["type"] in (
            "subscription.plan_changed", "subscription.cancelled",
        ):  # fmt: skip
            assert error is None and got_account == account
            # version 1: no properties (and no arrival without a record timestamp)
            assert event == (replace(v2, properties=None) if usage else v2), line
        else:
            # as before version 2's fields: the type refused, or its fields missing
            assert event is None and error is not None and error[0] == "invalid_event", line


@pytest.mark.parametrize("line", [x for x in LINES if x[1]["type"] in PLAN_TYPES],
                         ids=lambda x: x[0])  # fmt: skip
def test_plan_events_belong_on_the_catalog_topic(line: tuple[str, dict, str]) -> None:
    _, raw, _ = line
    with pytest.raises(ValueError, match=r"billing\.catalog"):
        input_record(parse_event(raw), "a", "e")
    value = codec(SUBSCRIPTIONS.schema).encode({
        **record_from_json({"type": "subscription.paused", "timestamp": raw["timestamp"],
                            "subscription_id": "s"}, "a", "e"),
        "type": raw["type"], "plan_id": raw.get("plan_id"),
    })  # fmt: skip
    for contract in (1, 2):
        event, account, error = decode_input(value, False, None, contract=contract)
        assert event is None and account is None and error is not None
        assert error[0] == "invalid_event"
    assert decode_input(value, False, None, contract=2)[2] == ("invalid_event", PLAN_EVENTS_DETAIL)


def sub_value(**fields: Any) -> bytes:
    base = {"type": "subscription.paused", "timestamp": T.isoformat(), "subscription_id": "s"}
    return codec(SUBSCRIPTIONS.schema).encode(record_from_json(base, "a", "e") | fields)


def test_a_credit_keeps_the_digits_it_was_granted_with() -> None:
    """A decimal string on the topic: "20.001" EUR is refused as the contract says, which a
    decimal of fixed scale 9 would have made 20.001000000 of a scale no currency has."""
    credit = {"type": "credit.granted", "subscription_id": "", "credit_id": "c", "currency": "EUR"}
    event, account, error = decode_input(sub_value(**credit, amount="20.10"), False, contract=2)
    assert error is None and account == "a"
    assert event == CreditGranted(T, "c", "a", "EUR", Decimal("20.10"))
    assert event.amount.as_tuple().exponent == -2  # type: ignore[union-attr]
    for amount, detail in (("20.001", "more digits than EUR"), ("0", "greater than 0"),
                           ("-5", "negative"), ("1e400", "too large")):  # fmt: skip
        error = decode_input(sub_value(**credit, amount=amount), False, contract=2)[2]
        assert error is not None and error[0] == "invalid_event" and detail in error[1], error
    error = decode_input(
        sub_value(**{**credit, "amount": "5", "currency": "XXY"}), False, contract=2
    )[2]
    assert error is not None and "unknown currency" in error[1]


def test_null_fields_are_absent_fields() -> None:
    """customer.updated: a null field keeps the account's value (an upsert); a coupon's
    null percent_off is the absent one of the two."""
    only_grace = sub_value(type="customer.updated", subscription_id="", grace_hours=0)
    assert decode_input(only_grace, False, contract=2)[0] == CustomerUpdated(T, "a", None, None, 0)
    every = sub_value(type="customer.updated", subscription_id="", country="NL",
                      tax_exempt=False, grace_hours=48)  # fmt: skip
    assert decode_input(every, False, contract=2)[0] == CustomerUpdated(T, "a", "NL", False, 48)
    coupon = sub_value(type="coupon.applied", coupon_id="c", amount_off="5.5", duration="once",
                       periods=3)  # fmt: skip
    assert decode_input(coupon, False, contract=2)[0] == CouponApplied(
        T, "s", "c", None, Decimal("5.5"), "once", None
    )
    for bad, detail in (
        ({"country": "nl"}, "ISO 3166-1"),
        ({"grace_hours": -1}, "grace_hours"),
    ):
        value = sub_value(type="customer.updated", subscription_id="", **bad)
        error = decode_input(value, False, contract=2)[2]
        assert error is not None and error[0] == "invalid_event" and detail in error[1]
    for bad, detail in (
        ({"percent_off": "10", "amount_off": "1"}, "exactly one"),
        ({}, "exactly one"),
        ({"percent_off": "100.5"}, "at most 100"),
        ({"percent_off": "10", "duration": "repeating"}, "needs 'periods'"),
        ({"percent_off": "10", "duration": "weekly"}, "duration"),
    ):
        value = sub_value(type="coupon.applied", coupon_id="c", **{"duration": "once", **bad})
        error = decode_input(value, False, contract=2)[2]
        assert error is not None and error[0] == "invalid_event" and detail in error[1], error
    # a subscription event needs its subscription; an account event does not
    error = decode_input(sub_value(subscription_id=""), False, contract=2)[2]
    assert error is not None and "subscription_id" in error[1]


def usage_value(properties: dict[str, str] | None, at: datetime = T) -> bytes:
    return codec(USAGE.schema).encode({
        "event_id": "u", "timestamp": at, "account_id": "a", "subscription_id": "s",
        "metric": "seats", "quantity": Decimal(1), "properties": properties,
    })  # fmt: skip


def test_properties_of_any_json_value_travel_in_the_domain_s_form() -> None:
    raw = {"type": "usage", "event_id": "u", "timestamp": T.isoformat(), "subscription_id": "s",
           "metric": "seats", "quantity": "1",
           "properties": {"user": "ann", "n": 5, "ok": True, "o": {"z": 1, "a": [1, 2.5]},
                          "gone": None, "empty": ""}}  # fmt: skip
    expected = parse_event(raw)
    assert isinstance(expected, Usage) and expected.properties == {
        "user": "ann", "n": "\x005", "ok": "\x00true", "o": '\x00{"a":[1,2.5],"z":1}', "empty": "",
    }  # fmt: skip
    topic, record = input_record(expected, "a", "ignored")
    assert topic is USAGE and record["properties"] == expected.properties
    value = codec(USAGE.schema).encode(record)
    assert value == usage_value(internal_properties(raw["properties"]))
    assert decode_input(value, True, None, contract=2)[0] == expected
    # none given, an empty map: both kept as given
    assert decode_input(usage_value(None), True, None, contract=2)[0].properties is None  # type: ignore[union-attr]
    assert decode_input(usage_value({}), True, None, contract=2)[0].properties == {}  # type: ignore[union-attr]


def test_a_usage_event_arrives_at_its_record_s_timestamp() -> None:
    """Kafka stamps records in ms: a record of the event's own millisecond arrived at its
    timestamp (received_at None, as the contract's JSON without one); any other is its
    received_at, later (late usage) or earlier (which the contract dead-letters)."""
    at = T + timedelta(microseconds=1500)  # 1.5 ms past T
    ms = to_micros(at) // 1000
    value = usage_value(None, at)
    assert arrival(at, ms) is None
    assert decode_input(value, True, ms, contract=2)[0].received_at is None  # type: ignore[union-attr]
    for published in (ms + 1, ms + 86_400_000 * 40, ms - 1):
        event = decode_input(value, True, published, contract=2)[0]
        assert event is not None and to_micros(event.received_at) == published * 1000  # type: ignore[union-attr,arg-type]
        assert arrival_ms(event) == published
    # version 1 has no arrival, and ignores properties
    assert decode_input(value, True, ms + 1)[0] == Usage("u", at, "s", "seats", Decimal(1))
    # a record timestamp no datetime holds: a dead letter, not an exception
    error = decode_input(value, True, 2**62, contract=2)[2]
    assert error is not None and error[0] == "invalid_event"
    # only usage has an arrival of its own (every other event arrives at its timestamp)
    assert decode_input(sub_value(), False, ms + 5, contract=2)[0] == Paused(T, "s")


def test_records_of_the_first_schemas_decode_for_either_contract() -> None:
    """Written with the version-1 schemas (kept in schemas/history): readable, their new
    fields null."""
    for name, topic, rec, usage in (
        ("subscription_event", SUBSCRIPTIONS,
         {"event_id": "e", "type": "subscription.created", "timestamp": T, "account_id": "a",
          "subscription_id": "s", "plan_id": "starter-eur", "mode": None,
          "payment_method": None}, False),
        ("usage_event", USAGE,
         {"event_id": "u", "timestamp": T, "account_id": "a", "subscription_id": "s",
          "metric": "m", "quantity": Decimal("2.5")}, True),
    ):  # fmt: skip
        old = parse_schema(json.loads((SCHEMAS_DIR / "history" / f"{name}.1.avsc").read_text()))
        buf = io.BytesIO()
        buf.write(MAGIC + schema_fingerprint(old))
        fastavro.schemaless_writer(buf, old, rec)
        assert buf.getvalue()[:10] != codec(topic.schema).header
        v1, v2 = (decode_input(buf.getvalue(), usage, None, contract=c) for c in (1, 2))
        assert v1 == v2 and v1[2] is None and v1[1] == "a"


def test_what_the_schema_cannot_hold_is_refused_by_input_record() -> None:
    with pytest.raises(ValueError, match="Avro int"):
        input_record(CustomerUpdated(T, "a", None, None, 2**31), "a", "e")
    with pytest.raises(ValueError, match="Avro int"):
        input_record(CouponApplied(T, "s", "c", Decimal(5), None, "repeating", 2**40), "a", "e")
    with pytest.raises(ValueError, match=r"billing\.catalog"):
        input_record(PlanRetired(T, "p"), "a", "e")
    with pytest.raises(ValueError, match="contract version"):
        decode_input(sub_value(), False, contract=3)


def test_account_events_are_keyed_by_their_own_account() -> None:
    """credit.granted and customer.updated name their account: the record's, whatever
    account the caller passes; subscription events take the caller's (the owner's)."""
    for event in (CreditGranted(T, "c", "acct-9", "JPY", Decimal(500)),
                  CustomerUpdated(T, "acct-9", "JP", True, None)):  # fmt: skip
        topic, record = input_record(event, "someone-else", "e")
        assert topic is SUBSCRIPTIONS and record["account_id"] == "acct-9"
        assert record["subscription_id"] == ""
        value = codec(topic.schema).encode(record)
        assert decode_input(value, False, None, contract=2) == (event, "acct-9", None)
    topic, record = input_record(Paused(T, "s"), "owner", "e")
    assert record["account_id"] == "owner" and record["subscription_id"] == "s"
