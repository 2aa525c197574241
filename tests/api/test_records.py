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
RULES = records.subscription_rules(
    lambda plan: None if plan in {"pro-usd", "starter-eur"} else f"unknown plan {plan!r}"
)


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
    for other_route in ("credit.granted", "customer.updated", "plan.retired", "usage"):
        assert validate_sub(sub(type=other_route))[1][0].startswith("type: one of")
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


def test_pauses_resumes_and_coupons_are_subscription_events() -> None:
    for kind in ("subscription.paused", "subscription.resumed"):
        record, errors = validate_sub({"type": kind, "account_id": "acme-1",
                                       "subscription_id": "s-1"})  # fmt: skip
        assert errors == [] and record is not None and record["type"] == kind
        codec("subscription_event").encode(record)
    coupon = {
        "type": "coupon.applied",
        "account_id": "acme-1",
        "subscription_id": "s-1",
        "coupon_id": "half",
        "percent_off": "50",
        "duration": "repeating",
        "periods": 2,
    }
    record, errors = validate_sub(coupon)
    assert errors == [] and record is not None
    # decimal strings as written; the fields of the other routes are null
    assert (record["percent_off"], record["amount_off"], record["periods"]) == ("50", None, 2)
    assert all(record[f] is None for f in ("credit_id", "currency", "amount", "country",
                                           "tax_exempt", "grace_hours"))  # fmt: skip
    codec("subscription_event").encode(record)
    amount = {**coupon, "percent_off": None, "amount_off": "5.50", "duration": "forever",
              "periods": None}  # fmt: skip
    assert validate_sub(amount)[1] == []


def test_coupon_rules() -> None:
    coupon = {"type": "coupon.applied", "account_id": "acme-1", "subscription_id": "s-1",
              "coupon_id": "c", "percent_off": "10", "duration": "once"}  # fmt: skip
    for over, expected in [
        ({"amount_off": "5"}, ["percent_off: exactly one of percent_off and amount_off"]),
        ({"percent_off": None}, ["percent_off: exactly one of percent_off and amount_off"]),
        ({"percent_off": "0"}, ["percent_off: greater than 0 and at most 100"]),
        ({"percent_off": "100.000000001"}, ["percent_off: greater than 0 and at most 100"]),
        ({"percent_off": None, "amount_off": "-1"}, ["amount_off: must be greater than 0"]),
        ({"percent_off": "1e1"}, ["percent_off: must be a decimal string with at most 18 "
                                  "integer and 9 fraction digits"]),
        ({"coupon_id": None}, ["coupon_id: required for coupon.applied"]),
        ({"duration": None}, ["duration: one of once, repeating, forever for a coupon"]),
        ({"duration": "repeating"}, ["periods: required for a repeating coupon"]),
        ({"periods": 2}, ["periods: only for a repeating coupon"]),
        ({"duration": "repeating", "periods": 0}, ["periods: at least 1"]),
        ({"duration": "repeating", "periods": True},
         [f"periods: must be an integer from {records.INT_MIN} to {records.INT_MAX}"]),
        ({"amount": "5"}, ["amount: unknown field"]),  # a credit's, on its own route
        ({"country": "FR"}, ["country: unknown field"]),  # a customer's, with PUT
    ]:  # fmt: skip
        assert validate_sub({**coupon, **over})[1] == expected, over
    assert validate_sub(sub(coupon_id="c", duration="once"))[1] == [
        "coupon_id: only for coupon.applied", "duration: only for coupon.applied"
    ]  # fmt: skip


def validate_credit(item: object) -> tuple[dict | None, list[str]]:
    return records.validate("subscription_event", records.CREDIT_RULES, item, NOW,
                            server_fields=records.credit_server_fields("e-1", NOW),
                            defaults={"credit_id": lambda: "e-1"})  # fmt: skip


def test_a_credit_is_a_credit_granted_record() -> None:
    record, errors = validate_credit({"account_id": "acme-1", "currency": "EUR",
                                      "amount": "20.10"})  # fmt: skip
    assert errors == [] and record is not None
    assert {k: v for k, v in record.items() if v is not None} == {
        "event_id": "e-1", "type": "credit.granted", "timestamp": NOW, "account_id": "acme-1",
        "subscription_id": "", "credit_id": "e-1", "currency": "EUR", "amount": "20.10",
    }  # fmt: skip
    assert set(record) == {f.name for f in records.schema_fields("subscription_event")}
    codec("subscription_event").encode(record)
    given, _ = validate_credit({"account_id": "acme-1", "currency": "JPY", "amount": "500",
                                "credit_id": "goodwill-7"})  # fmt: skip
    assert given is not None and given["credit_id"] == "goodwill-7"


