"""Hostile request items against the ingestion API's validation: any JSON value in any
field (wrong types, huge numbers, decimal strings of every shape, timestamps from year 1
to 9999 in many spellings, unknown fields). Validation never raises; an item is either
refused with errors that each name their field, or accepted as a record that the Avro
schema encodes and that the pipeline downstream accepts too (no API-accepted event ends
as a dead letter for being invalid)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from streams.api import records
from streams.codec import codec
from streams.domain.cancellations import cancellation_problem
from streams.domain.events import CouponApplied, CreditGranted, parse_event
from streams.domain.validation import MAX_FUTURE
from streams.rating_records import decode_input

NOW = datetime(2026, 11, 24, 12, 0, 0, 250_000, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)  # when the API publishes what it accepted
PLANS = {"starter-eur", "pro-usd"}
SUB_RULES = records.subscription_rules(
    lambda plan: None if plan in PLANS else f"unknown plan {plan!r}"
)
HOSTILE = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**40), 10**40),
    st.floats(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
offsets = st.sampled_from(["Z", "z", "+00:00", "+14:00", "-12:00", "+05:30", "", "+24:00"])


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """Near now, far past, far future; several spellings, some of them invalid."""
    dt = draw(
        st.one_of(
            st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
            st.timedeltas(min_value=timedelta(days=-3), max_value=timedelta(days=3)).map(
                lambda d: (NOW + d).replace(tzinfo=None)
            ),
        )
    )
    text = dt.isoformat(sep=draw(st.sampled_from(["T", "t", " "])))
    return text + draw(offsets)


decimal_strings = st.one_of(
    st.from_regex(r"-?[0-9]{1,32}(\.[0-9]{0,12})?", fullmatch=True),
    st.decimals(allow_nan=True).map(str),
    st.sampled_from(["1e3", "NaN", "Infinity", "-0", "0.000000001", " 1", "1,5", "", "+1"]),
)
strings = st.one_of(
    st.text(max_size=8),
    st.text(min_size=250, max_size=260),
    st.sampled_from(["", "tok_visa", "4242 4242 4242 4242", "acme-1", "EUR", "eur"]),
)
any_value = st.one_of(junk, strings, decimal_strings, timestamps())

near_now = st.timedeltas(min_value=timedelta(days=-400), max_value=timedelta(days=1)).map(
    lambda d: (NOW + d).isoformat().replace("+00:00", "Z")
)


def mostly(plausible: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """A plausible value 7 times in 8 (so that whole items pass often), else a hostile one."""
    return st.integers(0, 7).flatmap(lambda k: hostile if k == 0 else plausible)


decimal_pattern = st.from_regex(r"[0-9]{1,20}(\.[0-9]{1,9})?", fullmatch=True)
# per field: (plausible values, hostile values)
FIELD_VALUES: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "type": (
        st.sampled_from(records.SUBSCRIPTION_TYPES),
        st.sampled_from(
            ["credit.granted", "customer.updated", "plan.retired", "usage", "SUBSCRIPTION.CREATED"]
        ),
    ),
    "mode": (st.sampled_from([None, "immediate", "end_of_period"]), st.just("whenever")),
    "plan_id": (st.sampled_from(sorted(PLANS)), st.sampled_from([None, "gold", ""])),
    "payment_method": (
        st.sampled_from([None, "tok_visa"]),
        st.sampled_from(["4242 4242 4242 4242", "", "4242-4242-4242-4242-424"]),
    ),
    "currency": (st.sampled_from(["EUR", "USD", "JPY"]), st.sampled_from(["eur", "EURO", ""])),
    "timestamp": (near_now, timestamps()),
    "quantity": (decimal_pattern, decimal_strings.map(lambda d: "-" + d)),
    "amount": (decimal_pattern, decimal_strings),
    "deactivate": (st.booleans(), st.sampled_from(["true", 1])),
    "reason": (st.one_of(st.none(), st.text(min_size=1, max_size=8)), st.just("")),
    # coupons (subscription_items makes them coherent with their type, mostly)
    "coupon_id": (st.text(min_size=1, max_size=8), st.just("")),
    "percent_off": (
        st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,9})?", fullmatch=True),
        decimal_strings,
    ),
    "amount_off": (decimal_pattern, decimal_strings.map(lambda d: "-" + d)),
    "duration": (st.sampled_from(records.COUPON_DURATIONS), st.sampled_from(["weekly", ""])),
    "periods": (st.integers(1, 24), st.one_of(st.integers(-3, 0), st.just(2**31))),
    # usage properties: JSON values of every type, in the domain's form once accepted
    "properties": (
        st.one_of(
            st.none(),
            st.dictionaries(
                st.text(min_size=1, max_size=8),
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.integers(-(2**60), 2**60),
                    st.text(max_size=8),
                    st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.booleans(), max_size=2),
                ),
                max_size=4,
            ),
        ),
        st.one_of(
            st.dictionaries(st.text(max_size=3), st.text(min_size=250, max_size=260), max_size=2),
            st.dictionaries(st.text(max_size=4), st.just(1), min_size=33, max_size=34),
        ),
    ),
}
# credits: amounts with as many digits as EUR and JPY have, and more
CREDIT_VALUES = {
    "amount": (st.from_regex(r"[0-9]{1,12}(\.[0-9]{1,2})?", fullmatch=True), decimal_strings),
    "credit_id": (st.one_of(st.none(), st.text(min_size=1, max_size=8)), st.just("")),
}


def items(
    schema_name: str,
    server: tuple[str, ...] = (),
    overrides: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] | None = None,
) -> st.SearchStrategy[Any]:
    names = [f.name for f in records.schema_fields(schema_name) if f.name not in server]
    plain = (st.text(min_size=1, max_size=12), st.text(min_size=257, max_size=260))
    values = {**FIELD_VALUES, **(overrides or {})}
    fields = {}
    for n in names:
        plausible, hostile = values.get(n, plain)
        fields[n] = mostly(plausible, st.one_of(hostile, any_value))
    # mostly complete items (so that many pass); some with an unknown field, some with
    # fields missing, some not objects at all
    complete = st.fixed_dictionaries(fields)
    extra = st.fixed_dictionaries({**fields, "colour": any_value})
    partial = st.fixed_dictionaries({}, optional={**fields, "colour": any_value})
    return mostly(complete, st.one_of(extra, partial, junk))


def check_refused(item: Any, errors: list[str], schema_name: str) -> None:
    assert errors, item
    known = {f.name for f in records.schema_fields(schema_name)}
    keys = set(item) if isinstance(item, dict) else set()
    for error in errors:
        if error == "must be a JSON object":
            assert not isinstance(item, dict)
            continue
        name, _, message = error.partition(": ")
        assert name in known | keys and message.strip(), error


def encoded(schema_name: str, record: dict[str, Any]) -> bytes:
    c = codec(schema_name)
    value = c.encode(record)
    assert c.decode(value) == record  # exact: decimals and timestamps survive Avro
    return value


@HOSTILE
@given(item=items("usage_event"))
def test_usage_items(item: Any) -> None:
    record, errors = records.validate("usage_event", records.USAGE_RULES, item, NOW)
    note("refused" if record is None else "accepted")
    if record is None:
        check_refused(item, errors, "usage_event")
        return
    assert errors == []
    value = encoded("usage_event", record)
    event, account, error = decode_input(value, True, NOW_MS)
    assert error is None, (item, error)
    assert event is not None and account == record["account_id"]
    assert event.quantity == record["quantity"] >= 0
    v2 = decode_input(value, True, NOW_MS, contract=2)[0]
    assert v2 is not None and v2.properties == record["properties"]  # type: ignore[union-attr]
    if isinstance(item.get("properties"), dict):  # in the domain's form: as parse_event makes it
        # the timestamp as the API read it (the API takes forms the contract's JSON does not,
        # e.g. a lowercase "z"): only the properties are compared here
        raw = {**item, "type": "usage", "timestamp": record["timestamp"],
               "properties": item["properties"]}  # fmt: skip
        assert parse_event(raw).properties == v2.properties  # type: ignore[union-attr]


@st.composite
def subscription_items(draw: st.DrawFn) -> Any:
    """Items of the subscription route: a coupon mostly with exactly one of its amounts
    and periods when repeating, any other type mostly without coupon fields."""
    item = draw(items("subscription_event", server=SUB_RULES.excluded))
    if not isinstance(item, dict) or not draw(st.integers(0, 7)):
        return item
    if item.get("type") != "subscription.cancelled":
        item.pop("mode", None)
    if item.get("type") != "coupon.applied":
        return {k: v for k, v in item.items() if k not in records.COUPON_FIELDS}
    item.pop(draw(st.sampled_from(["percent_off", "amount_off"])), None)
    if item.get("duration") != "repeating":
        item.pop("periods", None)
    return item


V1_TYPES = ("subscription.created", "subscription.plan_changed", "subscription.cancelled")


@HOSTILE
@given(item=subscription_items())
def test_subscription_items(item: Any) -> None:
    defaults = {"event_id": lambda: "generated", "timestamp": lambda: NOW}
    record, errors = records.validate("subscription_event", SUB_RULES, item, NOW, defaults=defaults)
    note("refused" if record is None else f"accepted {record['type']}")
    if record is None:
        check_refused(item, errors, "subscription_event")
        return
    value = encoded("subscription_event", record)
    if record["type"] == "subscription.cancelled":  # to a lane first, then to rating
        assert cancellation_problem(codec("subscription_event").decode(value), NOW_MS) is None
    # what the API accepts, rating accepts: version 2 every type, version 1 its own
    event, account, error = decode_input(value, False, NOW_MS, contract=2)
    assert error is None, (item, error)
    assert event is not None and event.subscription_id == record["subscription_id"]  # type: ignore[union-attr]
    assert account == record["account_id"]
    if record["type"] in V1_TYPES:
        assert decode_input(value, False, NOW_MS) == (event, account, None)
    if record["type"] in ("subscription.created", "subscription.plan_changed"):
        assert record["plan_id"] in PLANS
    if isinstance(event, CouponApplied):
        assert event.coupon_id == record["coupon_id"] and event.periods == record["periods"]
        for name in ("percent_off", "amount_off"):
            kept = getattr(event, name)
            assert (kept is None) == (record[name] is None)
            assert kept is None or kept.as_tuple() == Decimal(record[name]).as_tuple()


CREDIT_SERVER = (*records.CREDIT_RULES.excluded, *records.CREDIT_SERVER_FIELDS)


@HOSTILE
@given(item=items("subscription_event", server=CREDIT_SERVER, overrides=CREDIT_VALUES))
def test_credit_items(item: Any) -> None:
    record, errors = records.validate(
        "subscription_event", records.CREDIT_RULES, item, NOW,
        server_fields=records.credit_server_fields("generated", NOW),
        defaults={"credit_id": lambda: "generated"},
    )  # fmt: skip
    note("refused" if record is None else "accepted")
    if record is None:
        check_refused(item, errors, "subscription_event")
        return
    event, account, error = decode_input(encoded("subscription_event", record), False, NOW_MS,
                                         contract=2)  # fmt: skip
    assert error is None, (item, error)
    assert isinstance(event, CreditGranted) and account == record["account_id"]
    assert event.amount.as_tuple() == Decimal(item["amount"]).as_tuple() and event.amount > 0
    assert event.credit_id == (item.get("credit_id") or "generated")


@HOSTILE
@given(item=items("refund_request", server=("requested_at",)))
def test_refund_items(item: Any) -> None:
    record, errors = records.validate(
        "refund_request", records.REFUND_RULES, item, NOW, server_fields={"requested_at": NOW}
    )
    note("refused" if record is None else "accepted")
    if record is None:
        check_refused(item, errors, "refund_request")
        return
    encoded("refund_request", record)
    assert record["amount"] > 0 and record["amount"] == Decimal(item["amount"])
    assert records.CURRENCY.fullmatch(record["currency"]) and record["requested_at"] == NOW


def test_the_future_bound_holds_to_the_millisecond() -> None:
    """The last instant the API accepts is one the rating processor accepts."""
    edge = NOW + MAX_FUTURE
    for ts, accepted in ((edge, True), (edge + timedelta(microseconds=1), False)):
        text = ts.astimezone(timezone(timedelta(hours=2))).isoformat()
        item = {"event_id": "u", "timestamp": text, "account_id": "a", "subscription_id": "s",
                "metric": "api_calls", "quantity": "1"}  # fmt: skip
        record, errors = records.validate("usage_event", records.USAGE_RULES, item, NOW)
        assert (record is not None) == accepted, errors
        if record is not None:
            assert decode_input(encoded("usage_event", record), True, NOW_MS)[2] is None
