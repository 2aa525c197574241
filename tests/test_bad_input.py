"""Bad input, without a broker: every decoder a processor runs on Kafka input is fed
random bytes, truncated records, records of another topic's schema and valid records
with hostile values (negative or enormous quantities, timestamps from year 1 to 9999 and
beyond, unknown plans, subscriptions and accounts, currency mismatches, duplicates, out
of order). Each input becomes either a valid command or exactly one dead letter whose
reason is a known code and whose detail says what is wrong; nothing raises anything
else; and the counts add up. The processors' own methods run where they can without
Kafka (a fake producer records what they produce)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.domain.cancellations import Subscription, cancellation_problem, cancellation_refusal
from streams.domain.catalog import Catalog
from streams.domain.payments import after_attempt, parse_schedule
from streams.domain.rating import SubscriptionState
from streams.domain.refunds import Paid, RefundLedger, refund_refusal
from streams.domain.validation import EARLIEST, MAX_FUTURE
from streams.kafka.topics import (
    ALL_TOPICS,
    CANCELLATIONS,
    CONTROL,
    DEAD_LETTER,
    INVOICES,
    PAYMENT_CONTROL,
    PAYMENT_REQUESTS,
    PAYMENT_RETRIES,
    RATING_CHANGELOG,
    SUBSCRIPTIONS,
    USAGE,
    spec_for_base,
)
from streams.offline import rate_events
from streams.processors import payments, rating, sink
from streams.processors.rating import RatingProcessor
from streams.processors.sink import COLUMNS, LANDERS, Sink
from streams.rating_records import DEAD_LETTER_REASONS, decode_bill_run, decode_input
from streams.runtime.loop import StreamLoop
from streams.testbed.demo import DEMO_CATALOG
from tests import hostile
from tests.hostile import (
    CODEC_REASONS,
    HOSTILE_KINDS,
    FakeProducer,
    Msg,
    hostile_encode,
    micros,
    ms,
    raw_schema,
    unscaled,
)
from tests.samples import sample

CATALOG = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))
PUBLISHED = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
PUBLISHED_MS = ms(PUBLISHED)
VALUE_SCHEMAS = sorted({t.schema for t in ALL_TOPICS if t.schema})
MIN_US, MAX_US = micros(datetime.min.replace(tzinfo=UTC)), micros(datetime.max.replace(tzinfo=UTC))
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies: any value the Avro binary layout can carry -----------------------------

ids = st.one_of(st.just(""), st.sampled_from(["a", "acct-1", "sub-1", "e-1"]), st.text(max_size=8))
# timestamps: realistic, far past and future, and longs no datetime can hold
longs = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
    ).map(micros),
    st.integers(micros(datetime(2025, 1, 1, tzinfo=UTC)), micros(datetime(2027, 1, 1, tzinfo=UTC))),
    st.integers(-(2**63), 2**63 - 1),
)
# decimals (scale 9): small, around zero, huge, and odd byte strings
decimals = st.one_of(
    st.integers(-(10**12), 10**15).map(unscaled),
    st.integers(-(10**45), 10**45).map(unscaled),
    st.binary(max_size=3),
)


def avro_values(t: Any) -> st.SearchStrategy[Any]:
    """Values for a raw (logical types removed) Avro type."""
    if isinstance(t, list):
        return st.one_of(*[avro_values(x) for x in t])
    if isinstance(t, dict):
        kind = t["type"]
        if kind == "record":
            return st.fixed_dictionaries({f["name"]: avro_values(f["type"]) for f in t["fields"]})
        if kind == "array":
            return st.lists(avro_values(t["items"]), max_size=3)
        if kind == "map":
            return st.dictionaries(ids, avro_values(t["values"]), max_size=3)
        return avro_values(kind)
    return {
        "null": st.none(),
        "string": ids,
        "long": longs,
        "int": st.integers(-(2**31), 2**31 - 1),
        "bytes": decimals,
        "boolean": st.booleans(),
        "double": st.floats(allow_nan=True),
    }[t]


def raw_records(name: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict]:
    """Raw records of schema `name`; `fields` override some fields' strategies."""
    schema = raw_schema(name)
    return st.fixed_dictionaries(
        {f["name"]: fields.get(f["name"], avro_values(f["type"])) for f in schema["fields"]}
    )


def published_times() -> st.SearchStrategy[int | None]:
    return st.one_of(
        st.none(), st.just(PUBLISHED_MS), st.integers(0, ms(datetime(2100, 1, 1, tzinfo=UTC)))
    )


def in_datetime_range(*values: int) -> bool:
    return all(MIN_US <= v <= MAX_US for v in values)


def check_detail(detail: str) -> None:
    """A dead letter's detail says what is wrong: a readable, non-empty sentence."""
    assert isinstance(detail, str) and detail.strip() and len(detail) < 2000, detail


# --- the codec: every schema ---------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SCHEMAS)
@FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_are_a_decode_error_of_a_known_reason(name: str, data: bytes) -> None:
    try:
        codec(name).decode(data)
    except DecodeError as exc:
        assert exc.reason in CODEC_REASONS
        check_detail(exc.detail)


@pytest.mark.parametrize("name", VALUE_SCHEMAS)
@FAST
@given(data=st.data())
def test_hostile_values_either_decode_or_are_a_decode_error(name: str, data: st.DataObject) -> None:
    """Any record the binary layout allows, under the schema's real header: it decodes to a
    record with every field, or (timestamps no datetime holds) it is invalid_avro."""
    value = hostile_encode(name, data.draw(raw_records(name)))
    try:
        record = codec(name).decode(value)
    except DecodeError as exc:
        assert exc.reason == "invalid_avro" and "OverflowError" in exc.detail, exc
        return
    assert set(record) == {f["name"] for f in raw_schema(name)["fields"]}


@pytest.mark.parametrize("name", VALUE_SCHEMAS)
@FAST
@given(data=st.data())
def test_truncated_and_padded_records_are_refused(name: str, data: st.DataObject) -> None:
    value = hostile_encode(name, data.draw(raw_records(name)))
    cut = data.draw(st.integers(0, len(value) - 1))
    with pytest.raises(DecodeError) as truncated:
        codec(name).decode(value[:cut])
    assert truncated.value.reason in CODEC_REASONS
    extra = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(DecodeError) as padded:
        codec(name).decode(value + extra)
    assert padded.value.reason == "invalid_avro"


