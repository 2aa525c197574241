"""The warehouse on the real embedded engine (chDB): migrations, and the two landing
paths of the sink (ClickHouse decoding Avro in bulk; Python decoding record by record)
giving identical rows. Kafka messages are stood in for by `Msg` (confluent-kafka's
Message cannot be constructed outside the client); everything else is real."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from streams.codec import codec
from streams.processors.sink import COLUMNS, LANDERS
from streams.warehouse import connect, disconnect, migrate, migration_files
from streams.warehouse_bulk import BULK_TABLES, BulkLander
from tests.samples import T0, sample


@dataclass
class Msg:
    value_bytes: bytes
    part: int
    off: int
    topic_name: str = ""

    def value(self) -> bytes:
        return self.value_bytes

    def partition(self) -> int:
        return self.part

    def offset(self) -> int:
        return self.off

    def topic(self) -> str:
        return self.topic_name


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[Any]:
    """A fresh embedded warehouse; closed afterwards (chDB: one data directory at a time)."""
    dsn = f"chdb://{tmp_path / 'wh'}"
    yield connect(dsn)
    disconnect(dsn)


def schema_of(client: Any) -> list[tuple]:
    tables = client.query(
        "SELECT name, engine, create_table_query FROM system.tables "
        "WHERE database = 'streambill' AND name != 'schema_migrations' ORDER BY name"
    ).result_rows
    columns = client.query(
        "SELECT table, name, type, position, default_expression FROM system.columns "
        "WHERE database = 'streambill' ORDER BY table, position"
    ).result_rows
    return [tuple(r) for r in tables] + [tuple(r) for r in columns]


def test_fresh_and_upgraded_warehouses_end_identical(tmp_path: Path) -> None:
    fresh_dsn, old_dsn = f"chdb://{tmp_path / 'fresh'}", f"chdb://{tmp_path / 'old'}"
    fresh = connect(fresh_dsn)
    assert migrate(fresh) == [p.stem for p in migration_files()]
    assert migrate(fresh) == []  # idempotent
    fresh_schema = schema_of(fresh)
    disconnect(fresh_dsn)

    old = connect(old_dsn)
    first = migration_files()[:1]
    migrate(old, first)  # a warehouse of the first release, holding data
    old.insert("invoices", [["inv-1", "a-1", "s-1", "p", "EUR", T0, "created",
                             Decimal("9.99"), 1, None, 3, 41]],
               column_names=["invoice_id", "account_id", "subscription_id", "plan_id",
                             "currency", "issued_at", "reason", "total", "line_count",
                             "payment_method", "_partition", "_offset"])  # fmt: skip
    applied = migrate(old)
    assert applied == [p.stem for p in migration_files()[1:]]
    try:
        assert schema_of(old) == fresh_schema
        # the sink of the new release resumes where the old one stopped
        resume = old.query("SELECT topic, partition, next_offset FROM sink_offsets").result_rows
        assert [tuple(r) for r in resume] == [("billing.invoices", 3, 42)]
        row = old.query("SELECT total, recurring_total FROM invoices").result_rows
        assert row == [(Decimal("9.99"), Decimal(0))]
    finally:
        disconnect(old_dsn)


def messages(schema: str, n: int = 40) -> list[Msg]:
    encode = codec(schema).encode
    return [Msg(encode(sample(schema, i)), i % 3, 1000 + i) for i in range(n)]


def table_contents(client: Any, tables: list[str]) -> dict[str, list[tuple]]:
    out = {}
    for table in tables:
        cols = ", ".join(c for c in COLUMNS[table])
        rows = client.query(f"SELECT {cols} FROM {table} FINAL ORDER BY {cols}").result_rows
        out[table] = [tuple(r) for r in rows]
    return out


LANDED_BY = {
    "invoice": ["invoices", "invoice_lines"],
    **{schema: [table] for schema, table in BULK_TABLES.items() if schema != "invoice"},
}
TOPIC_OF = {
    "invoice": "billing.invoices",
    "subscription_event": "billing.subscriptions",
    "usage_event": "billing.usage",
    "payment_result": "billing.payment-results",
    "refund_result": "billing.refund-results",
    "entitlement": "billing.entitlements",
}


@pytest.mark.parametrize("schema", sorted(BULK_TABLES))
def test_bulk_landing_gives_the_same_rows_as_python_decoding(tmp_path: Path, schema: str) -> None:
    msgs = messages(schema)
    tables = LANDED_BY[schema]

    bulk_dsn = f"chdb://{tmp_path / 'bulk'}"
    client = connect(bulk_dsn)
    migrate(client)
    BulkLander(client, tmp_path / "work", COLUMNS).land(schema, msgs)
    BulkLander(client, tmp_path / "work", COLUMNS).land(schema, msgs[:7])  # a re-landed batch
    via_clickhouse = table_contents(client, tables)
    disconnect(bulk_dsn)

    py_dsn = f"chdb://{tmp_path / 'python'}"
    client = connect(py_dsn)
    migrate(client)
    rows: dict[str, list] = {t: [] for t in COLUMNS}
    for m in msgs:
        LANDERS[TOPIC_OF[schema]](codec(schema).decode(m.value()), m.partition(), m.offset(), rows)
    for table in tables:
        if rows[table]:
            client.insert(table, rows[table], column_names=COLUMNS[table])
    via_python = table_contents(client, tables)
    disconnect(py_dsn)

    assert via_clickhouse == via_python
    assert len(via_python[tables[0]]) == len(msgs)  # one row per message, re-landing or not


@pytest.mark.parametrize(
    "corrupt",
    [lambda v: v[:-3], lambda v: v[:10] + b"\xff" * 40, lambda v: v[:10]],
    ids=["truncated", "garbage-body", "header-only"],
)
def test_bulk_landing_refuses_a_batch_with_a_bad_record(
    warehouse: Any, tmp_path: Path, corrupt: Any
) -> None:
    migrate(warehouse)
    msgs = messages("usage_event", 10)
    msgs[4] = Msg(corrupt(msgs[4].value()), 0, 4)
    with pytest.raises(Exception):  # noqa: B017 - whatever ClickHouse raises
        BulkLander(warehouse, tmp_path / "work", COLUMNS).land("usage_event", msgs)


def test_plans_dimension_has_monthly_recurring_revenue(warehouse: Any) -> None:
    import json

    from streams.domain.catalog import Catalog
    from streams.processors.sink import load_catalog
    from streams.testbed.demo import DEMO_CATALOG

    migrate(warehouse)
    raw = json.loads(DEMO_CATALOG.read_text())
    assert load_catalog(warehouse, Catalog.from_dict(raw)) == len(raw["plans"])
    load_catalog(warehouse, Catalog.from_dict(raw))  # reloading replaces, not adds
    plans = {r[0]: r[1:] for r in warehouse.query(
        "SELECT plan_id, interval, flat_amount, mrr FROM plans FINAL").result_rows}  # fmt: skip
    assert len(plans) == len(raw["plans"])
    for plan in raw["plans"]:
        flat = sum(Decimal(c["amount"]) for c in plan["charges"] if c["model"] == "flat")
        interval, flat_amount, mrr = plans[plan["plan_id"]]
        assert flat_amount == flat
        months = 12 if interval == "year" else 1
        assert abs(mrr * months - flat) < Decimal("1e-8")


def test_bulk_landing_reads_a_record_with_trailing_bytes_as_its_complete_prefix(
    warehouse: Any, tmp_path: Path
) -> None:
    """The one place the paths differ: ClickHouse's Avro reader skips bytes left in a
    block after its records, where the Python decoder refuses the message. The landed row
    is the complete record the message starts with; the processor consuming the topic
    (e.g. rating, for usage) still dead-letters the message itself."""
    migrate(warehouse)
    msgs = messages("usage_event", 3)
    msgs[1] = Msg(msgs[1].value() + b"\x00\x01", msgs[1].part, msgs[1].off)
    BulkLander(warehouse, tmp_path / "work", COLUMNS).land("usage_event", msgs)
    rows = warehouse.query("SELECT event_id, quantity FROM usage_events ORDER BY event_id")
    assert [tuple(r) for r in rows.result_rows] == [
        ("u-0", Decimal("0.5")), ("u-1", Decimal("1.5")), ("u-2", Decimal("2.5"))
    ]  # fmt: skip


def test_query_opens_the_embedded_warehouse_itself_when_no_sink_runs(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = os.environ | {"STREAMBILL_HOME": str(tmp_path / "home")}
    env.pop("CLICKHOUSE_DSN", None)
    sql = "SELECT count() AS n, (SELECT count() FROM system.tables WHERE database = 'streambill'"
    sql += " AND name = 'usage_daily') AS views FROM invoices"
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "query", sql, "--format", "json"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip
    assert json.loads(out) == [{"n": 0, "views": 1}]
    assert (tmp_path / "home" / "warehouse").is_dir()


def test_an_invoice_paid_by_credit_reads_as_paid_and_one_with_an_amount_due_as_open(
    warehouse: Any,
) -> None:
    """The API's invoice status: nothing due (the credit balance took it all) is paid with
    no charge; an amount due without a successful charge is open."""
    from streams.api.reads import invoices_sql

    migrate(warehouse)
    warehouse.command(
        "INSERT INTO streambill.invoices (invoice_id, account_id, subscription_id, plan_id, "
        "currency, issued_at, reason, total, line_count, credit_applied, amount_due, "
        "_partition, _offset) VALUES "
        "('by-credit', 'acme-1', 's1', 'p', 'EUR', '2026-03-01 00:00:00', 'created', 30, 1, "
        "30, 0, 0, 0), "
        "('due', 'acme-1', 's2', 'p', 'EUR', '2026-03-02 00:00:00', 'created', 30, 1, 10, 20, "
        "0, 1)"
    )
    rows = warehouse.query(
        invoices_sql("acme-", None, None, None, None, None, 10)
        .replace("FROM invoices", "FROM streambill.invoices")
        .replace("FROM payment_attempts", "FROM streambill.payment_attempts")
    ).result_rows
    assert [(r[0], r[-1]) for r in rows] == [("by-credit", "paid"), ("due", "open")]
    # what is owed, for analysts: the amount due, not the total
    owed = warehouse.query(
        "SELECT currency, invoices, toString(amount_due) FROM streambill.receivables_aging"
    ).result_rows
    assert owed == [("EUR", 1, "20")]


def test_trials_and_pauses_for_analysts(warehouse: Any) -> None:
    """subscriptions shows trialing and paused; MRR counts a trial from its end (`new` at
    the trial_ended invoice), a pause as a contraction and a resume as an expansion, and
    an account's events are no subscription."""
    migrate(warehouse)
    warehouse.command(
        "INSERT INTO streambill.plans (plan_id, version, published_at, currency, interval, "
        "trial_days, flat_amount, mrr) VALUES ('t', 1, '1970-01-01 00:00:00', 'EUR', 'month', "
        "14, 20, 20), ('m', 1, '1970-01-01 00:00:00', 'EUR', 'month', 0, 30, 30)"
    )
    future = "2099-01-01 00:00:00"
    events = [  # (subscription, type, at, plan)
        ("trial-now", "subscription.created", future, "t"),
        ("trial-over", "subscription.created", "2026-01-01 00:00:00", "t"),
        ("paused", "subscription.created", "2026-01-01 00:00:00", "m"),
        ("paused", "subscription.paused", "2026-02-10 00:00:00", None),
        ("resumed", "subscription.created", "2026-01-01 00:00:00", "m"),
        ("resumed", "subscription.paused", "2026-02-10 00:00:00", None),
        ("resumed", "subscription.resumed", "2026-02-20 00:00:00", None),
        ("", "credit.granted", "2026-01-01 00:00:00", None),
    ]
    rows = []
    for n, (sub, kind, at, plan) in enumerate(events):
        plan_sql = f"'{plan}'" if plan else "NULL"
        rows.append(f"('e{n}', '{kind}', '{at}', 'acct', '{sub}', {plan_sql}, 0, {n})")
    warehouse.command(
        "INSERT INTO streambill.subscription_events (event_id, type, timestamp, account_id, "
        "subscription_id, plan_id, _partition, _offset) VALUES " + ", ".join(rows)
    )
    status = dict(warehouse.query(
        "SELECT subscription_id, status FROM streambill.subscriptions").result_rows)  # fmt: skip
    assert status == {"trial-now": "trialing", "trial-over": "active", "paused": "paused",
                      "resumed": "active"}  # fmt: skip
    invoices = [  # (subscription, reason, at, plan)
        ("trial-over", "trial_ended", "2026-01-15 00:00:00", "t"),
        ("resumed", "created", "2026-01-01 00:00:00", "m"),
        ("resumed", "paused", "2026-02-10 00:00:00", "m"),
        ("resumed", "resumed", "2026-02-20 00:00:00", "m"),
    ]
    rows = [f"('i{n}', 'acct', '{sub}', '{plan}', 'EUR', '{at}', '{reason}', 1, 1, 0, {n})"
            for n, (sub, reason, at, plan) in enumerate(invoices)]  # fmt: skip
    warehouse.command(
        "INSERT INTO streambill.invoices (invoice_id, account_id, subscription_id, plan_id, "
        "currency, issued_at, reason, total, line_count, _partition, _offset) VALUES "
        + ", ".join(rows)
    )
    moves = warehouse.query(
        "SELECT subscription_id, movement, toString(delta) FROM streambill.mrr_changes "
        "ORDER BY subscription_id, at").result_rows  # fmt: skip
    assert moves == [("resumed", "new", "30"), ("resumed", "contraction", "-30"),
                     ("resumed", "expansion", "30"), ("trial-over", "new", "20")]  # fmt: skip