def test_credits_are_refused_field_by_field() -> None:
    base = {"account_id": "acme-1", "currency": "EUR", "amount": "20.00"}
    for over, expected in [
        ({"amount": "20.001"}, ["amount: at most 2 decimal places in EUR"]),
        ({"amount": "0.00"}, ["amount: must be greater than 0"]),
        ({"amount": "-3"}, ["amount: must be greater than 0"]),
        ({"currency": "JPY", "amount": "1.5"}, ["amount: at most 0 decimal places in JPY"]),
        ({"currency": "eur"}, ["currency: an ISO 4217 code such as EUR"]),
        ({"currency": "ABC"}, ["currency: 'ABC' is not an ISO 4217 currency"]),
        ({"amount": 20}, ["amount: must be a decimal string with at most 18 integer and 9 "
                          "fraction digits"]),
        ({"amount": None}, ["amount: required"]),
        ({"currency": None, "amount": "1"}, ["currency: required"]),
        ({"subscription_id": "s-1"}, ["subscription_id: unknown field"]),
        ({"type": "credit.granted"}, ["type: unknown field"]),
        ({"coupon_id": "c"}, ["coupon_id: unknown field"]),
    ]:  # fmt: skip
        assert validate_credit({**base, **over})[1] == expected, over


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


def test_usage_properties_travel_in_the_domain_s_form() -> None:
    props = {"user": "ann", "seats": 3, "admin": False, "tags": {"b": 1, "a": [2]},
             "gone": None, "empty": ""}  # fmt: skip
    record, errors = records.validate("usage_event", records.USAGE_RULES,
                                      usage(properties=props), NOW)  # fmt: skip
    assert errors == [] and record is not None
    assert record["properties"] == {"user": "ann", "seats": "\x003", "admin": "\x00false",
                                    "tags": '\x00{"a":[2],"b":1}', "empty": ""}  # fmt: skip
    assert codec("usage_event").decode(codec("usage_event").encode(record)) == record
    plain, _ = records.validate("usage_event", records.USAGE_RULES, usage(), NOW)
    assert plain is not None and plain["properties"] is None
    for bad, error in [
        ([1], "properties: an object of property names to values"),
        ({f"k{i}": "v" for i in range(records.MAX_PROPERTIES + 1)},
         f"properties: at most {records.MAX_PROPERTIES} properties"),
        ({"": "v"}, "properties: a property name of 1 to 256 characters"),
        ({"k": "v" * 257}, "properties: the value of 'k' is longer than 256 characters"),
        ({"k": list(range(400))},
         "properties: the value of 'k' is longer than 1024 characters of JSON"),
    ]:  # fmt: skip
        _, errors = records.validate("usage_event", records.USAGE_RULES,
                                     usage(properties=bad), NOW)  # fmt: skip
        assert errors == [error], bad


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


def _objects() -> st.SearchStrategy[object]:
    """Property maps: small values of every JSON type (their JSON well within its bound),
    names and strings across their length limits, and too many of them."""
    names = st.one_of(st.text(max_size=3), st.text(min_size=255, max_size=258))
    values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                       allow_infinity=False), st.text(max_size=3),
                       st.text(min_size=255, max_size=258),
                       st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))  # fmt: skip
    return st.one_of(
        st.dictionaries(names, values, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=4), st.just("v"), min_size=30, max_size=34),
    )


def _items(schema: dict) -> st.SearchStrategy[dict]:
    kinds = {"string": "string", "boolean": "boolean", "integer": "integer", "object": "object"}
    fields = {}
    for name, prop in schema["properties"].items():
        t = prop["type"][0] if isinstance(prop["type"], list) else prop["type"]
        kind = "timestamp" if prop.get("format") == "date-time" else kinds[t]
        fields[name] = _value(kind) if kind != "object" else st.one_of(_value(kind), _objects())
    return st.fixed_dictionaries({}, optional={**fields, "extra": st.integers()})


# The document and the validator come from one field analysis; this checks they agree:
# an item is valid by the document exactly when the validator finds no type error.
@pytest.mark.parametrize(("name", "schema_name", "server", "rules"), [
    ("UsageEvent", "usage_event", {}, records.USAGE_RULES),
    ("RefundRequest", "refund_request", {"requested_at": NOW}, records.REFUND_RULES),
    ("CreditGrant", "subscription_event", records.credit_server_fields("e", NOW),
     records.CREDIT_RULES),
])  # fmt: skip
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_document_and_the_validator_agree(
    name: str, schema_name: str, server: dict, rules: records.Rules, data: st.DataObject
) -> None:
    schema = _component(name)
    item = data.draw(_items(schema))
    by_document = Draft202012Validator(schema).is_valid(item)
    _, errors = records.convert(schema_name, item, NOW, server_fields=server, rules=rules)
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