@pytest.mark.parametrize("writer", VALUE_SCHEMAS)
def test_a_record_of_another_topics_schema_is_unknown_schema(writer: str) -> None:
    value = hostile_encode(
        writer, {f["name"]: _minimal(f["type"]) for f in raw_schema(writer)["fields"]}
    )
    for reader in VALUE_SCHEMAS:
        if reader == writer:
            assert isinstance(codec(reader).decode(value), dict)
            continue
        with pytest.raises(DecodeError) as exc:
            codec(reader).decode(value)
        assert exc.value.reason == "unknown_schema", (reader, writer)
        assert exc.value.detail.startswith(f"{reader}: writer fingerprint")


def _minimal(t: Any) -> Any:
    if isinstance(t, list):
        return None if "null" in t else _minimal(t[0])
    if isinstance(t, dict):
        if t["type"] == "record":
            return {f["name"]: _minimal(f["type"]) for f in t["fields"]}
        if t["type"] in ("array", "map"):
            return [] if t["type"] == "array" else {}
        return _minimal(t["type"])
    return {"string": "x", "long": 1, "int": 1, "bytes": b"\x01", "boolean": True, "double": 1.0}[t]


# --- rating: billing.usage and billing.subscriptions -----------------------------------


@FAST
@given(data=st.binary(max_size=200), usage=st.booleans(), published=published_times())
def test_rating_decoder_random_bytes(data: bytes, usage: bool, published: int | None) -> None:
    event, account, error = decode_input(data, usage, published)
    assert event is None and account is None and error is not None  # no luck turns it valid
    assert error[0] in CODEC_REASONS
    check_detail(error[1])


def expected_usage_problem(rec: dict[str, Any], published: int | None) -> str | None:
    """The oracle: what the rating processor must say about a hostile usage record."""
    us = rec["timestamp"]
    if not in_datetime_range(us):
        return "invalid_avro"
    q = int.from_bytes(rec["quantity"], "big", signed=True)  # unscaled, scale 9
    if "" in (rec["event_id"], rec["subscription_id"], rec["metric"]):
        return "invalid_event"
    if q < 0 or q >= 10**27:  # negative, or 10**18 and more
        return "invalid_event"
    if us < micros(EARLIEST):
        return "invalid_event"
    if published is not None and us // 1000 > published + MAX_FUTURE // timedelta(milliseconds=1):
        return "invalid_event"
    return None


@FAST
@given(rec=raw_records("usage_event"), published=published_times())
def test_rating_usage_decoder_against_an_oracle(rec: dict, published: int | None) -> None:
    event, account, error = decode_input(hostile_encode("usage_event", rec), True, published)
    expected = expected_usage_problem(rec, published)
    if expected is None:
        assert error is None, error
        assert event is not None and account == rec["account_id"]
        assert event.quantity == Decimal(
            int.from_bytes(rec["quantity"], "big", signed=True)
        ).scaleb(-9)
        assert micros(event.timestamp) == rec["timestamp"]
    else:
        assert event is None and error is not None and error[0] == expected, (error, rec)
        check_detail(error[1])


SUB_TYPES = [
    "subscription.created",
    "subscription.plan_changed",
    "subscription.cancelled",
    "subscription.paused",
    "usage",
    "",
]


@FAST
@given(
    rec=raw_records(
        "subscription_event",
        type=st.sampled_from(SUB_TYPES),
        mode=st.sampled_from([None, "immediate", "end_of_period", "whenever", ""]),
        plan_id=st.sampled_from([None, "", "starter-eur", "pro-usd", "gold"]),
        payment_method=st.sampled_from([None, "", "tok_visa"]),
    ),
    published=published_times(),
)
def test_rating_subscription_decoder(rec: dict, published: int | None) -> None:
    event, account, error = decode_input(
        hostile_encode("subscription_event", rec), False, published
    )
    if not in_datetime_range(rec["timestamp"]):
        assert error is not None and error[0] == "invalid_avro"
        return
    late = published is not None and rec["timestamp"] // 1000 > published + 86_400_000
    bad_time = rec["timestamp"] < micros(EARLIEST) or late
    bad_type = rec["type"] not in SUB_TYPES[:3]
    if event is None:
        assert error is not None and error[0] == "invalid_event", error
        check_detail(error[1])
    else:
        assert error is None and not bad_time and not bad_type
        assert account == rec["account_id"] and event.subscription_id == rec["subscription_id"]
        assert rec["subscription_id"] and micros(event.timestamp) == rec["timestamp"]
    if bad_time or bad_type or rec["subscription_id"] == "":
        assert error is not None


V2_SUB_TYPES = [
    *SUB_TYPES, "subscription.resumed", "coupon.applied", "credit.granted", "customer.updated",
    "plan.published", "plan.retired",
]  # fmt: skip
V2_TOPIC_TYPES = {t for t in V2_SUB_TYPES if t and t != "usage" and not t.startswith("plan.")}


@FAST
@given(
    rec=raw_records(
        "subscription_event",
        type=st.sampled_from(V2_SUB_TYPES),
        mode=st.sampled_from([None, "immediate", "end_of_period", "whenever", ""]),
        plan_id=st.sampled_from([None, "", "starter-eur", "gold"]),
        percent_off=st.sampled_from([None, "", "10", "100", "100.1", "0", "-5", "1e2", "x"]),
        amount_off=st.sampled_from([None, "", "5.50", "0", "NaN", " 5"]),
        duration=st.sampled_from([None, "", "once", "repeating", "forever", "weekly"]),
        currency=st.sampled_from([None, "", "EUR", "JPY", "eur", "XXX1"]),
        amount=st.sampled_from([None, "", "20.00", "20.001", "500", "0", "-1", "1E+3"]),
        country=st.sampled_from([None, "", "NL", "nl", "NLD"]),
    ),
    published=published_times(),
)
def test_rating_subscription_decoder_of_contract_2(rec: dict, published: int | None) -> None:
    """Version 2: any record of the layout is an event of a type the topic carries, valid
    by parse_event, or one dead letter (plan events: invalid_event, never an event)."""
    event, account, error = decode_input(
        hostile_encode("subscription_event", rec), False, published, contract=2
    )
    if not in_datetime_range(rec["timestamp"]):
        assert error is not None and error[0] == "invalid_avro"
        return
    if event is None:
        assert account is None and error is not None and error[0] == "invalid_event", error
        check_detail(error[1])
        if rec["type"].startswith("plan."):
            assert error[1] == "plan events belong on billing.catalog"
        return
    assert error is None and account == rec["account_id"] and rec["type"] in V2_TOPIC_TYPES
    assert micros(event.timestamp) == rec["timestamp"] >= micros(EARLIEST)
    assert type(event).__name__ == type(parse_event_of(rec)).__name__
    if hasattr(event, "subscription_id"):
        assert event.subscription_id == rec["subscription_id"] != ""
    if rec["type"] in ("credit.granted", "customer.updated"):
        assert event.account_id == rec["account_id"]  # type: ignore[union-attr]


