"""billing.catalog's reads and writes without a broker (streams/catalog_store.py against a
fake transactional producer and table that behave as Kafka's do), the sink's landing of
its records into ``plans`` (the version history, on the real embedded engine), the views
that price with it, and the API's plan body and operator flag."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import catalog_store
from streams.api import records
from streams.api.tenants import Tenant, TenantError
from streams.catalog_history import SINCE_ALWAYS, PlanHistory, from_record, publish, to_record
from streams.catalog_store import (
    ADDED,
    DIFFERS,
    NEW_VERSION,
    UNCHANGED,
    CatalogUnavailable,
    PlanAlreadyRetired,
    PlanNotFound,
    decode_history,
    publish_file,
    publish_plans,
    retire_plan,
    version_json,
)
from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.domain.catalog import Catalog, CatalogError, parse_plan
from streams.kafka.topics import CATALOG, DEAD_LETTER
from streams.processors.sink import COLUMNS, Sink, load_catalog, plan_rows
from streams.runtime.loop import StreamLoop
from streams.testbed.demo import DEMO_CATALOG
from tests.hostile import FakeProducer, Msg, hostile_encode, micros

RAW = json.loads(DEMO_CATALOG.read_text())
FILE = Catalog.from_dict(RAW)
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
SETTINGS = Settings(clickhouse_dsn="clickhouse://localhost:1")


def raw_plan(base: str = "starter-eur", **changes: Any) -> dict[str, Any]:
    """A plan of the demo catalog as the file writes it, with `changes`."""
    plan = next(p for p in RAW["plans"] if p["plan_id"] == base)
    return {**plan, **changes}


def dearer(plan_id: str = "starter-eur", amount: str = "11.00") -> Any:
    """The plan with its flat fee at `amount`."""
    raw = raw_plan(plan_id)
    charges = [{**c, "amount": amount} if c["model"] == "flat" else c for c in raw["charges"]]
    return parse_plan({**raw, "charges": charges})


# --- a fake billing.catalog: a transactional producer and a table reading it -----------------


@dataclass
class Topic:
    """What readers see (committed records only), and what happens to the next commits."""

    records: list[tuple[bytes, bytes]] = field(default_factory=list)
    inits: int = 0
    commit_faults: list[str] = field(default_factory=list)  # "fenced" | "unacknowledged"
    init_faults: int = 0  # this many init_transactions time out
    meanwhile: list[PlanHistory] = field(default_factory=list)  # another writer's, on "fenced"

    def latest(self) -> dict[str, PlanHistory]:
        out = {}
        for key, value in self.records:
            out[key.decode()] = decode_history(value)
        return out


class FakeTxProducer:
    def __init__(self, topic: Topic, conf: dict[str, Any]) -> None:
        assert conf["transactional.id"].endswith(catalog_store.WRITER_ID)
        self.topic = topic
        self.pending: list[tuple[bytes, bytes]] = []

    def init_transactions(self, timeout: float) -> None:
        if self.topic.init_faults:
            self.topic.init_faults -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "init timed out",
                                            retriable=True))  # fmt: skip
        self.topic.inits += 1

    def begin_transaction(self) -> None:
        self.pending = []

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        assert topic == CATALOG.name
        self.pending.append((key, value))

    def commit_transaction(self, timeout: float) -> None:
        fault = self.topic.commit_faults.pop(0) if self.topic.commit_faults else None
        if fault == "fenced":  # another writer initialised: ours is aborted, theirs lands
            for h in self.topic.meanwhile:
                self.topic.records.append((h.plan_id.encode(), codec("catalog_plan").encode(
                    to_record(h))))  # fmt: skip
            raise KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
        self.topic.records += self.pending
        if fault == "unacknowledged":
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "commit timed out",
                                            retriable=True))  # fmt: skip


class FakeTable:
    """A catalog table: catch_up reads every committed record."""

    def __init__(self, topic: Topic) -> None:
        self.topic = topic
        self.values: dict[str, PlanHistory] = {}

    def catch_up(self, timeout: float = 60.0) -> None:
        self.values = self.topic.latest()


@pytest.fixture
def topic(monkeypatch: pytest.MonkeyPatch) -> Topic:
    t = Topic()
    monkeypatch.setattr(catalog_store.clients, "producer",
                        lambda settings, bootstrap, **conf: FakeTxProducer(t, conf))  # fmt: skip
    monkeypatch.setattr(catalog_store.time, "sleep", lambda s: None)
    return t


def file_import(topic: Topic, catalog: Catalog = FILE, **options: Any) -> list[Any]:
    return publish_file(SETTINGS, "x", catalog, NOW, table=FakeTable(topic), **options)


def post(topic: Topic, *plans: tuple[Any, str], at: datetime = NOW) -> list[Any]:
    return publish_plans(SETTINGS, "x", list(plans), at, table=FakeTable(topic))


def actions(results: list[Any]) -> dict[str, str]:
    return {r.plan_id: r.action for r in results}


# --- writes --------------------------------------------------------------------------------


def test_a_catalog_file_is_imported_once_as_versions_since_always(topic: Topic) -> None:
    first = file_import(topic)
    assert actions(first) == dict.fromkeys(FILE.plans, ADDED)
    assert len(topic.records) == len(FILE.plans)
    for pid, h in topic.latest().items():
        assert [(v.plan.version, v.published_at, v.existing) for v in h.versions] == [
            (1, SINCE_ALWAYS, "keep")
        ]
        assert h.latest == FILE.plans[pid]
    again = file_import(topic)  # idempotent: nothing written the second time
    assert actions(again) == dict.fromkeys(FILE.plans, UNCHANGED)
    assert len(topic.records) == len(FILE.plans)


def test_a_changed_plan_gets_a_new_version_now_unless_add_only(topic: Topic) -> None:
    file_import(topic)
    changed = Catalog({**FILE.plans, "starter-eur": dearer()})
    written = len(topic.records)
    assert actions(file_import(topic, changed, add_only=True))["starter-eur"] == DIFFERS
    assert len(topic.records) == written  # add_only: never a new version
    results = file_import(topic, changed, existing="next_period")
    assert actions(results) == {**dict.fromkeys(FILE.plans, UNCHANGED), "starter-eur": NEW_VERSION}
    h = topic.latest()["starter-eur"]
    assert [(v.plan.version, v.published_at, v.existing) for v in h.versions] == [
        (1, SINCE_ALWAYS, "keep"), (2, NOW, "next_period")
    ]  # fmt: skip
    assert len(topic.records) == written + 1  # one record: the plan's whole history


def test_one_refusal_and_nothing_of_the_batch_is_written(topic: Topic) -> None:
    file_import(topic)
    retire_plan(SETTINGS, "x", "pro-usd", NOW, table=FakeTable(topic))
    written = len(topic.records)
    in_yen = parse_plan(raw_plan("growth-eur", currency="JPY"))
    with pytest.raises(CatalogError) as refused:
        post(topic, (dearer(), "keep"), (in_yen, "keep"), (dearer("pro-usd", "50"), "keep"))
    message = str(refused.value)
    assert "'growth-eur' must keep its currency and interval" in message
    assert "'pro-usd' is retired" in message  # every refusal named, not only the first
    assert len(topic.records) == written
    # the same from a file: a retired plan whose definition changed
    changed = Catalog({**FILE.plans, "pro-usd": dearer("pro-usd", "50")})
    with pytest.raises(CatalogError, match="'pro-usd' is retired"):
        file_import(topic, changed)
    assert len(topic.records) == written
    # a retired plan the file lists unchanged is no refusal
    assert actions(file_import(topic))["pro-usd"] == UNCHANGED


def test_a_publication_is_unchanged_only_with_the_same_definition_and_existing(
    topic: Topic,
) -> None:
    file_import(topic)
    same = FILE.plans["starter-eur"]
    assert actions(post(topic, (same, "keep"))) == {"starter-eur": UNCHANGED}
    (moved,) = post(topic, (same, "next_period"))  # a next_period mark is a new version
    assert (moved.action, moved.version.plan.version, moved.version.existing) == (
        NEW_VERSION, 2, "next_period")  # fmt: skip
    (new,) = post(topic, (parse_plan(raw_plan(plan_id="brand-new")), "keep"))
    assert (new.action, new.version.plan.version, new.version.published_at) == (ADDED, 1, NOW)
    with pytest.raises(CatalogError, match="given twice"):
        post(topic, (dearer(), "keep"), (dearer(amount="12"), "keep"))
    with pytest.raises(CatalogError, match="published after"):  # never back in time
        post(topic, (dearer(), "keep"), at=NOW - timedelta(seconds=1))
    with pytest.raises(CatalogError, match="existing must be keep or next_period"):
        post(topic, (dearer(), "now"))


def test_retiring(topic: Topic) -> None:
    file_import(topic)
    with pytest.raises(PlanNotFound):
        retire_plan(SETTINGS, "x", "nope", NOW, table=FakeTable(topic))
    h = retire_plan(SETTINGS, "x", "team-jpy", NOW, table=FakeTable(topic))
    assert h.retired_at == NOW and topic.latest()["team-jpy"] == h
    with pytest.raises(PlanAlreadyRetired, match="already retired"):
        retire_plan(SETTINGS, "x", "team-jpy", NOW, table=FakeTable(topic))
    with pytest.raises(CatalogError, match="is retired"):
        post(topic, (dearer("team-jpy", "6000"), "keep"))


def test_a_writer_fenced_by_another_validates_again_against_what_it_wrote(topic: Topic) -> None:
    file_import(topic)
    theirs = publish(topic.latest()["starter-eur"], dearer(amount="10.00"), NOW, "keep")
    topic.meanwhile, topic.commit_faults = [theirs], ["fenced"]
    (ours,) = post(topic, (dearer(amount="11.00"), "keep"))
    # the retry read their version 2: ours is version 3, and both are in the history
    assert ours.version.plan.version == 3
    h = topic.latest()["starter-eur"]
    assert [str(v.plan.flat_charges[0].amount) for v in h.versions] == ["9.00", "10.00", "11.00"]


def test_a_commit_that_landed_unacknowledged_is_not_written_again(topic: Topic) -> None:
    file_import(topic)
    written = len(topic.records)
    topic.commit_faults = ["unacknowledged"]
    (result,) = post(topic, (dearer(), "keep"))
    assert result.action == NEW_VERSION and result.version.plan.version == 2
    assert len(topic.records) == written + 1
    assert len(topic.latest()["starter-eur"].versions) == 2


def test_kafka_that_never_answers_is_catalog_unavailable(topic: Topic) -> None:
    topic.init_faults = catalog_store.ATTEMPTS
    with pytest.raises(CatalogUnavailable, match="retry later"):
        file_import(topic)
    assert topic.records == []


# --- reads ---------------------------------------------------------------------------------


def test_a_record_that_does_not_decode_or_that_the_contract_refuses_is_a_decode_error() -> None:
    h = publish(publish(None, FILE.plans["starter-eur"], SINCE_ALWAYS), dearer(), NOW)
    assert decode_history(codec("catalog_plan").encode(to_record(h))) == h
    with pytest.raises(DecodeError):
        decode_history(b"\xc3\x01garbage")
    record = to_record(h)
    record["versions"][1]["version"] = 7
    with pytest.raises(DecodeError) as refused:
        decode_history(codec("catalog_plan").encode(record))
    assert refused.value.reason == "invalid_event" and "version 7 where 2" in refused.value.detail


def test_a_version_as_listed() -> None:
    h = publish(publish(None, FILE.plans["starter-eur"], SINCE_ALWAYS), dearer(), NOW)
    h = replace(h, retired_at=NOW + timedelta(days=1))
    assert version_json(h, h.versions[0]) == {
        "plan_id": "starter-eur", "version": 1, "published_at": "1970-01-01T00:00:00Z",
        "existing": "keep", "plan": raw_plan(), "versions": 2,
        "retired_at": "2026-03-02T12:00:00Z",
    }  # fmt: skip


# --- the sink --------------------------------------------------------------------------------


def history_of_starter() -> PlanHistory:
    h = publish(None, FILE.plans["starter-eur"], SINCE_ALWAYS)
    h = publish(h, dearer(), NOW, "next_period")
    return replace(h, retired_at=NOW + timedelta(days=3))


def test_a_history_lands_as_a_row_per_version() -> None:
    h = history_of_starter()
    rows = [dict(zip(COLUMNS["plans"], r, strict=True)) for r in plan_rows(h, 2, 40)]
    assert [(r["version"], r["published_at"], r["existing"], r["flat_amount"], r["mrr"])
            for r in rows] == [(1, SINCE_ALWAYS, "keep", Decimal("9.00"), Decimal("9.00")),
                               (2, NOW, "next_period", Decimal("11"), Decimal("11"))]  # fmt: skip
    for r in rows:  # each row carries the history's retirement and its last change
        assert r["retired_at"] == r["updated_at"] == NOW + timedelta(days=3)
        where = (r["_partition"], r["_offset"], r["currency"], r["interval"])
        assert where == (2, 40, "EUR", "month")
        assert json.loads(r["plan"])["plan_id"] == "starter-eur"
    yearly = publish(None, FILE.plans["scale-usd-yearly"], SINCE_ALWAYS)
    (row,) = plan_rows(yearly, None, None)
    assert row[COLUMNS["plans"].index("mrr")] == Decimal("82.5")  # 990 / 12


class _Consumer:
    def pause(self, tps: list[Any]) -> None:
        pass


def _map(values: list[bytes]) -> tuple[dict[str, list[list[Any]]], int, FakeProducer]:
    producer = FakeProducer()
    sink = Sink(SETTINGS, None, StreamLoop("sink", _Consumer(), producer), serve_queries=False)
    rows: dict[str, list[list[Any]]] = {t: [] for t in COLUMNS}
    msgs = [Msg(CATALOG.name, v, b"k", 1, n) for n, v in enumerate(values)]
    return rows, sink._map_in_python(CATALOG, msgs, rows), producer


def test_the_sink_dead_letters_a_history_the_contract_refuses() -> None:
    good = codec("catalog_plan").encode(to_record(history_of_starter()))
    record = to_record(history_of_starter())
    record["versions"][1]["plan"] = json.dumps(raw_plan(currency="USD"))
    refused = codec("catalog_plan").encode(record)
    rows, bad, producer = _map([good, refused, b"\x00junk"])
    assert bad == 2 and len(rows["plans"]) == 2  # the good record's two versions
    reasons = [codec(DEAD_LETTER.schema).decode(v)["reason"] for _, _, v in producer.produced]
    assert reasons == ["invalid_event", "invalid_avro"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({
    "plan_id": st.sampled_from(["p", ""]),
    "versions": st.lists(st.fixed_dictionaries({
        "version": st.integers(-1, 3), "published_at": st.integers(-(2**62), 2**62),
        "existing": st.sampled_from(["keep", "next_period", "x"]),
        "plan": st.one_of(st.text(max_size=5), st.sampled_from([
            json.dumps(raw_plan(plan_id="p")), json.dumps(raw_plan(plan_id="p", trial_days=2**40)),
            json.dumps(raw_plan(plan_id="p", charges=[{"charge_id": "f", "model": "flat",
                                                       "amount": "999999999999999999"}] * 9)),
        ])),
    }), max_size=3),
    "retired_at": st.one_of(st.none(), st.integers(-(2**62), 2**62)),
}), max_size=6))  # fmt: skip
def test_the_sink_lands_or_dead_letters_any_catalog_record(raw: list[dict[str, Any]]) -> None:
    """Every record: its versions' rows, or exactly one dead letter; never an exception,
    never a row the table cannot hold."""
    values = [hostile_encode("catalog_plan", r) for r in raw]
    rows, bad, producer = _map(values)
    landable = 0
    for v in values:
        try:
            h = from_record(codec("catalog_plan").decode(v))
        except (DecodeError, CatalogError):
            continue
        landable += all(0 <= ver.plan.trial_days < 2**32 for ver in h.versions)
    assert bad == len(values) - landable == len(producer.produced)
    assert len({(r[-2], r[-1]) for r in rows["plans"]}) == landable


# --- the warehouse: plans, the views that price with it ----------------------------------------


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[Any]:
    from streams.warehouse import connect, disconnect, migrate

    dsn = f"chdb://{tmp_path / 'wh'}"
    client = connect(dsn)
    migrate(client)
    yield client
    disconnect(dsn)


def land(client: Any, history: PlanHistory, offset: int) -> None:
    client.insert("plans", plan_rows(history, 0, offset), column_names=COLUMNS["plans"])


def test_plans_keep_every_version_and_the_newest_record_wins(warehouse: Any) -> None:
    assert load_catalog(warehouse, FILE, skip={"growth-eur"}) == len(FILE.plans) - 1
    v1 = publish(None, FILE.plans["starter-eur"], SINCE_ALWAYS)
    v2 = publish(v1, dearer(), NOW, "next_period")
    retired = replace(v2, retired_at=NOW + timedelta(days=3))
    land(warehouse, retired, 7)
    land(warehouse, v2, 6)  # older records landed again (a re-landed batch): no change
    land(warehouse, v1, 5)
    rows = warehouse.query(
        "SELECT version, published_at, existing, flat_amount, retired_at, _offset FROM plans "
        "FINAL WHERE plan_id = 'starter-eur' ORDER BY version").result_rows  # fmt: skip
    assert [(r[0], r[2], r[3], r[4] is not None, r[5]) for r in rows] == [
        (1, "keep", Decimal("9.00"), True, 7), (2, "next_period", Decimal("11.00"), True, 7)
    ]  # fmt: skip
    current = {r[0]: r[1:] for r in warehouse.query(
        "SELECT plan_id, version, flat_amount, retired_at IS NOT NULL, "
        "toUnixTimestamp64Micro(published_at) FROM plans_current").result_rows}  # fmt: skip
    assert set(current) == set(FILE.plans) - {"growth-eur"}
    assert current["starter-eur"] == (2, Decimal("11.00"), True, micros(NOW))
    assert current["team-jpy"] == (1, Decimal("5000"), False, 0)  # the file's, since always


def _fill_invoices(client: Any, rows: list[list[Any]]) -> None:
    client.insert("invoices", [[*r, n] for n, r in enumerate(rows)],
                  column_names=["invoice_id", "account_id", "subscription_id", "plan_id",
                                "currency", "issued_at", "reason", "recurring_total",
                                "total", "_offset"])  # fmt: skip


def test_mrr_follows_the_version_a_subscription_took(warehouse: Any) -> None:
    """s-old signed up on version 1 (9.00), s-new after version 2 (11.00, keep): each
    starts at its version's MRR, and each churn takes away what that subscription had."""
    jan, feb, mar = (datetime(2026, m, 10, tzinfo=UTC) for m in (1, 2, 3))
    v1 = publish(None, FILE.plans["starter-eur"], SINCE_ALWAYS)
    land(warehouse, publish(v1, dearer(), feb - timedelta(days=5), "keep"), 1)
    _fill_invoices(warehouse, [
        ["i1", "a1", "s-old", "starter-eur", "EUR", jan, "created", Decimal(9), Decimal(9)],
        ["i2", "a2", "s-new", "starter-eur", "EUR", feb, "created", Decimal(11), Decimal(11)],
        ["i3", "a1", "s-old", "starter-eur", "EUR", mar, "cancelled", Decimal(0), Decimal(0)],
        ["i4", "a2", "s-new", "starter-eur", "EUR", mar, "cancelled", Decimal(0), Decimal(0)],
    ])  # fmt: skip
    moves = warehouse.query(
        "SELECT subscription_id, movement, delta FROM mrr_changes ORDER BY at, subscription_id"
    ).result_rows
    assert [tuple(m) for m in moves] == [
        ("s-old", "new", Decimal(9)), ("s-new", "new", Decimal(11)),
        ("s-new", "churn", Decimal(-11)), ("s-old", "churn", Decimal(-9)),
    ]  # fmt: skip


