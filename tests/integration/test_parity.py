"""The rating processor's invoices, as they land in ClickHouse, equal `streambill rate`'s
field for field: ids, account, subscription, currency, reason, issue instant, and every
line's charge, kind, period, quantity and amount, with the total.

The cases (tests/data/parity/) cover month-end anchors (Jan 31 and Mar 31 at 23:59:59),
yearly periods (a leap-day anchor too), an upgrade and two downgrades (negative
prorations, one invoice below zero), immediate and end-of-period cancellations, usage in
several periods per subscription, per-unit, package, graduated and volume charges at and
one above their tier edges, JPY and USD, a plan without a flat charge, a repeated usage
event id, and events that both dead-letter or defer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streams.domain.invoice import Invoice, invoice_to_dict
from streams.domain.timestamps import parse_timestamp
from streams.offline import RateResult, load_catalog, rate_events
from streams.replay import replay
from tests.integration.helpers import as_streamed

pytestmark = pytest.mark.kafka
PARITY = Path(__file__).resolve().parents[1] / "data" / "parity"
CATALOG, EVENTS = PARITY / "catalog.json", PARITY / "events.jsonl"
UNTIL = "2026-06-30T00:00:00Z"


def whole(inv: Invoice) -> dict[str, Any]:
    """Everything an invoice says that the streaming rater computes: its public JSON (less
    the credit balance's fields, see helpers.as_streamed) and its reason."""
    return {**as_streamed(invoice_to_dict(inv)), "reason": inv.reason}


@pytest.fixture(scope="module")
def reference() -> RateResult:
    lines = EVENTS.read_text().splitlines()
    result = rate_events(load_catalog(CATALOG), lines, parse_timestamp(UNTIL))
    # the cases hold what the module docstring says they do
    invoices = [whole(inv) for inv in result.invoices]
    lines_of = [ln for inv in invoices for ln in inv["lines"]]
    assert {inv["reason"] for inv in invoices} == {"created", "period_end", "plan_changed",
                                                   "cancelled"}  # fmt: skip
    assert {ln["kind"] for ln in lines_of} == {"flat", "usage", "proration_credit",
                                               "proration_charge"}  # fmt: skip
    assert {inv["currency"] for inv in invoices} == {"EUR", "JPY", "USD"}
    starts = {ln["period_start"] for ln in lines_of}
    assert {"2026-02-28T23:59:59Z", "2026-03-31T23:59:59Z", "2026-04-30T23:59:59Z",
            "2025-02-28T12:00:00Z", "2026-03-01T00:00:00Z"} <= starts  # fmt: skip
    assert any(ln["period_end"] == "2027-03-01T00:00:00Z" for ln in lines_of)  # yearly
    assert any(inv["total"].startswith("-") for inv in invoices)  # a downgrade's credit
    period_ends = [inv["subscription_id"] for inv in invoices if inv["reason"] == "period_end"]
    assert max(period_ends.count(s) for s in set(period_ends)) >= 4
    assert any(inv["lines"] == [] for inv in invoices)  # no flat charge: no line
    assert len(result.dead_letters) == 6 and result.deferred == 1
    return result


def test_processor_invoices_equal_rate_field_for_field(
    kafka_bootstrap: str, tmp_path: Path, reference: RateResult
) -> None:
    # small transactions and state cache: states are evicted and read back from RocksDB,
    # usage-only transactions poll on across periods
    small = {"STREAMBILL_RATING_TRANSACTION_RECORDS": "7",
             "STREAMBILL_RATING_USAGE_TRANSACTION_RECORDS": "20",
             "STREAMBILL_RATING_STATE_CACHE": "3"}  # fmt: skip
    result = replay(CATALOG, EVENTS.read_text().splitlines(), parse_timestamp(UNTIL),
                    kafka_bootstrap, parent=tmp_path, rating_env=small)  # fmt: skip

    got = [whole(inv) for inv in result.invoices]
    want = [whole(inv) for inv in reference.invoices]
    assert [g["invoice_id"] for g in got] == [w["invoice_id"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g == w, w["invoice_id"]
    # every event rate dead-letters is dead-lettered by the processor too, and nothing else
    assert result.dead_letters.total() == len(reference.dead_letters)
    assert result.deferred == reference.deferred


def test_replay_command_prints_what_rate_prints(kafka_bootstrap: str, tmp_path: Path) -> None:
    """`streambill replay` and `streambill rate` on the same files: the same invoices, in the
    same order and format, field for field but the credit balance's two (rule 21 of the
    contract's version 2: the streaming rater carries no credit yet, so its amount due is the
    total when positive; rate carries a downgrade's credit into the next invoices)."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "STREAMBILL_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)}  # fmt: skip
    outputs = {}
    for command in ("rate", "replay"):
        out = tmp_path / f"{command}.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "streams.cli", command, "--catalog", str(CATALOG),
             "--events", str(EVENTS), "--until", UNTIL, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[command] = out.read_text()

    def without_credit(text: str) -> list[dict[str, Any]]:
        return [as_streamed(json.loads(line)) for line in text.splitlines()]

    assert without_credit(outputs["replay"]) == without_credit(outputs["rate"])
    assert outputs["rate"].count("\n") == 35
    rated = [json.loads(line) for line in outputs["rate"].splitlines()]
    assert any(i["credit_applied"] != "0.00" for i in rated)  # a downgrade's credit, used
    assert "dead letters: rating 6" in " ".join(proc.stderr.split())


def test_replay_publishes_in_order_of_arrival_keyed_by_owner() -> None:
    from streams.codec import codec
    from streams.kafka.topics import SUBSCRIPTIONS, USAGE
    from streams.replay import input_records

    events = [
        '{"type": "usage", "event_id": "u1", "timestamp": "2026-01-02T00:00:00Z",'
        ' "subscription_id": "s1", "metric": "m", "quantity": "1",'
        ' "received_at": "2026-01-04T00:00:00Z"}',
        '{"type": "subscription.created", "timestamp": "2026-01-01T00:00:00Z",'
        ' "account_id": "a1", "subscription_id": "s1", "plan_id": "p"}',
        '{"type": "subscription.cancelled", "timestamp": "2026-01-03T00:00:00Z",'
        ' "subscription_id": "s1", "mode": "immediate"}',
        "not json",
        '{"type": "usage", "event_id": "u2", "timestamp": "2026-01-05T00:00:00Z",'
        ' "subscription_id": "s1", "metric": "m", "quantity": "1"}',
    ]
    data = input_records(events, parse_timestamp("2026-01-04T00:00:00Z"))
    assert (data.raw, data.deferred) == (1, 1)  # "not json"; u2 arrives after until
    topics = [topic for topic, *_ in data.records]
    assert topics == [SUBSCRIPTIONS, SUBSCRIPTIONS, SUBSCRIPTIONS, USAGE]
    raw, _, cancelled, usage = data.records
    assert raw[2] == b"not json" and raw[3] is None
    # usage arrives (received_at) after the cancellation, although it happened before it
    assert [r[3] for r in data.records[1:]] == [1767225600000, 1767398400000, 1767484800000]
    assert {r[1] for r in data.records[1:]} == {b"a1"}  # the account that created s1
    decoded = codec(SUBSCRIPTIONS.schema).decode(cancelled[2])
    assert (decoded["account_id"], decoded["event_id"]) == ("a1", "line-3")
    assert codec(USAGE.schema).decode(usage[2])["event_id"] == "u1"


def test_replay_reads_each_invoice_once_and_refuses_two_versions(tmp_path: Path) -> None:
    """A row landed twice is read once; two different rows of one invoice id are an error
    (FINAL would quietly keep one of them)."""
    from decimal import Decimal

    from streams.config import Settings
    from streams.replay import ReplayError, landed_invoices
    from streams.warehouse import disconnect, open_warehouse

    settings = Settings(home=tmp_path, clickhouse_dsn=None)
    client = open_warehouse(settings)

    def land(invoice_id: str, total: str) -> None:
        """One landing (an insert of its own: rows of one insert are collapsed at once)."""
        client.command(
            "INSERT INTO invoices (invoice_id, account_id, subscription_id, plan_id, currency, "
            "issued_at, reason, total, recurring_total, usage_total, line_count, "
            "payment_method, _partition, _offset) VALUES "
            f"('{invoice_id}', 'a', 's', 'p', 'EUR', '2026-01-01 00:00:00', 'created', "
            f"{total}, 0, 0, 0, NULL, 0, 0)"
        )

    try:
        land("inv-1", "10.00")
        land("inv-1", "10.00")
        assert [(inv.invoice_id, inv.total) for inv in landed_invoices(settings)] == [
            ("inv-1", Decimal("10.00"))
        ]
        land("inv-2", "10.00")
        land("inv-2", "12.00")
        with pytest.raises(ReplayError, match="inv-2 landed with different contents"):
            landed_invoices(settings)
    finally:
        disconnect(settings.warehouse_dsn)