def parse_event_of(rec: dict[str, Any]) -> Any:
    """The oracle: parse_event on the record as JSON would give it (nulls absent)."""
    from streams.domain.events import parse_event
    from streams.domain.timestamps import from_micros

    d = {k: v for k, v in rec.items() if v is not None}
    return parse_event({**d, "timestamp": from_micros(rec["timestamp"])})


@FAST
@given(rec=raw_records("usage_event"), published=published_times())
def test_rating_usage_decoder_of_contract_2(rec: dict, published: int | None) -> None:
    """Version 2 refuses what version 1 refuses, and gives the same usage with its
    properties as written and its arrival from the record's timestamp."""
    value = hostile_encode("usage_event", rec)
    v1 = decode_input(value, True, published)
    event, account, error = decode_input(value, True, published, contract=2)
    if v1[2] is not None:
        assert (event, account, error) == v1
        return
    assert error is None and account == v1[1] and event is not None
    assert event.properties == rec["properties"]  # type: ignore[union-attr]
    assert dataclasses.replace(event, properties=None, received_at=None) == v1[0]
    if published is None or micros(event.timestamp) // 1000 == published:
        assert event.received_at is None  # type: ignore[union-attr]
    else:
        assert micros(event.received_at) == published * 1000  # type: ignore[union-attr,arg-type]


def run_rating(inputs: list[hostile.Input]) -> RatingProcessor:
    """Every input as one consumed batch of partition 0 (offset = index), both topics
    caught up, in one transaction of a RatingProcessor with no Kafka (its producer
    records what it commits); returned closed."""
    topics = {hostile.SUBSCRIPTIONS: SUBSCRIPTIONS.name, hostile.USAGE: USAGE.name}
    msgs = [Msg(topics[inp.topic], inp.value, inp.key, 0, n, PUBLISHED_MS)
            for n, inp in enumerate(inputs)]  # fmt: skip
    with tempfile.TemporaryDirectory() as home:
        proc = hostile.rating_processor(CATALOG, Path(home))
        proc.transaction(msgs)
        proc.close()
    return proc


def produced(proc: RatingProcessor) -> tuple[list[dict], list[dict]]:
    """(dead letters, invoices) the processor produced, decoded."""
    dead, invoices = [], []
    for topic, _key, value in proc.producer.produced:
        if topic == DEAD_LETTER.name:
            dead.append(codec(DEAD_LETTER.schema).decode(value))
        elif topic != RATING_CHANGELOG.name:
            assert topic == INVOICES.name
            invoices.append(codec(INVOICES.schema).decode(value))
    return dead, invoices


def check_rating_outcomes(
    scenario: hostile.Scenario, dead: list[dict], invoices: list[dict]
) -> None:
    """Every hostile input has its one dead letter (reason, detail), no valid input has
    any, and the valid ones had their effect: a created invoice per subscription, and the
    first period's invoice bills exactly its valid usage, each event id once."""
    by_offset = Counter(d["source_offset"] for d in dead)
    assert all(n == 1 for n in by_offset.values()), by_offset  # one dead letter per input
    for n, inp in enumerate(scenario.inputs):
        letters = [d for d in dead if d["source_offset"] == n]
        if inp.expect is None:
            assert letters == [], (inp.what, letters)
            continue
        assert len(letters) == 1, inp.what
        reason, fragment = inp.expect
        assert letters[0]["reason"] == reason, (
            inp.what,
            letters[0]["reason"],
            letters[0]["detail"],
        )
        assert fragment in letters[0]["detail"], (inp.what, letters[0]["detail"])
        assert letters[0]["value"] == inp.value and letters[0]["key"] == inp.key
        assert letters[0]["processor"] == "rating" and letters[0]["reason"] in DEAD_LETTER_REASONS
        check_detail(letters[0]["detail"])
    # inputs = processed + dead letters, each input counted once
    assert len(scenario.inputs) == len(scenario.valid) + len(dead)
    assert len(dead) == len(scenario.hostile)
    by_sub: dict[str, list[dict]] = {}
    for inv in invoices:
        by_sub.setdefault(inv["subscription_id"], []).append(inv)
    assert set(by_sub) == set(scenario.subscriptions)
    for sub, invs in by_sub.items():
        assert [i["reason"] for i in invs] == ["created", "period_end"], sub
        usage = [ln for ln in invs[1]["lines"] if ln["kind"] == "usage"]
        assert [ln["quantity"] for ln in usage] == [scenario.first_period_usage[sub]], sub
        assert invs[1]["currency"] == "EUR" and invs[1]["account_id"] in scenario.accounts


@SLOW
@given(
    accounts=st.integers(1, 4),
    kinds=st.lists(st.sampled_from(HOSTILE_KINDS), max_size=30),
    seed=st.integers(0, 2**32),
)
def test_rating_processor_on_a_hostile_mix(accounts: int, kinds: list[str], seed: int) -> None:
    scenario = hostile.rating_scenario("t-", accounts, kinds, PUBLISHED, seed)
    proc = run_rating(scenario.inputs)
    dead, invoices = produced(proc)
    check_rating_outcomes(scenario, dead, invoices)
    assert proc.invoices_emitted == len(invoices)
    # nothing stays behind: every record was consumed, and committed
    assert not any(proc.alignment.buffers[0].values())
    last = {
        t: max(n for n, i in enumerate(scenario.inputs) if i.topic == k)
        for k, t in ((hostile.SUBSCRIPTIONS, SUBSCRIPTIONS.name), (hostile.USAGE, USAGE.name))
        if any(i.topic == k for i in scenario.inputs)
    }
    assert proc.producer.offsets == [{(t, 0): n + 1 for t, n in last.items()}]