def test_upcoming_invoices_bill_the_version_taken_then_the_next_period_one(
    warehouse: Any,
) -> None:
    """A subscription keeps its version through a `keep` publication (10.00), and moves to
    a `next_period` one (12.00) at its first period end after it."""
    now = datetime.now(UTC).replace(microsecond=0)
    created = now - timedelta(days=40)  # period ends: ~10 days ago, in ~20 days, ~50 days
    v1 = publish(None, FILE.plans["starter-eur"], SINCE_ALWAYS)
    v2 = publish(v1, dearer(amount="10.00"), now - timedelta(days=20), "keep")
    v3 = publish(v2, dearer(amount="12.00"), now + timedelta(days=30), "next_period")
    land(warehouse, v3, 3)
    warehouse.insert("subscription_events",
                     [["e1", "subscription.created", created, "a1", "s1", "starter-eur", None,
                       "tok_1", 0, 0]],
                     column_names=["event_id", "type", "timestamp", "account_id",
                                   "subscription_id", "plan_id", "mode", "payment_method",
                                   "_partition", "_offset"])  # fmt: skip
    _fill_invoices(warehouse, [["i1", "a1", "s1", "starter-eur", "EUR", created, "created",
                                Decimal(9), Decimal(9)]])  # fmt: skip
    due = warehouse.query("SELECT recurring_amount FROM upcoming_invoices "
                          "ORDER BY due_at LIMIT 3").result_rows  # fmt: skip
    assert [r[0] for r in due] == [Decimal(9), Decimal(12), Decimal(12)]


