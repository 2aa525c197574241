"""Nothing in the catalog stops rating (issue 19, item 5), on the version-2 rating
processor: a plan retired while subscriptions run on it, and then dropped from the
catalog file the processor restarts with, goes on billing them; a creation or a plan
change naming it afterwards is a dead letter with its reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from streams.catalog_store import retire_plan
from streams.codec import codec
from streams.config import Settings
from streams.domain.events import PlanChanged, SubscriptionCreated, Usage
from streams.domain.timestamps import to_micros
from streams.kafka import clients
from streams.publish import produce_values
from streams.rating_records import input_record
from streams.stack import ProcessorProcess
from tests.integration.helpers import Procs, run_bill_run, scalar, start_sink, wait_until

V2 = {"STREAMBILL_RATING_CONTRACT": "2"}


def plan(plan_id: str, fee: str) -> dict[str, Any]:
    return {"plan_id": plan_id, "currency": "EUR", "interval": "month",
            "charges": [{"charge_id": "fee", "model": "flat", "amount": fee}]}  # fmt: skip


def publish(settings: Settings, bootstrap: str, events: list[tuple[Any, str]]) -> None:
    """(event, account) pairs, each at its own instant (the record timestamp: its arrival)."""
    records = []
    for n, (event, account) in enumerate(events):
        topic, rec = input_record(event, account, f"ev-{n}-{event.timestamp.isoformat()}")
        value = codec(topic.schema).encode(rec)
        records.append((topic.name, account.encode(), value, to_micros(event.timestamp) // 1000))
    produce_values(clients.producer(settings, bootstrap), records)


def rating(settings: Settings, bootstrap: str, catalog: Path) -> ProcessorProcess:
    return ProcessorProcess(settings, bootstrap, "rating", "--catalog", str(catalog),
                            "--clock", "event", env=V2).start()  # fmt: skip


def test_a_retired_plan_dropped_from_the_file_goes_on_billing(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, tmp_path: Path
) -> None:
    settings, bootstrap = pipeline_env, kafka_bootstrap
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=70)
    both, basic_only = tmp_path / "both.json", tmp_path / "basic.json"
    both.write_bytes(orjson.dumps({"plans": [plan("basic", "10.00"), plan("legacy", "25.00")]}))
    basic_only.write_bytes(orjson.dumps({"plans": [plan("basic", "10.00")]}))

    sink = procs.add(start_sink(settings, bootstrap))
    first = procs.add(rating(settings, bootstrap, both))
    publish(settings, bootstrap, [
        (SubscriptionCreated(start, "acc-1", "s-legacy", "legacy"), "acc-1"),
        (SubscriptionCreated(start, "acc-2", "s-basic", "basic"), "acc-2"),
    ])  # fmt: skip
    wait_until(lambda: scalar(settings, "SELECT count() FROM invoices FINAL") == 2, 90,
               "the two creation invoices", [sink, first])  # fmt: skip

    retire_plan(settings, bootstrap, "legacy", start + timedelta(days=5))
    first.stop()
    second = procs.add(rating(settings, bootstrap, basic_only))  # legacy is not in the file
    live = [sink, second]
    publish(settings, bootstrap, [
        (SubscriptionCreated(start + timedelta(days=6), "acc-3", "s-late", "legacy"), "acc-3"),
        (PlanChanged(start + timedelta(days=7), "s-basic", "legacy"), "acc-2"),
        (Usage("u-1", start + timedelta(days=8), "s-legacy", "calls", Decimal(1)), "acc-1"),
    ])  # fmt: skip
    run_bill_run(settings, bootstrap, now - timedelta(days=1), live)

    def invoices(sub: str) -> list[tuple[str, float]]:
        rows = scalar(
            settings,
            "SELECT groupArray((reason, toFloat64(total))) FROM (SELECT * "
            f"FROM invoices FINAL WHERE subscription_id = '{sub}' ORDER BY issued_at)",
        )
        return [tuple(r) for r in rows]  # fmt: skip

    wait_until(lambda: len(invoices("s-legacy")) >= 3, 90, "the legacy subscription's "
               "period ends", live)  # fmt: skip
    # billed on its version, as before the retirement, after a restart without it
    assert invoices("s-legacy")[:3] == [("created", 25.0), ("period_end", 25.0),
                                        ("period_end", 25.0)]  # fmt: skip
    assert [r for r, _ in invoices("s-basic")][:2] == ["created", "period_end"]
    wait_until(lambda: scalar(settings, "SELECT count() FROM dead_letters FINAL "
                              "WHERE processor = 'rating'") == 2, 60, "two dead letters",
               live)  # fmt: skip
    details = scalar(settings, "SELECT groupArray(detail) FROM (SELECT detail FROM dead_letters "
                     "FINAL WHERE processor = 'rating' ORDER BY detail)")  # fmt: skip
    assert details == ["plan 'legacy' is retired", "plan 'legacy' is retired"]
    assert invoices("s-late") == []