def test_every_hostile_kind_in_one_mix() -> None:
    """Each kind once (the property above draws them at random)."""
    scenario = hostile.rating_scenario("one-", 3, list(HOSTILE_KINDS), PUBLISHED, seed=7)
    proc = run_rating(scenario.inputs)
    dead, invoices = produced(proc)
    check_rating_outcomes(scenario, dead, invoices)
    assert Counter(d["reason"] for d in dead) == Counter(
        i.expect[0] for i in scenario.hostile if i.expect
    )
    assert {d["reason"] for d in dead} == DEAD_LETTER_REASONS - {"invalid_bill_run"}


def test_far_future_usage_would_have_invoiced_decades() -> None:
    """Why the timestamp bounds exist: the domain alone, given a usage event in 2100,
    closes and invoices every monthly period up to it."""
    from streams.domain.events import parse_event
    from streams.domain.rating import apply_event

    created = parse_event(
        {
            "type": "subscription.created",
            "timestamp": "2026-01-05T00:00:00Z",
            "account_id": "a",
            "subscription_id": "s",
            "plan_id": "starter-eur",
        }
    )
    state, _, _ = apply_event(None, created, CATALOG)
    usage = parse_event(
        {
            "type": "usage",
            "timestamp": "2100-01-01T00:00:00Z",
            "event_id": "e",
            "subscription_id": "s",
            "metric": "api_calls",
            "quantity": "1",
        }
    )
    _, invoices, _ = apply_event(state, usage, CATALOG)
    assert len(invoices) > 800
    value = hostile_encode(
        "usage_event",
        {
            "event_id": "e",
            "timestamp": micros(usage.timestamp),
            "account_id": "a",
            "subscription_id": "s",
            "metric": "api_calls",
            "quantity": unscaled(10**9),
        },
    )
    assert decode_input(value, True, PUBLISHED_MS)[2][0] == "invalid_event"


def test_another_accounts_subscription_is_not_billed() -> None:
    state = SubscriptionState.from_bytes(
        SubscriptionState(
            "s",
            "owner",
            "starter-eur",
            "EUR",
            CATALOG.plan("starter-eur").interval,
            datetime(2026, 1, 5, tzinfo=UTC),
            0,
            datetime(2026, 1, 5, tzinfo=UTC),
        ).to_bytes()
    )
    from streams.domain.events import Usage

    usage = Usage("e", datetime(2026, 1, 6, tzinfo=UTC), "s", "api_calls", Decimal(5))
    same, invoices, reasons = rating.apply_input(state, usage, "intruder", CATALOG)
    assert (
        reasons == ["subscription 's' belongs to another account than 'intruder'"]
        and invoices == []
    )
    assert same.usage == {} and not same.seen_event_ids
    _, _, reasons = rating.apply_input(state, usage, "owner", CATALOG)
    assert reasons == [] and state.usage["api_calls"]["sum"] == 5


# --- rating: bill-run commands (billing.control) -----------------------------------------

INPUT_TOPICS = (SUBSCRIPTIONS.name, USAGE.name)


@FAST
@given(
    rec=raw_records(
        "bill_run",
        barrier=st.dictionaries(
            st.sampled_from([*INPUT_TOPICS, "billing.invoices", ""]),
            st.integers(-5, 10**6),
            max_size=3,
        ),
    ),
    published=published_times(),
)
def test_bill_run_decoder(rec: dict, published: int | None) -> None:
    value = hostile_encode("bill_run", rec)
    if not in_datetime_range(rec["until"], rec["issued_at"]):
        with pytest.raises(DecodeError, match="OverflowError"):
            decode_bill_run(value, INPUT_TOPICS, published)
        return
    issued = published if published is not None else rec["issued_at"] // 1000
    runnable = (
        set(rec["barrier"]) <= set(INPUT_TOPICS)
        and all(o >= 0 for o in rec["barrier"].values())
        and rec["until"] // 1000 <= issued + 86_400_000
    )
    try:
        run = decode_bill_run(value, INPUT_TOPICS, published)
    except DecodeError as exc:
        assert not runnable and exc.reason == "invalid_bill_run", exc
        check_detail(exc.detail)
    else:
        assert runnable and run["barrier"] == rec["barrier"]


def test_a_bad_bill_run_is_a_dead_letter_and_is_committed(tmp_path: Path) -> None:
    """It used to be skipped with a log line only (and read again after every restart)."""
    proc = hostile.rating_processor(CATALOG, tmp_path)
    at = datetime(2026, 3, 1, tzinfo=UTC)
    runs = [
        b"\x00junk",
        codec("bill_run").encode({
            "run_id": "r", "until": at + timedelta(days=3650), "accounts": None,
            "barrier": {USAGE.name: 3}, "issued_at": at,
        }),
    ]  # fmt: skip
    proc.transaction([Msg(CONTROL.name, value, None, 0, n, ms(at)) for n, value in enumerate(runs)])
    proc.close()
    dead, _ = produced(proc)
    assert [d["reason"] for d in dead] == ["invalid_avro", "invalid_bill_run"]
    assert "after the run was issued" in dead[1]["detail"] and proc.jobs.running == {}
    assert proc.producer.offsets == [{(CONTROL.name, 0): 2}]


# --- payments: invoices, payment requests and retries ------------------------------------

SCHEDULE = parse_schedule("1d,3d,7d")
CURRENCIES = ["EUR", "USD", "JPY", "KWD", "eur", "", "ZZZ", "EURO", "€"]
VALID_CURRENCIES = {"EUR", "USD", "JPY", "KWD"}


def expected_request_problem(rec: dict[str, Any]) -> bool:
    amount = int.from_bytes(rec["amount"], "big", signed=True)
    return (
        rec["attempt"] < 1
        or amount <= 0
        or ""
        in (rec["invoice_id"], rec["account_id"], rec["idempotency_key"], rec["payment_method"])
        or rec["currency"] not in VALID_CURRENCIES
    )


@FAST
@given(
    rec=raw_records(
        "payment_request", attempt=st.integers(-3, 9), currency=st.sampled_from(CURRENCIES)
    )
)
def test_payment_request_decoder(rec: dict) -> None:
    value = hostile_encode("payment_request", rec)
    if not in_datetime_range(rec["not_before"], rec["requested_at"]):
        with pytest.raises(DecodeError, match="OverflowError"):
            payments.decode_request(value)
        return
    try:
        request = payments.decode_request(value)
    except DecodeError as exc:
        assert expected_request_problem(rec) and exc.reason == "invalid_request", exc
        check_detail(exc.detail)
        return
    assert not expected_request_problem(rec)
    # what PaymentsProcessor._complete does with any outcome of an accepted request: no
    # exception (an attempt below 1 used to charge, then crash the processor, forever)
    for outcome in ("succeeded", "declined", "failed"):
        step = after_attempt(outcome, request["attempt"], datetime.now(UTC), SCHEDULE)
        if isinstance(step, payments.Retry):
            assert PAYMENT_RETRIES[request["attempt"] - 1]


