"""The rating processor's hand-written codecs (streams/fast_codec.py) side by side with
the general path.

UsageReader against decode_input (fastavro, parse_event, timestamp_problem): the fast
reader may only decline (None, the general path then decides); whatever it accepts must be
exactly what the general path gives, and it must accept the ordinary records, or it is no
fast path. InvoiceWriter against fastavro: the same bytes for every invoice."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.codec import codec
from streams.domain.catalog import Catalog
from streams.domain.events import Cancelled, PlanChanged, SubscriptionCreated, Usage
from streams.domain.invoice import Invoice, InvoiceLine
from streams.domain.rating import apply_event, close_periods
from streams.domain.validation import EARLIEST_US, MAX_FUTURE_MS, QUANTITY_LIMIT
from streams.fast_codec import InvoiceWriter, UsageReader, usage_event
from streams.invoice_record import invoice_record
from streams.kafka.topics import INVOICES, USAGE
from streams.rating_records import decode_input, invoice_writer, usage_reader
from streams.testbed.demo import DEMO_CATALOG
from tests.hostile import (
    Msg,
    OfflineAdmin,
    hostile_encode,
    micros,
    ms,
    rating_processor,
    unscaled,
)
from tests.test_bad_input import published_times, raw_records

MANY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PUBLISHED_MS = ms(datetime(2026, 3, 1, 9, 30, tzinfo=UTC))
CATALOG = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))


def T(day: int) -> datetime:
    return datetime(2026, 1, 1, 10, tzinfo=UTC) + timedelta(days=day)


def same_outcome(value: bytes, published: int | None) -> bool:
    """The fast reader agrees with decode_input; True if it took the record. What it takes
    has no properties, and is the same event for either contract (version 2 adds only the
    arrival, from the record's timestamp, and the properties it does not take)."""
    record = usage_reader().read(value, published)
    event, account, error = decode_input(value, True, published)
    if record is None:
        return False
    assert error is None, error  # accepted by the fast reader: valid for the general path
    f_event, f_account, us = usage_event(record), record[2], record[1]
    assert record == (event.event_id, us, account, event.subscription_id, event.metric,
                      int(event.quantity.scaleb(9)))  # fmt: skip
    assert f_event == event and f_account == account
    assert f_event.timestamp.tzinfo is event.timestamp.tzinfo
    assert f_event.quantity.as_tuple() == event.quantity.as_tuple()  # same digits, same scale
    assert us == micros(event.timestamp) and us / 1_000_000 == event.timestamp.timestamp()
    assert codec(USAGE.schema).decode(value)["properties"] is None
    assert decode_input(value, True, None, contract=2) == (f_event, f_account, None)
    return True


@MANY
@given(rec=raw_records("usage_event"), published=published_times())
def test_hostile_records_are_read_alike(rec: dict, published: int | None) -> None:
    same_outcome(hostile_encode("usage_event", rec), published)


texts = st.text(min_size=1, max_size=15)  # at most 60 bytes of UTF-8: a one-byte length
ordinary = st.fixed_dictionaries({
    "event_id": texts, "account_id": texts, "subscription_id": texts, "metric": texts,
    "timestamp": st.integers(micros(datetime(2025, 1, 1, tzinfo=UTC)),
                             micros(datetime(2026, 3, 1, tzinfo=UTC))),
    "quantity": st.integers(1, 10**27 - 1).map(unscaled),
    "properties": st.none(),
})  # fmt: skip
# any properties, the empty map included (two bytes: the union's branch, the map's end)
properties = st.dictionaries(st.text(max_size=6), st.text(max_size=70), max_size=4)


@MANY
@given(rec=ordinary, published=st.sampled_from([None, PUBLISHED_MS]))
def test_ordinary_records_take_the_fast_path(rec: dict, published: int | None) -> None:
    assert same_outcome(hostile_encode("usage_event", rec), published)


@MANY
@given(rec=ordinary, props=properties, published=st.sampled_from([None, PUBLISHED_MS]))
def test_records_with_properties_take_the_general_path(
    rec: dict, props: dict, published: int | None
) -> None:
    """Properties present (even none of them): the fast reader declines; the general path
    reads them for version 2, and version 1 rates the same usage without them."""
    value = hostile_encode("usage_event", {**rec, "properties": props})
    assert usage_reader().read(value, published) is None
    plain = hostile_encode("usage_event", rec)  # the same record, properties null
    assert value.startswith(plain[:-1]) and plain[-1:] == b"\x00" and value[-1:] == b"\x00"
    v1, v2 = decode_input(value, True, published), decode_input(value, True, None, contract=2)
    assert v1 == decode_input(plain, True, published) and v1[0] is not None
    assert v1[0].properties is None and v2[0] is not None and v2[0].properties == props
    assert dataclasses.replace(v2[0], properties=None) == v1[0]


def test_the_fast_reader_takes_null_properties_only() -> None:
    """The last byte of a record the fast reader takes is its null properties: a record one
    byte short of them, with another byte there, or with the properties' branch and
    nothing after it, is not read (the general path dead-letters each)."""
    base = {"event_id": "e", "timestamp": micros(datetime(2026, 1, 2, tzinfo=UTC)),
            "account_id": "a", "subscription_id": "s", "metric": "m",
            "quantity": unscaled(10**9), "properties": None}  # fmt: skip
    plain = hostile_encode("usage_event", base)
    assert same_outcome(plain, PUBLISHED_MS)
    for value in (plain[:-1], plain[:-1] + b"\x02", plain[:-1] + b"\x01", plain + b"\x00",
                  hostile_encode("usage_event", {**base, "properties": {}}),
                  hostile_encode("usage_event", {**base, "properties": {"k": "v"}})):  # fmt: skip
        assert usage_reader().read(value, PUBLISHED_MS) is None, value
        assert not same_outcome(value, PUBLISHED_MS)
    assert decode_input(plain[:-1], True, PUBLISHED_MS)[2][0] == "invalid_avro"  # type: ignore[index]
    assert decode_input(plain[:-1] + b"\x02", True, PUBLISHED_MS)[2][0] == "invalid_avro"  # type: ignore[index]


@MANY
@given(
    rec=ordinary,
    cuts=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255), st.booleans()), max_size=4),
    published=published_times(),
)
def test_damaged_records_are_read_alike(rec: dict, cuts: list, published: int | None) -> None:
    """Bytes overwritten, inserted or cut off: the fast reader declines or agrees."""
    value = bytearray(hostile_encode("usage_event", rec))
    for pos, byte, insert in cuts:
        pos %= len(value) + 1
        if insert:
            value[pos:pos] = bytes([byte])
        elif pos < len(value):
            value[pos] = byte
        else:
            del value[len(value) // 2 :]
    same_outcome(bytes(value), published)


def test_a_changed_schema_turns_the_fast_path_off(monkeypatch) -> None:
    monkeypatch.setattr(UsageReader, "FIELDS", UsageReader.FIELDS[:-1])
    reader = UsageReader(USAGE.schema)
    value = codec(USAGE.schema).encode({
        "event_id": "e", "timestamp": datetime(2026, 1, 2, tzinfo=UTC), "account_id": "a",
        "subscription_id": "s", "metric": "m", "quantity": Decimal("1.5"),
    })  # fmt: skip
    assert not reader.enabled and reader.read(value, None) is None
    assert usage_reader().read(value, None) is not None


def test_the_processor_buffers_what_either_path_decodes(tmp_path: Path) -> None:
    """A record the fast reader takes and one only the general path can read (an empty
    event id: its dead letter) are both buffered, in offset order. (The subscriptions
    topic has records still to come: nothing of partition 0 may go.)"""
    proc = rating_processor(CATALOG, tmp_path, admin=OfflineAdmin(end=10))
    base = {
        "event_id": "e1", "timestamp": micros(datetime(2026, 1, 2, tzinfo=UTC)),
        "account_id": "a", "subscription_id": "s", "metric": "m", "quantity": unscaled(10**9),
    }  # fmt: skip
    good = hostile_encode("usage_event", base)
    bad = hostile_encode("usage_event", {**base, "event_id": ""})
    proc.transaction([Msg(USAGE.name, good, b"a", 0, 0, PUBLISHED_MS),
                      Msg(USAGE.name, bad, b"a", 0, 1, PUBLISHED_MS)])  # fmt: skip
    first, second = proc.alignment.buffers[0][USAGE.name]
    assert first.error is None and first.record[5] == 10**9 and first.account_id == "a"
    assert usage_event(first.record).quantity == Decimal(1)
    assert first.timestamp == datetime(2026, 1, 2, tzinfo=UTC).timestamp()
    assert second.event is None and second.error[0] == "invalid_event"
    assert second.timestamp == float("-inf")
    proc.close()


def test_the_two_paths_draw_the_line_at_the_same_place() -> None:
    """The validation rule (streams.domain.validation) at its edges: the fast reader takes
    a record exactly when the general path accepts it; only a zero quantity, valid, is
    left to the general path."""
    at = micros(datetime(2026, 1, 2, tzinfo=UTC))
    base = {"event_id": "e", "timestamp": at, "account_id": "a", "subscription_id": "s",
            "metric": "m", "quantity": unscaled(10**9)}  # fmt: skip
    limit = QUANTITY_LIMIT * 10**9  # in 10^-9 units
    published = PUBLISHED_MS
    late = (published + MAX_FUTURE_MS) * 1000  # the last µs... of the last accepted ms
    edges = [
        {"timestamp": EARLIEST_US - 1}, {"timestamp": EARLIEST_US},
        {"timestamp": late + 999}, {"timestamp": late + 1000},
        {"quantity": unscaled(1)}, {"quantity": unscaled(limit - 1)},
        {"quantity": unscaled(limit)}, {"quantity": unscaled(-1)},
    ]  # fmt: skip
    outcomes = []
    for edge in edges:
        value = hostile_encode("usage_event", {**base, **edge})
        accepted = decode_input(value, True, published)[2] is None
        assert same_outcome(value, published) == accepted, edge
        outcomes.append(accepted)
    assert outcomes == [False, True, True, False, True, True, False, False]
    zero = hostile_encode("usage_event", {**base, "quantity": unscaled(0)})
    assert decode_input(zero, True, published)[2] is None
    assert usage_reader().read(zero, published) is None


# --- InvoiceWriter ------------------------------------------------------------------------

decimals = st.builds(
    lambda n, exp, negative_zero: Decimal("-0") if negative_zero else Decimal(n).scaleb(exp),
    st.one_of(st.integers(-(10**12), 10**12), st.integers(-(10**40), 10**40)),
    st.integers(-12, 6),
    st.integers(0, 20).map(lambda n: n == 0),  # now and then -0
)
instants = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
lines = st.builds(
    InvoiceLine,
    charge_id=st.text(max_size=70),
    kind=st.sampled_from(["flat", "usage", "proration_credit", "proration_charge"]),
    period_start=instants,
    period_end=instants,
    quantity=decimals,
    amount=decimals,
)
invoices = st.builds(
    Invoice,
    invoice_id=st.text(max_size=40),
    account_id=st.text(max_size=70),
    subscription_id=st.text(max_size=10),
    currency=st.sampled_from(["EUR", "JPY", ""]),
    issued_at=instants,
    lines=st.lists(lines, max_size=5).map(tuple),
    total=decimals,
    reason=st.text(max_size=12),
)


def fastavro_bytes(inv: Invoice, plan_id: str, method: str | None) -> bytes | type:
    try:
        return codec(INVOICES.schema).encode(invoice_record(inv, plan_id, method))
    except Exception as exc:  # the writer must fail alike
        return type(exc)


@MANY
@given(inv=invoices, plan_id=st.text(max_size=70), method=st.none() | st.text(max_size=70))
def test_invoices_are_written_as_fastavro_writes_them(
    inv: Invoice, plan_id: str, method: str | None
) -> None:
    expected = fastavro_bytes(inv, plan_id, method)
    if isinstance(expected, bytes):
        assert invoice_writer().encode(inv, plan_id, method) == expected
    else:  # e.g. more than 9 fraction digits: fastavro refuses, the writer leaves it to it
        try:
            invoice_writer().encode(inv, plan_id, method)
        except Exception as exc:
            assert type(exc) is expected
        else:
            raise AssertionError("the writer encoded what fastavro refuses")


def refuse(*_: object) -> bytes:
    raise AssertionError("an ordinary invoice went to fastavro")


def test_the_domains_invoices_take_the_fast_path() -> None:
    """Invoices of every kind the domain issues, in EUR and JPY, negative lines (credits)
    and zero amounts included: written by hand, byte for byte fastavro's."""
    fast = InvoiceWriter(INVOICES.schema, refuse)
    events = [
        SubscriptionCreated(T(1), "a1", "s1", "starter-eur", "tok_1"),
        Usage("e1", T(2), "s1", "api_calls", Decimal("1234.5")),
        PlanChanged(T(40), "s1", "growth-eur"),
        Usage("e2", T(41), "s1", "api_calls", Decimal("7")),
        Cancelled(T(50), "s1", "immediate"),
        SubscriptionCreated(T(1), "a2", "s2", "team-jpy", None),
    ]
    states: dict = {}
    issued = []
    for event in events:
        state, new, rejected = apply_event(states.get(event.subscription_id), event, CATALOG)
        assert not rejected, rejected
        states[event.subscription_id] = state
        issued += [(inv, state) for inv in new]
    issued += [(inv, states["s2"]) for inv in close_periods(states["s2"], T(100), CATALOG)[1]]
    kinds = {ln.kind for inv, _ in issued for ln in inv.lines}
    assert kinds == {"flat", "usage", "proration_credit", "proration_charge"}
    assert {inv.currency for inv, _ in issued} == {"EUR", "JPY"}
    for inv, state in issued:
        value = fast.encode(inv, state.plan_id, state.payment_method)
        assert value == fastavro_bytes(inv, state.plan_id, state.payment_method)


def test_a_changed_invoice_schema_goes_to_fastavro(monkeypatch) -> None:
    monkeypatch.setattr(InvoiceWriter, "FIELDS", InvoiceWriter.FIELDS[:-1])
    calls = []
    writer = InvoiceWriter(INVOICES.schema, lambda *args: calls.append(args) or b"fastavro")
    inv = Invoice("i", "a", "s", "EUR", T(1), (), Decimal(0), "created")
    assert not writer.enabled and writer.encode(inv, "p", None) == b"fastavro" and calls
