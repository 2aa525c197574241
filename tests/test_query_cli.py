"""`streambill query` on the real embedded warehouse (chDB), both ways it reaches it: the
command opening the warehouse itself, and through the query endpoint of the process
that owns it (the sink, stood in for by a QueryServer here). Output fit for shells and
spreadsheets; the analysts' views `subscriptions` and `mrr_monthly` as they read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from streams.config import Settings
from streams.warehouse import QueryServer, connect, disconnect, migrate

DECIMALS = "SELECT toDecimal128(0, 9) AS zero, toDecimal128('12.5', 9) AS price, 'x' AS s"
LONG_ID = "acct-" + "0123456789" * 6


def at(month: int, day: int = 1) -> datetime:
    return datetime(2026, month, day, 12, tzinfo=UTC)


def fill(client: Any) -> None:
    """Two subscriptions, one cancelled; one plan change three months after a signup."""
    migrate(client)
    subscription_events = [
        ["e1", "subscription.created", at(1), "a-1", "s-active", "basic", None, "tok_1"],
        ["e2", "subscription.created", at(1), "a-2", "s-gone", "basic", None, "tok_2"],
        ["e3", "subscription.cancelled", at(2), "a-2", "s-gone", None, "immediate", None],
    ]
    client.insert("subscription_events", [[*e, 0, n] for n, e in enumerate(subscription_events)],
                  column_names=["event_id", "type", "timestamp", "account_id", "subscription_id",
                                "plan_id", "mode", "payment_method", "_partition",
                                "_offset"])  # fmt: skip
    client.insert("plans", [["basic", "USD", "month", Decimal(10), Decimal(10), "[]"],
                            ["pro", "USD", "month", Decimal(30), Decimal(30), "[]"]],
                  column_names=["plan_id", "currency", "interval", "flat_amount", "mrr",
                                "charges"])  # fmt: skip
    invoices = [["i1", "a-1", "s-active", "basic", "USD", at(1), "created", Decimal(10), 1],
                ["i2", "a-1", "s-active", "pro", "USD", at(4, 10), "plan_changed",
                 Decimal(20), 1]]  # fmt: skip
    client.insert("invoices", [[*i, Decimal(0), None, 0, n] for n, i in enumerate(invoices)],
                  column_names=["invoice_id", "account_id", "subscription_id", "plan_id",
                                "currency", "issued_at", "reason", "total", "line_count",
                                "recurring_total", "payment_method", "_partition",
                                "_offset"])  # fmt: skip


@pytest.fixture(params=["embedded", "endpoint"])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A home whose warehouse holds `fill`'s rows, read by the command itself
    (embedded) or through a running owner's query endpoint."""
    home = tmp_path / "home"
    settings = Settings(home=home, clickhouse_dsn=None)
    client = connect(settings.warehouse_dsn)
    fill(client)
    if request.param == "embedded":
        disconnect(settings.warehouse_dsn)
        yield home
        return
    server = QueryServer(client, settings).start()
    try:
        yield home
    finally:
        server.stop()
        disconnect(settings.warehouse_dsn)


def query(home: Path, sql: str, fmt: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """The command's output as written (text mode would read CRLF line ends as LF)."""
    env = os.environ | {"STREAMBILL_HOME": str(home), "COLUMNS": str(columns)}
    env.pop("CLICKHOUSE_DSN", None)
    run = subprocess.run([sys.executable, "-m", "streams.cli", "query", sql, "--format", fmt],
                         capture_output=True, env=env, timeout=120)  # fmt: skip
    return subprocess.CompletedProcess(run.args, run.returncode, run.stdout.decode(),
                                       run.stderr.decode())  # fmt: skip


def test_csv_ends_lines_with_newline_and_prints_plain_decimals(home: Path) -> None:
    run = query(home, DECIMALS, "csv")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "zero,price,s\n0.000000000,12.500000000,x\n"


def test_json_keeps_decimals_as_plain_decimal_strings(home: Path) -> None:
    run = query(home, DECIMALS, "json")
    assert json.loads(run.stdout) == [{"zero": "0.000000000", "price": "12.500000000", "s": "x"}]


def test_the_table_wraps_long_values_instead_of_cutting_them(home: Path) -> None:
    sql = f"SELECT '{LONG_ID}' AS account_id, toDecimal128(0, 9) AS zero, NULL AS nothing"
    run = query(home, sql, "table", columns=40)
    assert run.returncode == 0, run.stderr
    cells = ["".join(line.split("│")[1].split()) for line in run.stdout.splitlines()
             if line.count("│") == 4]  # fmt: skip
    assert "".join(cells) == LONG_ID, run.stdout
    assert "0.000000000" in run.stdout.replace("\n", "").replace(" ", "").replace("│", "")
    assert "NULL" in run.stdout and "…" not in run.stdout


def test_a_sql_error_is_one_line_and_a_failure(home: Path) -> None:
    run = query(home, "SELEC 1,\n  2", "table")  # ClickHouse quotes the rest of the query
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("query failed: "), run.stderr
    assert "SYNTAX_ERROR" in run.stderr and "FORMAT Native" not in run.stderr, run.stderr
    missing = query(home, "SELECT * FROM no_such_table", "csv")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert "UNKNOWN_TABLE" in missing.stderr


def test_cancelled_at_is_null_while_a_subscription_is_not_cancelled(home: Path) -> None:
    sql = "SELECT subscription_id, status, cancelled_at FROM subscriptions ORDER BY 1"
    rows = json.loads(query(home, sql, "json").stdout)
    assert rows == [
        {"subscription_id": "s-active", "status": "active", "cancelled_at": None},
        {"subscription_id": "s-gone", "status": "cancelled",
         "cancelled_at": "2026-02-01 12:00:00"},
    ]  # fmt: skip


def test_mrr_monthly_has_every_month(home: Path) -> None:
    sql = "SELECT month, currency, mrr, new, expansion FROM mrr_monthly ORDER BY month"
    run = query(home, sql, "csv")
    assert run.stdout.splitlines() == [
        "month,currency,mrr,new,expansion",
        "2026-01-01,USD,10.000000000,10.000000000,0.000000000",
        "2026-02-01,USD,10.000000000,0.000000000,0.000000000",
        "2026-03-01,USD,10.000000000,0.000000000,0.000000000",
        "2026-04-01,USD,30.000000000,0.000000000,20.000000000",
    ], run.stderr