def test_a_payment_request_due_beyond_the_dunning_schedule_is_refused() -> None:
    """A retry topic is read in order: a request not due for years would hold its
    partition up for years. The processor refuses what is due after its longest wait."""
    now = datetime.now(UTC)
    rec = {"payment_id": "inv-1:2", "idempotency_key": "inv-1:2", "invoice_id": "inv-1",
           "account_id": "acct-1", "attempt": 2, "amount": Decimal("9.90"), "currency": "EUR",
           "payment_method": "tok_visa", "gateway_account": "merchant-1",
           "not_before": now + timedelta(days=400), "requested_at": now}  # fmt: skip
    value = codec("payment_request").encode(rec)
    assert payments.decode_request(value)["not_before"] == rec["not_before"]  # no bound
    with pytest.raises(DecodeError, match="beyond the dunning schedule") as refused:
        payments.decode_request(value, now + timedelta(days=36))
    assert refused.value.reason == "invalid_request"
    due_soon = {**rec, "not_before": now + timedelta(days=7)}
    assert payments.decode_request(codec("payment_request").encode(due_soon),
                                   now + timedelta(days=36))  # fmt: skip


def test_the_crash_a_bad_attempt_number_caused() -> None:
    with pytest.raises(ValueError, match="count from 1"):
        after_attempt("declined", 0, datetime.now(UTC), SCHEDULE)


@FAST
@given(
    rec=raw_records(
        "invoice",
        currency=st.sampled_from(CURRENCIES),
        payment_method=st.sampled_from([None, "", "tok_visa"]),
    )
)
def test_invoice_decoder_of_the_payments_processor(rec: dict) -> None:
    value = hostile_encode("invoice", rec)
    stamps = [rec["issued_at"]] + [
        t for ln in rec["lines"] for t in (ln["period_start"], ln["period_end"])
    ]
    if rec["finalized_at"] is not None:
        stamps.append(rec["finalized_at"])
    # what payments collects: the amount due (a record without one: its total)
    due = rec["total"] if rec["amount_due"] is None else rec["amount_due"]
    total = int.from_bytes(due, "big", signed=True)
    try:
        request = payments.request_for_invoice(value, ("m-1", "m-2"), PUBLISHED)
    except DecodeError as exc:
        if not in_datetime_range(*stamps):
            assert exc.reason == "invalid_avro"
            return
        assert exc.reason == "invalid_invoice" and total > 0 and rec["payment_method"]
        assert rec["currency"] not in VALID_CURRENCIES or "" in (
            rec["invoice_id"],
            rec["account_id"],
        )
        return
    assert in_datetime_range(*stamps)
    if request is None:  # nothing to collect
        assert total <= 0 or not rec["payment_method"]
    else:
        assert (
            total > 0 and request["attempt"] == 1 and request["gateway_account"] in ("m-1", "m-2")
        )
        assert payments.request_problem(request) is None


class _FakeConsumer:
    def __init__(self) -> None:
        self.paused: list[Any] = []

    def pause(self, tps: list[Any]) -> None:
        self.paused += tps


class _NoCustomers(dict):
    """No account has a customer record (the payments processor's customer table)."""

    def close(self) -> None:
        pass


class _Unanswered:
    """A gateway that never answers: an attempt started stays in flight."""

    async def charge(self, request: Any) -> Any:
        await asyncio.Event().wait()

    async def refund(self, request: Any) -> Any:
        await asyncio.Event().wait()

    async def lookup(self, merchant_account: str, idempotency_key: str) -> None:
        return None

    async def close(self) -> None:
        return None


def _payable(i: int, due_in_days: int, attempt: int) -> dict[str, Any]:
    """A payment request the dispatcher attempts: due (days <= 0) or held until due."""
    inv = {**sample("invoice", i), "payment_method": f"tok_{i}", "total": Decimal("9.90")}
    request = payments.request_for_invoice(codec("invoice").encode(inv), ("m-1", "m-2"), PUBLISHED)
    assert request is not None
    due = datetime.now(UTC) + timedelta(days=due_in_days)
    return {**request, "attempt": attempt, "not_before": due}


def _plausible(kind: str) -> st.SearchStrategy[bytes]:
    """Valid records of a payments input (a payable invoice, a request due or not)."""
    if kind == "invoice":
        return st.integers(0, 50).map(lambda i: codec(kind).encode(sample(kind, i)))
    if kind == "payment_request":
        args = st.tuples(st.integers(0, 50), st.integers(-3, 3), st.integers(1, 3))
        return args.map(lambda a: codec(kind).encode(_payable(*a)))
    return raw_records(kind).map(lambda r: hostile_encode(kind, r))


def _any_schema_record() -> st.SearchStrategy[bytes]:
    return st.sampled_from(VALUE_SCHEMAS).flatmap(
        lambda name: raw_records(name).map(lambda r: hostile_encode(name, r))
    )


