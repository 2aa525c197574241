"""Request validation driven by the Avro schemas, and its OpenAPI description."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from streams.api import records
from streams.api.openapi import openapi_document
from streams.codec import codec

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
RULES = records.subscription_rules(lambda plan: plan in {"pro-usd", "starter-eur"})


def sub(**over: object) -> dict:
    return {"type": "subscription.created", "account_id": "acme-1", "subscription_id": "s-1",
            "plan_id": "pro-usd", "payment_method": "tok_visa", **over}  # fmt: skip


def validate_sub(item: object) -> tuple[dict | None, list[str]]:
    defaults = {"event_id": lambda: "generated", "timestamp": lambda: NOW}
    return records.validate("subscription_event", RULES, item, NOW, defaults=defaults)


def test_a_valid_signup_becomes_an_encodable_record() -> None:
    record, errors = validate_sub(sub())
    assert errors == []
    assert record is not None and record["event_id"] == "generated"
    assert record["timestamp"] == NOW and record["mode"] is None
    codec("subscription_event").encode(record)  # the Avro schema agrees


def test_every_error_is_reported_with_its_field() -> None:
    _, errors = validate_sub({"type": "subscription.created", "account_id": "",
                              "plan_id": 7, "colour": "red"})  # fmt: skip
    assert errors == [
        "colour: unknown field",
        "account_id: must be a string of 1 to 256 characters",
        "subscription_id: required",
        "plan_id: must be a string of 1 to 256 characters",
    ]


def test_domain_rules() -> None:
    assert validate_sub(sub(plan_id="gold"))[1] == ["plan_id: unknown plan 'gold'"]
    assert validate_sub(sub(type="subscription.paused"))[1][0].startswith("type: one of")
    cancel = sub(type="subscription.cancelled", plan_id=None, mode="whenever")
    assert validate_sub(cancel)[1] == ["mode: one of immediate, end_of_period for a cancellation"]
    assert validate_sub(sub(mode="immediate"))[1] == ["mode: only for subscription.cancelled"]
    card = validate_sub(sub(payment_method="4242 4242 4242 4242"))[1]
    assert card == ["payment_method: card numbers are refused; send a gateway token"]
    for naive_or_loose in ("2026-11-24T12:00:00", "2026-11-24 12:00:00Z", "20261124T120000Z"):
        assert validate_sub(sub(timestamp=naive_or_loose))[1][0].startswith("timestamp: an RFC")
    assert validate_sub(sub(timestamp="2026-11-24t10:00:00.5z"))[1] == []
    future = (NOW + timedelta(days=2)).isoformat()
    assert validate_sub(sub(timestamp=future))[1] == [
        "timestamp: more than 1 day, 0:00:00 in the future"
    ]
    assert validate_sub(sub(timestamp="1999-12-31T23:59:59Z"))[1] == [
        "timestamp: before 2000-01-01"
    ]
    assert validate_sub([1, 2])[1] == ["must be a JSON object"]


def usage(**over: object) -> dict:
    return {"event_id": "u-1", "timestamp": "2026-11-24T11:00:00Z", "account_id": "acme-1",
            "subscription_id": "s-1", "metric": "api_calls", "quantity": "12.5",
            **over}  # fmt: skip


def test_usage_quantities_are_exact_decimal_strings() -> None:
    record, errors = records.validate("usage_event", records.USAGE_RULES, usage(), NOW)
    assert errors == [] and record is not None and record["quantity"] == Decimal("12.5")
    for bad in (12.5, "1e3", "NaN", "1" * 30, "0.0000000001", " 1"):
        _, errors = records.validate("usage_event", records.USAGE_RULES, usage(quantity=bad), NOW)
        assert errors and errors[0].startswith("quantity: must be a decimal string"), bad
    _, errors = records.validate("usage_event", records.USAGE_RULES, usage(quantity="-1"), NOW)
    assert errors == ["quantity: must not be negative"]


def test_refunds_take_requested_at_from_the_server() -> None:
    body = {"refund_id": "r-1", "invoice_id": "i-1", "account_id": "acme-1",
            "amount": "10.00", "currency": "EUR"}  # fmt: skip
    ok, errors = records.validate("refund_request", records.REFUND_RULES, body, NOW,
                                  server_fields={"requested_at": NOW})  # fmt: skip
    assert (
        errors == [] and ok is not None and ok["requested_at"] == NOW and ok["deactivate"] is False
    )
    _, errors = records.validate("refund_request", records.REFUND_RULES,
                                 {**body, "requested_at": "2026-01-01T00:00:00Z"}, NOW,
                                 server_fields={"requested_at": NOW})  # fmt: skip
    assert errors == ["requested_at: unknown field"]
    _, errors = records.validate("refund_request", records.REFUND_RULES,
                                 {**body, "amount": "0", "currency": "eur"}, NOW,
                                 server_fields={"requested_at": NOW})  # fmt: skip
    assert errors == ["amount: must be positive", "currency: an ISO 4217 code such as EUR"]


def _component(name: str) -> dict:
    return openapi_document()["components"]["schemas"][name]


def _value(kind: str) -> st.SearchStrategy[object]:
    junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.lists(st.integers(), max_size=2))  # fmt: skip
    if kind == "timestamp":  # (the document leaves date-time formats to the server)
        return st.one_of(junk, st.just("2026-11-24T11:00:00Z"))
    strings = st.one_of(st.text(max_size=3), st.text(min_size=250, max_size=260),
                        st.from_regex(r"-?[0-9]{1,31}(\.[0-9]{1,11})?",
                                      fullmatch=True))  # fmt: skip
    return st.one_of(junk, strings)


def _items(schema: dict) -> st.SearchStrategy[dict]:
    kinds = {"string": "string", "boolean": "boolean"}
    fields = {}
    for name, prop in schema["properties"].items():
        t = prop["type"][0] if isinstance(prop["type"], list) else prop["type"]
        kind = "timestamp" if prop.get("format") == "date-time" else kinds[t]
        fields[name] = _value(kind)
    return st.fixed_dictionaries({}, optional={**fields, "extra": st.integers()})


# The document and the validator come from one field analysis; this checks they agree:
# an item is valid by the document exactly when the validator finds no type error.
@pytest.mark.parametrize(("name", "schema_name", "server"), [
    ("UsageEvent", "usage_event", {}),
    ("RefundRequest", "refund_request", {"requested_at": NOW}),
])  # fmt: skip
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_document_and_the_validator_agree(
    name: str, schema_name: str, server: dict, data: st.DataObject
) -> None:
    schema = _component(name)
    item = data.draw(_items(schema))
    by_document = Draft202012Validator(schema).is_valid(item)
    _, errors = records.convert(schema_name, item, NOW, server_fields=server)
    assert by_document == (errors == []), (item, errors)


def validate_customer(item: object) -> tuple[dict | None, list[str]]:
    server = {"account_id": "acme-1", "timestamp": NOW}
    return records.validate("customer", records.CUSTOMER_RULES, item, NOW, server_fields=server)


def test_a_customer_record_takes_the_defaults_of_the_fields_left_out() -> None:
    record, errors = validate_customer({"country": "FR", "payment_method": "tok_new"})
    assert errors == [] and record is not None
    assert record == {"account_id": "acme-1", "timestamp": NOW, "name": None, "email": None,
                      "address": None, "country": "FR", "tax_exempt": False, "grace_hours": 0,
                      "payment_method": "tok_new"}  # fmt: skip
    codec("customer").encode(record)


def test_customer_records_are_refused_field_by_field() -> None:
    _, errors = validate_customer({"country": "France", "email": "nobody", "grace_hours": -1,
                                   "payment_method": "4242-4242-4242-4242"})  # fmt: skip
    assert errors == [
        "country: an ISO 3166-1 alpha-2 code such as FR",
        "email: not an email address",
        f"grace_hours: from 0 to {records.MAX_GRACE_HOURS}",
        "payment_method: card numbers are refused; send a gateway token",
    ]
    # an integer field takes integers only: not a boolean, a float or a string
    for bad in (True, 1.5, "24", 2**31):
        assert validate_customer({"grace_hours": bad})[1] == [
            f"grace_hours: must be an integer from {records.INT_MIN} to {records.INT_MAX}"
        ]
    # the account and the time are the server's (the path and the clock)
    assert validate_customer({"account_id": "other"})[1] == ["account_id: unknown field"]
    assert validate_customer({"tax_exempt": "yes"})[1] == ["tax_exempt: must be true or false"]
