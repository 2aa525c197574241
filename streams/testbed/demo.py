"""`streambill demo`: the whole path once, on real parts.

Local Kafka broker -> generator -> rating processor -> billing.invoices -> sink ->
embedded ClickHouse; then the invoices and totals per currency, read from ClickHouse.

The demo never touches a real stack: it runs in a namespace of its own (fresh topics
and consumer groups `demo-<id>.*`, deleted at the end) with a home of its own under
$STREAMBILL_HOME/demo/ (state, logs and an embedded warehouse: removed after a run
that checks out, kept for a look after one that does not). So it can run beside a
stack on the same broker, and again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from streams.config import DEFAULT_CATALOG, Settings
from streams.domain.catalog import Catalog
from streams.domain.money import format_money
from streams.kafka import clients
from streams.kafka.local import bootstrap_servers, local_kafka_running
from streams.kafka.topics import INVOICES, SUBSCRIPTIONS, USAGE, namespace
from streams.publish import bill_run_done, issue_bill_run, publish
from streams.stack import ProcessorProcess, isolated_namespace, wait_for_warehouse_endpoint
from streams.testbed.duplicates import TopicCopies, WarehouseCopies, topic_copies, warehouse_copies
from streams.testbed.generator import (
    DEFAULT_UNTIL,
    Dataset,
    expected_invoices,
    subscription_events,
    usage_events,
)
from streams.ui import progress_bar
from streams.warehouse import query

DEMO_CATALOG = DEFAULT_CATALOG


@dataclass
class DemoResult:
    accounts: int
    expected: int
    on_topic: TopicCopies  # the dataset's invoices on billing.invoices, per id
    landed: WarehouseCopies  # ... and in ClickHouse
    seconds: float
    by_currency: list[list[Any]]
    bootstrap: str = ""
    # the cluster: "configured" (KAFKA_BOOTSTRAP_SERVERS), or the local broker, "started"
    # by this demo or "running" before it
    broker: str = ""
    kept_home: Path | None = None  # the demo's home, kept when the run did not check out

    @property
    def invoices(self) -> int:
        return self.landed.final_rows

    @property
    def distinct_invoice_ids(self) -> int:
        return len(self.on_topic.copies)

    @property
    def duplicates(self) -> int:
        """Invoice records beyond one per id, and ids landed with two contents."""
        return self.on_topic.extra_copies + self.landed.conflicting

    @property
    def ok(self) -> bool:
        return (
            self.on_topic.ok
            and self.landed.ok
            and self.invoices == self.expected == self.distinct_invoice_ids
        )


def dataset_invoices(prefix: str) -> str:
    return f"startsWith(account_id, '{prefix}')"


def count_invoices(settings: Settings, prefix: str) -> int:
    sql = f"SELECT count() FROM invoices FINAL WHERE {dataset_invoices(prefix)}"
    return int(query(settings, sql)["rows"][0][0])


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
    if settings.bootstrap_servers:
        broker = "configured"
    else:
        broker = "running" if local_kafka_running() else "started"
    bootstrap = bootstrap_servers(settings)
    with isolated_namespace(settings.demo_dir, bootstrap, settings.partitions, "demo-",
                            keep_home=True) as isolated:  # fmt: skip
        # always the embedded warehouse of its own home, never a configured server
        demo_settings = replace(isolated, clickhouse_dsn=None)
        console.print(f"Kafka at {bootstrap} (namespace {namespace()}); warehouse "
                      f"{demo_settings.warehouse_dsn}")  # fmt: skip
        result = _run(demo_settings, bootstrap, dataset, catalog, catalog_path, expected,
                      console, timeout)  # fmt: skip
    result.seconds = time.monotonic() - started
    result.bootstrap, result.broker = bootstrap, broker
    if result.ok:
        shutil.rmtree(demo_settings.home, ignore_errors=True)
    else:
        result.kept_home = demo_settings.home
    return result


def _run(
    settings: Settings,
    bootstrap: str,
    dataset: Dataset,
    catalog: Catalog,
    catalog_path: Path,
    expected: int,
    console: Console,
    timeout: float,
) -> DemoResult:
    accounts, until = dataset.accounts, DEFAULT_UNTIL
    env = {"CLICKHOUSE_DSN": ""}
    sink = ProcessorProcess(settings, bootstrap, "sink", env=env).start()
    rating = ProcessorProcess(settings, bootstrap, "rating", "--catalog", str(catalog_path),
                              "--clock", "event", env=env).start()  # fmt: skip
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
                invoices = count_invoices(settings, dataset.prefix)
                progress.update(landed, completed=invoices)
                if done == len(offsets) and invoices >= expected:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"demo did not finish in {timeout:.0f} s")
                time.sleep(0.5)
        mine = dataset.prefix
        on_topic = topic_copies(settings, bootstrap, INVOICES, "invoice_id",
                                keep=lambda r: r["account_id"].startswith(mine))  # fmt: skip
        landed = warehouse_copies(settings, "invoices", expected, where=dataset_invoices(mine))
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
    return DemoResult(accounts, expected, on_topic, landed, 0.0, by_currency)


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
    console.print(
        f"invoices: {result.invoices} (expected {result.expected}, distinct ids "
        f"{result.distinct_invoice_ids}, duplicates {result.duplicates}) in "
        f"{result.seconds:.1f} s " + ("[green]OK[/]" if result.ok else "[red]MISMATCH[/]")
    )
    if not result.ok:
        console.print(result.on_topic.summary(), highlight=False)
        console.print(result.landed.summary(), highlight=False)


def print_left_running(console: Console, result: DemoResult) -> None:
    """What the demo leaves behind: the broker (if it started one), a failed run's home."""
    console.print("The demo's topics and consumer groups are deleted; no processor runs.")
    if result.kept_home:
        console.print(f"Its home (logs, warehouse) is kept for a look: {result.kept_home}")
    if result.broker == "started":
        console.print(f"Left running: the local Kafka broker the demo started "
                      f"({result.bootstrap}); stop it with `streambill kafka stop`.")  # fmt: skip
    elif result.broker == "configured":
        console.print(f"Kafka: the configured cluster ({result.bootstrap}); nothing was started.")
    else:
        console.print(f"Kafka: the local broker ({result.bootstrap}) was running before the "
                      "demo and still is (`streambill kafka stop` stops it).")  # fmt: skip


def result_json(result: DemoResult, accounts: int) -> dict[str, Any]:
    return {
        "scenario": "demo",
        "params": {"accounts": accounts},
        "metrics": {
            "invoices": result.invoices,
            "distinct_invoice_ids": result.distinct_invoice_ids,
            "duplicates": result.duplicates,
            "expected_invoices": result.expected,
            "seconds": round(result.seconds, 3),
        },
    }