@SLOW
@given(data=st.data())
def test_payments_processor_handles_every_input(data: st.DataObject) -> None:
    """PaymentsProcessor.handle on a mix of its input topics, valid and hostile records:
    each is an attempt (started, or waiting until due), a record finished at once
    (nothing to collect, a payment run) or exactly one dead letter; nothing raises."""
    kinds = {
        INVOICES.name: "invoice",
        PAYMENT_REQUESTS.name: "payment_request",
        PAYMENT_RETRIES[0].name: "payment_request",
        PAYMENT_CONTROL.name: "payment_run",
    }
    msgs = []
    for n in range(data.draw(st.integers(1, 25), label="messages")):
        topic = data.draw(st.sampled_from(sorted(kinds)))
        own = raw_records(
            kinds[topic], attempt=st.integers(-1, 4), currency=st.sampled_from(CURRENCIES)
        ).map(lambda r, k=kinds[topic]: hostile_encode(k, r))
        plausible = _plausible(kinds[topic])
        value = data.draw(
            st.one_of(st.binary(max_size=40), own, own, plausible, _any_schema_record())
        )
        msgs.append(Msg(topic, value, b"a", 0, n))
    producer = FakeProducer()
    settings = Settings(merchant_accounts=("m-1", "m-2"), dunning="1d,3d,7d")

    async def handle() -> tuple[payments.PaymentsProcessor, list[payments.Attempt | None]]:
        stream = StreamLoop(payments.NAME, _FakeConsumer(), producer)
        proc = payments.PaymentsProcessor(settings, stream, _Unanswered(), _NoCustomers())
        handled = [proc.handle(msg) for msg in msgs]
        await asyncio.sleep(0)  # the attempts started reach the gateway, and wait there
        held = sum(len(q) for q in proc.held.values())
        assert len(proc.loop.tasks) == sum(a is not None for a in handled) - held
        return proc, handled

    proc, handled = asyncio.run(handle())
    assert all(t == DEAD_LETTER.name for t, _, _ in producer.produced)
    dead = [codec(DEAD_LETTER.schema).decode(v) for _, _, v in producer.produced]
    reasons = {*CODEC_REASONS, "invalid_request", "invalid_invoice"}
    for d in dead:
        assert d["reason"] in reasons and d["processor"] == "payments"
        check_detail(d["detail"])
    attempts = [a for a in handled if a is not None]
    for a in attempts:
        assert payments.request_problem(a.request) is None
    # finished at once: neither an attempt in flight nor a dead letter awaiting delivery
    unfinished = {
        (tp[0], o) for tp, started in proc.offsets.started.items()
        for o in set(started) - proc.offsets.finished[tp]
    }  # fmt: skip
    finished = [(m.topic(), m.offset()) for m in msgs if (m.topic(), m.offset()) not in unfinished]
    outcomes = (
        [(a.source[0], a.offset) for a in attempts]
        + [(d["source_topic"], d["source_offset"]) for d in dead]
        + finished
    )
    # inputs = attempts + finished at once + dead letters, each input exactly once
    assert sorted(outcomes) == sorted((m.topic(), m.offset()) for m in msgs)
    for topic, _ in finished:
        assert topic in (INVOICES.name, PAYMENT_CONTROL.name)


# --- the lanes: refunds and cancellations -----------------------------------------------


@FAST
@given(
    paid=st.decimals(min_value="0.01", max_value="100000", places=2),
    refunded=st.decimals(min_value=0, max_value="100000", places=2),
    amount=st.one_of(
        st.decimals(min_value="-1e20", max_value="1e20", places=9, allow_nan=False),
        st.just(Decimal(0)),
    ),
    currency=st.sampled_from(["EUR", "USD", "eur", ""]),
    invoice=st.sampled_from(["inv-paid", "inv-unpaid", "inv-unknown"]),
)
def test_refund_refusal_against_an_oracle(
    paid: Decimal, refunded: Decimal, amount: Decimal, currency: str, invoice: str
) -> None:
    ledger = RefundLedger()
    ledger.record_paid("inv-paid", Paid("ch_1", "m-1", paid, "EUR"))
    ledger.subscription_of.update({"inv-paid": "s", "inv-unpaid": "s"})
    ledger.refunded["inv-paid"] = refunded
    req = {
        "refund_id": "r",
        "invoice_id": invoice,
        "account_id": "a",
        "amount": amount,
        "currency": currency,
    }
    if invoice != "inv-paid":
        expected = "invoice_not_paid" if invoice == "inv-unpaid" else "unknown_invoice"
    elif currency != "EUR":
        expected = "currency_mismatch"
    elif amount <= 0:
        expected = "amount_not_positive"
    elif amount > paid - refunded:
        expected = "amount_exceeds_paid"
    else:
        expected = None
    assert refund_refusal(ledger, req) == expected


LANE_REASONS = {"not_a_cancellation", "invalid_mode", "invalid_event"}


@FAST
@given(
    rec=raw_records(
        "subscription_event",
        type=st.sampled_from(SUB_TYPES),
        mode=st.sampled_from([None, "immediate", "end_of_period", "whenever"]),
    ),
    published=published_times(),
    owner=st.sampled_from([None, "same", "other"]),
    cancelled_by=st.sampled_from([None, "same", "other"]),
)
def test_cancellation_checks(
    rec: dict, published: int | None, owner: str | None, cancelled_by: str | None
) -> None:
    """What the lane forwards to billing.subscriptions is exactly what the rating
    processor accepts: the entitlement is never deactivated for a cancellation that is
    then dead-lettered downstream."""
    value = hostile_encode("subscription_event", rec)
    try:
        event = codec(CANCELLATIONS.schema).decode(value)
    except DecodeError:
        assert not in_datetime_range(rec["timestamp"])
        return
    problem = cancellation_problem(event, published)
    downstream = decode_input(value, False, published)
    if problem is not None:
        assert problem[0] in LANE_REASONS, problem
        check_detail(problem[1])
        if problem[0] == "invalid_event":
            assert downstream[2] is not None and downstream[2][0] == "invalid_event"
        return
    assert downstream[2] is None and type(downstream[0]).__name__ == "Cancelled"
    sub = (
        None
        if owner is None
        else Subscription(
            rec["account_id"] if owner == "same" else rec["account_id"] + "-x",
            {None: None, "same": rec["event_id"], "other": rec["event_id"] + "-x"}[cancelled_by],
        )
    )
    refusal = cancellation_refusal(event, sub)
    expected = (
        "unknown_subscription"
        if owner is None
        else "account_mismatch"
        if owner == "other"
        else "already_cancelled"
        if cancelled_by == "other"
        else None
    )
    assert (refusal[0] if refusal else None) == expected


# --- the sink: every landed topic -------------------------------------------------------

SINK_SCHEMAS = {base: spec_for_base(base).schema for base in LANDERS}
SAMPLED = {
    "invoice",
    "subscription_event",
    "usage_event",
    "payment_result",
    "refund_result",
    "entitlement",
}


INT128 = Decimal(2**127 - 1).scaleb(-9)  # a Decimal(38, 9) column holds 128 bits


def _decimals(value: Any) -> list[Decimal]:
    if isinstance(value, Decimal):
        return [value]
    if isinstance(value, dict):
        return [d for v in value.values() for d in _decimals(v)]
    if isinstance(value, list):
        return [d for v in value for d in _decimals(v)]
    return []