# --- the API's side -------------------------------------------------------------------------


def test_a_plan_body_is_the_catalog_files_plan_and_its_existing() -> None:
    plan, existing, errors = records.plan_body({"plan": raw_plan(), "existing": "next_period"})
    assert (plan, existing, errors) == (FILE.plans["starter-eur"], "next_period", [])
    assert records.plan_body({"plan": raw_plan()})[1] == "keep"
    for body, error in [
        ([], "the body must be"),
        ({"plan": raw_plan(), "when": 1}, "when: unknown field"),
        ({"plan": raw_plan(), "existing": None}, "existing: one of keep, next_period"),
        ({"plan": "x"}, "plan: must be an object"),
        ({"plan": raw_plan(version=2)}, "plan.version: unknown field"),
        ({"plan": raw_plan(plan_id="a b")}, "plan.plan_id: 1 to 128"),
        ({"plan": raw_plan(interval="week")}, "plan.interval: must be 'month' or 'year'"),
        ({"plan": raw_plan(trial_days=10**6)}, "plan.trial_days: at most"),
        ({"plan": raw_plan(charges=[{"charge_id": "f", "model": "flat"}])}, "missing 'amount'"),
    ]:
        plan, _, errors = records.plan_body(body)
        assert plan is None and any(error in e for e in errors), (body, errors)


