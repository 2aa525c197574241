"""`streambill demo`: the whole path once, on real parts.

Local Kafka broker -> generator -> rating processor -> billing.invoices -> sink ->
embedded ClickHouse; then the invoices and totals per currency, read from ClickHouse.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from streams.config import DEFAULT_CATALOG, Settings
from streams.domain.catalog import Catalog
from streams.domain.money import format_money
from streams.generator import (
    DEFAULT_UNTIL,
    Dataset,
    expected_invoices,
    subscription_events,
    usage_events,
)
from streams.kafka import clients
from streams.kafka.local import bootstrap_servers
from streams.kafka.topics import SUBSCRIPTIONS, USAGE, ensure_topics
from streams.publish import bill_run_done, issue_bill_run, publish
from streams.stack import ProcessorProcess, wait_for_warehouse_endpoint
from streams.ui import progress_bar
from streams.warehouse import query

DEMO_CATALOG = DEFAULT_CATALOG


@dataclass
class DemoResult:
    accounts: int
    expected: int
    invoices: int
    distinct_invoice_ids: int
    seconds: float
    by_currency: list[list[Any]]


def count_invoices(settings: Settings, prefix: str) -> tuple[int, int]:
    rows = query(
        settings,
        "SELECT count(), uniqExact(invoice_id) FROM invoices FINAL "
        f"WHERE startsWith(account_id, '{prefix}')",
    )["rows"]
    return int(rows[0][0]), int(rows[0][1])


def run_demo(
    settings: Settings,
    accounts: int,
    console: Console,
    catalog_path: Path = DEMO_CATALOG,
    timeout: float = 600.0,
) -> DemoResult:
    started = time.monotonic()
    catalog = Catalog.from_dict(json.loads(catalog_path.read_text()))
    dataset = Dataset(accounts=accounts)
    until = DEFAULT_UNTIL
    expected = expected_invoices(dataset, catalog, until)

    console.print("[bold]streambill demo[/]: starting Kafka (local broker unless configured)")
    bootstrap = bootstrap_servers(settings)
    ensure_topics(clients.admin(settings, bootstrap), settings)
    console.print(f"Kafka at {bootstrap}; warehouse {settings.warehouse_dsn}")

    sink = ProcessorProcess(settings, bootstrap, "sink").start()
    rating = ProcessorProcess(
        settings, bootstrap, "rating", "--catalog", str(catalog_path), "--clock", "event"
    ).start()
    try:
        wait_for_warehouse_endpoint(settings, sink)
        with progress_bar(console) as progress:
            producer = clients.producer(settings, bootstrap)
            task = progress.add_task("publish subscriptions", total=accounts)
            publish(producer, SUBSCRIPTIONS, subscription_events(dataset, catalog),
                    progress=lambda n: progress.advance(task, n))  # fmt: skip
            task = progress.add_task("publish usage", total=None)
            publish(producer, USAGE, usage_events(dataset, catalog),
                    progress=lambda n: progress.advance(task, n))  # fmt: skip
            progress.update(task, total=progress.tasks[task].completed)

            offsets = issue_bill_run(settings, bootstrap, until)
            task = progress.add_task(f"bill run until {until:%Y-%m-%d}", total=len(offsets))
            landed = progress.add_task("invoices in ClickHouse", total=expected)
            deadline = time.monotonic() + timeout
            while True:
                for proc in (sink, rating):
                    if not proc.alive:
                        raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
                done = bill_run_done(settings, bootstrap, offsets)
                progress.update(task, completed=done)
                invoices, _ = count_invoices(settings, dataset.prefix)
                progress.update(landed, completed=invoices)
                if done == len(offsets) and invoices >= expected:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"demo did not finish in {timeout:.0f} s")
                time.sleep(0.5)
        invoices, distinct = count_invoices(settings, dataset.prefix)
        by_currency = query(
            settings,
            "SELECT currency, reason, count() AS invoices, sum(total) AS billed "
            "FROM invoices FINAL "
            f"WHERE startsWith(account_id, '{dataset.prefix}') "
            "GROUP BY currency, reason ORDER BY currency, reason",
        )["rows"]
    finally:
        rating.stop()
        sink.stop()
    seconds = time.monotonic() - started
    return DemoResult(accounts, expected, invoices, distinct, seconds, by_currency)


def print_result(console: Console, result: DemoResult) -> None:
    table = Table(title="Invoices in ClickHouse, per currency")
    for col in ("currency", "reason", "invoices", "billed"):
        table.add_column(col, justify="right" if col in ("invoices", "billed") else "left")
    for currency, reason, count, billed in result.by_currency:
        table.add_row(currency, reason, str(count), format_money(Decimal(str(billed)), currency))
    console.print(table)
    closes = sum(int(row[2]) for row in result.by_currency if row[1] == "period_end")
    console.print(
        f"period-close invoices: {closes} (subscriptions whose period closed: "
        f"{result.expected - result.accounts}); invoices at creation: "
        f"{result.invoices - closes} (subscriptions: {result.accounts})"
    )
    ok = result.invoices == result.expected == result.distinct_invoice_ids
    console.print(
        f"invoices: {result.invoices} (expected {result.expected}, distinct ids "
        f"{result.distinct_invoice_ids}) in {result.seconds:.1f} s "
        + ("[green]OK[/]" if ok else "[red]MISMATCH[/]")
    )


def result_json(result: DemoResult, accounts: int) -> dict[str, Any]:
    return {
        "scenario": "demo",
        "params": {"accounts": accounts},
        "metrics": {
            "invoices": result.invoices,
            "distinct_invoice_ids": result.distinct_invoice_ids,
            "expected_invoices": result.expected,
            "seconds": round(result.seconds, 3),
        },
    }