def fits_the_warehouse(schema: str, rec: dict[str, Any]) -> bool:
    """The oracle: can the landing tables (deploy/clickhouse) hold this decoded record?"""
    amounts = _decimals(rec)
    if schema == "invoice":  # and its sums per kind
        kinds = [ln["kind"] in sink.RECURRING_KINDS for ln in rec["lines"]]
        amounts += [
            sum((ln["amount"] for ln, k in zip(rec["lines"], kinds, strict=True) if k), Decimal(0)),
            sum(
                (ln["amount"] for ln, k in zip(rec["lines"], kinds, strict=True) if not k),
                Decimal(0),
            ),
        ]
    if schema != "dead_letter" and any(abs(d) > INT128 for d in amounts):
        return False
    if schema == "payment_result" and not 0 <= rec["attempt"] < 2**16:
        return False
    return schema != "dead_letter" or (
        0 <= rec["source_partition"] < 2**16 and 0 <= rec["source_offset"] < 2**64
    )


def _sink(producer: FakeProducer, settings: Settings | None = None, client: Any = None) -> Sink:
    """A sink whose dead letters go to `producer`; it consumes nothing here. Without a
    client: a warehouse server that is never connected to."""
    settings = settings or Settings(clickhouse_dsn="clickhouse://localhost:1")
    stream = StreamLoop("sink", _FakeConsumer(), producer)
    return Sink(settings, client, stream, serve_queries=False)


@SLOW
@given(data=st.data())
def test_sink_lands_or_dead_letters_every_message(data: st.DataObject) -> None:
    """Sink._map_in_python (the path of every message ClickHouse does not take in bulk):
    rows + dead letters = messages, per topic; what does not decode, or decodes to values
    the tables cannot hold, is a dead letter (none of its rows land); dead letters are
    never dead-lettered again."""
    base = data.draw(st.sampled_from(sorted(LANDERS)))
    spec, schema = spec_for_base(base), SINK_SCHEMAS[base]
    plausible = (
        st.integers(0, 50).map(lambda i: codec(schema).encode(sample(schema, i)))
        if schema in SAMPLED
        else raw_records(schema).map(lambda r: hostile_encode(schema, r))
    )
    values = data.draw(
        st.lists(
            st.one_of(
                st.binary(max_size=60),
                raw_records(schema).map(lambda r: hostile_encode(schema, r)),
                plausible,
                _any_schema_record(),
            ),
            max_size=20,
        )
    )
    msgs = [Msg(spec.name, v, b"k", 1, n) for n, v in enumerate(values)]
    producer = FakeProducer()
    rows: dict[str, list[list[Any]]] = {table: [] for table in COLUMNS}
    bad = _sink(producer)._map_in_python(spec, msgs, rows)
    expected_bad = 0
    for v in values:
        try:
            expected_bad += not fits_the_warehouse(schema, codec(schema).decode(v))
        except DecodeError:
            expected_bad += 1
    assert bad == expected_bad
    # one row per landed message in the topic's main table (invoices: one per invoice)
    main = {
        "billing.invoices": "invoices",
        "billing.subscriptions": "subscription_events",
        "billing.usage": "usage_events",
        "billing.payment-results": "payment_attempts",
        "billing.refund-results": "refunds",
        "billing.entitlements": "entitlements",
        "billing.dead-letter": "dead_letters",
        "billing.customers": "customers",
        "billing.alerts": "alerts",
    }[base]
    assert len(rows[main]) + bad == len(values)
    for table, table_rows in rows.items():
        for row in table_rows:
            assert sink.out_of_range(table, row) is None
    letters = producer.produced
    if spec is DEAD_LETTER:
        assert letters == []
    else:
        assert len(letters) == bad
        for topic, _, value in letters:
            d = codec(DEAD_LETTER.schema).decode(value)
            assert topic == DEAD_LETTER.name and d["processor"] == "sink"
            assert d["reason"] in CODEC_REASONS | {"out_of_range"}
            check_detail(d["detail"])


def test_records_beyond_the_tables_are_dead_letters_and_the_rest_lands(tmp_path: Any) -> None:
    """On the real embedded engine: an enormous usage quantity, a negative payment attempt
    and a dead letter with a negative offset used to fail the whole insert (and the sink,
    on every restart); now they are refused one by one and the rest lands."""
    from streams.warehouse import connect, disconnect, migrate

    at = micros(PUBLISHED)
    usage = [
        hostile_encode(
            "usage_event",
            {
                "event_id": f"u{i}",
                "timestamp": at,
                "account_id": "a",
                "subscription_id": "s",
                "metric": "m",
                "quantity": unscaled(q),
            },
        )
        for i, q in enumerate([10**9, 10**48, -(10**48), 5 * 10**9])
    ]
    result = codec("payment_result").encode(sample("payment_result", 1))
    hostile_result = hostile_encode(
        "payment_result",
        {
            **{k: v for k, v in sample("payment_result", 2).items()},
            "attempt": -1,
            "amount": unscaled(1234),
            "completed_at": at,
        },
    )
    letter = {
        "dead_letter_id": "d",
        "source_topic": "t",
        "source_partition": 0,
        "source_offset": 5,
        "key": None,
        "value": None,
        "reason": "r",
        "detail": "x",
        "processor": "p",
        "failed_at": at,
    }
    letters = [
        hostile_encode("dead_letter", letter),
        hostile_encode("dead_letter", {**letter, "dead_letter_id": "e", "source_offset": -1}),
    ]
    dsn = f"chdb://{tmp_path / 'wh'}"
    client = connect(dsn)
    try:
        migrate(client)
        producer = FakeProducer()
        settings = Settings(home=tmp_path, clickhouse_dsn=dsn)
        proc = _sink(producer, settings, client)
        landed = {}
        for base, values in (
            ("billing.usage", usage),
            ("billing.payment-results", [result, hostile_result]),
            ("billing.dead-letter", letters),
        ):
            rows: dict[str, list[list[Any]]] = {table: [] for table in COLUMNS}
            spec = spec_for_base(base)
            msgs = [Msg(spec.name, v, b"k", 0, n) for n, v in enumerate(values)]
            bad = proc._map_in_python(spec, msgs, rows)
            for table, table_rows in rows.items():
                if table_rows:
                    client.insert(table, table_rows, column_names=COLUMNS[table])
            landed[base] = (len(values) - bad, bad)
        assert landed == {
            "billing.usage": (2, 2),
            "billing.payment-results": (1, 1),
            "billing.dead-letter": (1, 1),
        }
        total = client.query("SELECT toString(sum(quantity)) FROM usage_events").result_rows
        assert Decimal(total[0][0]) == 6
        reasons = [codec(DEAD_LETTER.schema).decode(v)["reason"] for _, _, v in producer.produced]
        assert reasons == ["out_of_range", "out_of_range", "out_of_range"]
    finally:
        disconnect(dsn)