def test_upcoming_invoices_of_trials_start_at_the_trials_end(warehouse: Any) -> None:
    """A trialing subscription's first upcoming invoice is its trial's end (trial_ended, the
    first period's flat amount), and its periods are anchored there; a trial cancelled at
    its end and a paused subscription have none; a subscription whose trial is over bills
    at the trial's end + k months."""
    from datetime import UTC, datetime, timedelta

    from streams.domain.periods import add_months

    migrate(warehouse)
    warehouse.command(
        "INSERT INTO streambill.plans (plan_id, version, published_at, currency, interval, "
        "trial_days, flat_amount, mrr) VALUES ('t', 1, '1970-01-01 00:00:00', 'EUR', 'month', "
        "14, 20, 20), ('m', 1, '1970-01-01 00:00:00', 'EUR', 'month', 0, 30, 30)"
    )
    now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    five_days_ago, twenty_days_ago = now - timedelta(days=5), now - timedelta(days=20)
    events = [  # (subscription, type, at, plan, mode)
        ("trialing", "subscription.created", five_days_ago, "t", None),
        ("trial-cancelled", "subscription.created", five_days_ago, "t", None),
        ("trial-cancelled", "subscription.cancelled", now - timedelta(days=1), None,
         "end_of_period"),
        ("trial-over", "subscription.created", twenty_days_ago, "t", None),
        ("paused", "subscription.created", twenty_days_ago, "m", None),
        ("paused", "subscription.paused", now - timedelta(days=2), None, None),
    ]  # fmt: skip
    rows = []
    for n, (sub, kind, at, plan, mode) in enumerate(events):
        plan_sql, mode_sql = (f"'{v}'" if v else "NULL" for v in (plan, mode))
        rows.append(f"('e{n}', '{kind}', '{at}', 'acct', '{sub}', {plan_sql}, {mode_sql}, 0, {n})")
    warehouse.command(
        "INSERT INTO streambill.subscription_events (event_id, type, timestamp, account_id, "
        "subscription_id, plan_id, mode, _partition, _offset) VALUES " + ", ".join(rows)
    )
    upcoming = warehouse.query(
        "SELECT subscription_id, toString(due_at), reason, toString(recurring_amount) "
        "FROM streambill.upcoming_invoices WHERE due_at < now() + INTERVAL 50 DAY "
        "ORDER BY subscription_id, due_at"
    ).result_rows

    def month_after(t: datetime) -> str:  # as ClickHouse's addMonths: clamped to the month
        return str(add_months(t, 1)) + ".000000"

    trial_end = five_days_ago + timedelta(days=14)
    over_end = twenty_days_ago + timedelta(days=14)
    assert [tuple(r) for r in upcoming] == [
        ("trial-over", month_after(over_end), "period_end", "20"),
        ("trialing", str(trial_end) + ".000000", "trial_ended", "20"),
        ("trialing", month_after(trial_end), "period_end", "20"),
    ]