def test_only_a_json_true_makes_an_operator() -> None:
    base = {"tenant_id": "ops", "account_prefix": "ops-"}
    assert Tenant.from_dict(base).admin is False
    assert Tenant.from_dict({**base, "admin": True}).admin is True
    with pytest.raises(TenantError, match="admin must be true or false"):
        Tenant.from_dict({**base, "admin": "false"})


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.text(max_size=6),
              st.sampled_from(["EUR", "JPY", "month", "year", "flat", "per_unit", "sum", "9.5",
                               "1e40", "-1", "0.0000000001"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip
plans_like = st.fixed_dictionaries(
    {"plan_id": st.sampled_from(["p-1", "", "a b", 7]),
     "currency": st.sampled_from(["EUR", "JPY", "XXX", None]),
     "interval": st.sampled_from(["month", "year", "week"]),
     "charges": st.lists(st.one_of(
         st.fixed_dictionaries({"charge_id": st.sampled_from(["f", "g"]), "model": st.just("flat"),
                                "amount": st.sampled_from(["9", "1e17", "-1", "0.001", 3])}),
         st.dictionaries(st.sampled_from(["charge_id", "model", "metric", "aggregation",
                                          "unit_amount", "tiers"]), json_values, max_size=6),
     ), max_size=3)},
    optional={"trial_days": st.one_of(st.integers(-1, 10**12), json_values), "extra": json_values},
)  # fmt: skip


# a valid plan, then any trial and any key of it replaced (often still valid)
near_valid = st.builds(
    lambda base, trial, changes: {**base, **trial, **changes},
    st.sampled_from([raw_plan(p) for p in FILE.plans]),
    st.one_of(st.just({}), st.integers(-1, 2**40).map(lambda n: {"trial_days": n})),
    st.one_of(st.just({}), st.dictionaries(
        st.sampled_from(["plan_id", "currency", "interval", "charges", "extra"]), json_values,
        max_size=1)),
)  # fmt: skip
bodies = st.one_of(st.fixed_dictionaries(
    {"plan": near_valid, "existing": st.sampled_from(["keep", "next_period"])},
), json_values, st.fixed_dictionaries(
    {"plan": st.one_of(near_valid, plans_like, json_values)},
    optional={"existing": st.one_of(st.sampled_from(["keep", "next_period"]), json_values)},
))  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_a_plan_body_the_api_accepts_is_one_the_topic_and_the_sink_take(body: Any) -> None:
    """Any JSON: refused with errors, or a plan whose history encodes, decodes back the
    same, and lands in ``plans`` (never a dead letter for being invalid)."""
    plan, existing, errors = records.plan_body(body)
    if plan is None:
        assert errors and all(isinstance(e, str) and e for e in errors)
        return
    assert existing in records.EXISTING_MODES and errors == []
    history = publish(None, plan, NOW, existing)
    value = codec("catalog_plan").encode(to_record(history))
    assert decode_history(value) == history
    rows, bad, _ = _map([value])
    assert bad == 0 and len(rows["plans"]) == 1


def test_the_plan_routes_answer_before_and_without_kafka(tmp_path: Path) -> None:
    """In-process: a non-operator may not publish or retire (403), anyone may read, an
    invalid plan is a 422 naming its field, and a catalog not read yet is a 503."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from streams.api.server import Api, PlanCatalog
    from streams.api.tenants import TenantDirectory, hash_key, save

    path = tmp_path / "tenants.json"
    save(path, {"ops": Tenant("ops", "ops-", [hash_key("k-ops")], admin=True),
                "acme": Tenant("acme", "acme-", [hash_key("k-acme")])})  # fmt: skip
    plans = PlanCatalog(SETTINGS, "127.0.0.1:9", 1.0)  # never started: nothing read yet

    async def run() -> list[tuple[int, dict[str, Any]]]:
        api = Api(SETTINGS, None, TenantDirectory(path), FILE, plan_catalog=plans)  # type: ignore[arg-type]
        async with TestClient(TestServer(api.app(1 << 20))) as client:
            out = []
            for method, route, key, body in [
                ("POST", "/v1/plans", "k-acme", {"plan": raw_plan()}),
                ("POST", "/v1/plans/starter-eur/retire", "k-acme", None),
                ("POST", "/v1/plans", "k-ops", {"plan": raw_plan(interval="week")}),
                ("GET", "/v1/plans?all_versions=sometimes", "k-acme", None),
                ("GET", "/v1/plans", "k-acme", None),
                ("POST", "/v1/plans", "k-ops", {"plan": raw_plan()}),
            ]:
                resp = await client.request(method, route, json=body,
                                            headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                out.append((resp.status, await resp.json()))
            return out

    answers = asyncio.run(run())
    assert [status for status, _ in answers] == [403, 403, 422, 422, 503, 503]
    assert "operator" in answers[0][1]["message"]
    assert "plan.interval: must be 'month' or 'year'" in answers[2][1]["message"]
    assert answers[3][1]["errors"] == ["all_versions: true or false"]
    assert answers[4][1]["error"] == "catalog_unavailable"


def test_the_cli_refuses_what_is_not_a_catalog_before_kafka(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",  # nothing listens there
           "STREAMBILL_HOME": str(tmp_path / "home")}  # fmt: skip
    broken = tmp_path / "broken.json"
    broken.write_text('{"plans": [{"plan_id": "x", "currency": "EUR"}]}')
    not_json = tmp_path / "not.json"
    not_json.write_text("{plans")
    for args, said in [
        (["publish", str(broken)], "invalid catalog, nothing was published: plans[0]: "),
        (["publish", str(not_json)], "not a catalog file"),
        (["publish", str(tmp_path / "missing.json")], "does not exist"),
        (["publish", str(DEMO_CATALOG), "--existing", "sometimes"], "sometimes"),
    ]:
        run = subprocess.run([sys.executable, "-m", "streams.cli", "catalog", *args],
                             capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert said in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_tenant_add_admin_makes_an_operator(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from streams.api.cli import tenant_app
    from streams.api.server import tenants_path
    from streams.api.tenants import load
    from streams.config import settings as load_settings

    monkeypatch.setenv("STREAMBILL_HOME", str(tmp_path))
    runner = CliRunner()
    for args in (
        ["ops", "--account-prefix", "ops-", "--admin"],
        ["acme", "--account-prefix", "acme-"],
    ):
        result = runner.invoke(tenant_app, ["add", *args])
        assert result.exit_code == 0, result.output
    tenants = load(tenants_path(load_settings()))
    assert (tenants["ops"].admin, tenants["acme"].admin) == (True, False)