# --- the offline rater: counts add up -----------------------------------------------------

T0 = datetime(2026, 1, 5, tzinfo=UTC)
UNTIL = datetime(2026, 2, 28, tzinfo=UTC)


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


OFFLINE_KINDS = (
    "malformed",
    "not_object",
    "negative",
    "enormous",
    "float",
    "naive",
    "unknown_sub",
    "currency_mismatch",
    "unknown_plan",
    "duplicate_created",
    "unknown_type",
    "after_until",
    "far_future",
    "far_past",
)
DEFERRED = "(deferred)"


def _hostile_line(kind: str, n: int, created: str) -> tuple[str, str]:
    """A hostile line and the fragment of its dead letter's reason (or DEFERRED)."""
    at = _iso(T0 + timedelta(days=2, minutes=n))
    use = {
        "type": "usage",
        "event_id": f"h{n}",
        "subscription_id": "s0",
        "metric": "api_calls",
        "quantity": "1",
        "timestamp": at,
    }
    change = {"type": "subscription.plan_changed", "subscription_id": "s0", "timestamp": at}
    dump = lambda d: orjson.dumps(d).decode()  # noqa: E731
    return {
        "malformed": ('{"type": "usage", ', "malformed JSON"),
        "not_object": ("[1, 2]", "must be a JSON object"),
        "negative": (dump({**use, "quantity": "-1"}), "negative quantity"),
        "enormous": (dump({**use, "quantity": "1" + "0" * 30}), "too large"),
        "float": (dump({**use, "quantity": 1.5}), "JSON float"),
        "naive": (dump({**use, "timestamp": at[:-1]}), "no UTC offset"),
        "unknown_sub": (dump({**use, "subscription_id": "nobody"}), "unknown subscription"),
        "currency_mismatch": (dump({**change, "plan_id": "pro-usd"}), "another currency"),
        "unknown_plan": (dump({**change, "plan_id": "gold"}), "unknown plan 'gold'"),
        "duplicate_created": (created, "duplicate subscription.created"),
        "unknown_type": (dump({**change, "type": "subscription.frozen"}), "unknown event type"),
        "after_until": (dump({**use, "timestamp": "2026-03-03T00:00:00Z"}), DEFERRED),
        "far_future": (dump({**use, "timestamp": "9500-01-01T00:00:00Z"}), DEFERRED),
        "far_past": (dump({**use, "timestamp": "1990-01-01T00:00:00Z"}), "unknown subscription"),
    }[kind]


@SLOW
@given(
    accounts=st.integers(1, 4),
    usage=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(1, 25 * 24),
            st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False),
        ),
        max_size=25,
    ),
    duplicates=st.lists(st.integers(0, 100), max_size=5),
    kinds=st.lists(st.sampled_from(OFFLINE_KINDS), max_size=20),
    order=st.randoms(use_true_random=False),
)
def test_offline_rater_counts_add_up(
    accounts: int, usage: list, duplicates: list[int], kinds: list[str], order: Any
) -> None:
    """`streambill rate`: every non-blank input line is exactly one of applied (accepted by
    the state machine; a repeated usage event id too, counted once), a dead letter (one,
    with the expected reason) or deferred (after `until`): inputs = applied + dead letters
    + deferred. And the applied ones had their effect: each first period bills exactly
    its distinct usage, duplicates once; the hostile ones had none."""
    lines: list[tuple[str, str | None]] = []  # (line, fragment of its dead letter's reason)
    totals = {f"s{i}": Decimal(0) for i in range(accounts)}
    for i in range(accounts):
        created = {
            "type": "subscription.created",
            "account_id": f"a{i}",
            "subscription_id": f"s{i}",
            "plan_id": "starter-eur",
            "timestamp": _iso(T0 + timedelta(hours=i)),
        }
        lines.append((orjson.dumps(created).decode(), None))
    s0_created = lines[0][0]
    valid_usage = []
    for n, (i, hours, q) in enumerate(usage):
        sub = f"s{i % accounts}"
        use = {
            "type": "usage",
            "event_id": f"u{n}",
            "subscription_id": sub,
            "metric": "api_calls",
            "quantity": str(q),
            "timestamp": _iso(T0 + timedelta(hours=4 + hours)),
        }
        lines.append((orjson.dumps(use).decode(), None))
        valid_usage.append(lines[-1][0])
        totals[sub] += q
    for d in duplicates:
        if valid_usage:
            lines.append((valid_usage[d % len(valid_usage)], None))  # applied, counted once
    lines += [_hostile_line(kind, n, s0_created) for n, kind in enumerate(kinds)]
    order.shuffle(lines)  # out of order: the rater orders by event time itself
    # identical creations: the first in input order is applied, the others refused
    copies = [n for n, (ln, _) in enumerate(lines) if ln == s0_created]
    lines = [(ln, None if n == copies[0] else expect) for n, (ln, expect) in enumerate(lines)]
    lines = [
        (ln, "duplicate subscription.created" if n in copies[1:] else expect)
        for n, (ln, expect) in enumerate(lines)
    ]

    result = rate_events(CATALOG, [ln for ln, _ in lines], UNTIL)
    expected_dead = {n: e for n, (_, e) in enumerate(lines, start=1) if e and e != DEFERRED}
    deferred = sum(e == DEFERRED for _, e in lines)
    got = {d["line"]: d["reason"] for d in result.dead_letters}
    assert len(got) == len(result.dead_letters)  # at most one dead letter per line
    assert set(got) == set(expected_dead), (got, expected_dead)
    for n, fragment in expected_dead.items():
        assert fragment in got[n], (fragment, got[n])
    assert result.deferred == deferred
    assert result.applied == len(lines) - len(expected_dead) - deferred
    assert result.applied + len(result.dead_letters) + result.deferred == len(lines)
    assert len(result.invoices) == 2 * accounts
    for sub, total in totals.items():
        invoices = [i for i in result.invoices if i.subscription_id == sub]
        assert [i.reason for i in invoices] == ["created", "period_end"], sub
        assert [ln.quantity for ln in invoices[1].lines if ln.kind == "usage"] == [total], sub
