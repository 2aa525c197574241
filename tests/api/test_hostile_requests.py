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
from streams.domain.validation import MAX_FUTURE
from streams.rating_records import decode_input

NOW = datetime(2026, 11, 24, 12, 0, 0, 250_000, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)  # when the API publishes what it accepted
PLANS = {"starter-eur", "pro-usd"}
SUB_RULES = records.subscription_rules(lambda plan: plan in PLANS)
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
        st.sampled_from(["subscription.paused", "usage", "SUBSCRIPTION.CREATED"]),
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
}


def items(schema_name: str, server: tuple[str, ...] = ()) -> st.SearchStrategy[Any]:
    names = [f.name for f in records.schema_fields(schema_name) if f.name not in server]
    plain = (st.text(min_size=1, max_size=12), st.text(min_size=257, max_size=260))
    fields = {}
    for n in names:
        plausible, hostile = FIELD_VALUES.get(n, plain)
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
    event, account, error = decode_input(encoded("usage_event", record), True, NOW_MS)
    assert error is None, (item, error)
    assert event is not None and account == record["account_id"]
    assert event.quantity == record["quantity"] >= 0


@HOSTILE
@given(item=items("subscription_event"))
def test_subscription_items(item: Any) -> None:
    defaults = {"event_id": lambda: "generated", "timestamp": lambda: NOW}
    record, errors = records.validate("subscription_event", SUB_RULES, item, NOW, defaults=defaults)
    note("refused" if record is None else "accepted")
    if record is None:
        check_refused(item, errors, "subscription_event")
        return
    value = encoded("subscription_event", record)
    if record["type"] == "subscription.cancelled":  # to a lane first, then to rating
        assert cancellation_problem(codec("subscription_event").decode(value), NOW_MS) is None
    event, _, error = decode_input(value, False, NOW_MS)
    assert error is None, (item, error)
    assert event is not None and event.subscription_id == record["subscription_id"]
    if record["type"] != "subscription.cancelled":
        assert record["plan_id"] in PLANS


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
