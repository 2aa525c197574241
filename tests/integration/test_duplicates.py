"""The shared duplicate checks (streams/testbed/duplicates.py) on the real broker and
chDB: each catches the duplicate it names, and passes clean data."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from streams.codec import codec
from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import INVOICES
from streams.testbed.duplicates import topic_copies, warehouse_copies
from streams.warehouse import connect, disconnect
from tests.samples import sample

pytestmark = pytest.mark.kafka


def produce_in_transaction(
    settings: Settings, bootstrap: str, ids: list[int], commit: bool
) -> None:
    """Invoices sample(i) for each i, in one transaction (commit markers on the topic)."""
    producer = clients.producer(settings, bootstrap, **{"transactional.id": f"t-{ids}-{commit}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    encode = codec(INVOICES.schema).encode
    for i in ids:
        rec = sample("invoice", i)
        producer.produce(INVOICES.name, key=rec["account_id"].encode(), value=encode(rec))
    producer.flush(30)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def test_an_id_produced_twice_is_caught_and_a_clean_topic_passes(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    settings = pipeline_env
    ids = [f"inv-{i}" for i in range(10)]
    produce_in_transaction(settings, kafka_bootstrap, list(range(10)), commit=True)
    produce_in_transaction(settings, kafka_bootstrap, [3, 4], commit=False)  # never read
    clean = topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", ids)
    assert clean.ok, clean.summary()
    assert clean.records == 10 and clean.extra_copies == 0
    # decoding whole records (a filter) counts the same
    assert topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", ids,
                        keep=lambda r: r["reason"] == "period_end").ok  # fmt: skip

    produce_in_transaction(settings, kafka_bootstrap, [3], commit=True)  # inv-3 again
    twice = topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", ids)
    assert not twice.ok and twice.repeated == {"inv-3": 2} and twice.extra_copies == 1
    assert not twice.missing and not twice.unexpected
    # the ids alone, as a set, are the expected ones: only counting records sees it
    assert set(twice.copies) == set(ids)

    assert topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", ids[1:]).unexpected == {
        "inv-0"
    }
    assert topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id",
                        [*ids, "inv-x"]).missing == {"inv-x"}  # fmt: skip


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[Settings]:
    """Settings whose embedded warehouse is opened in this process (no sink running)."""
    settings = Settings(home=tmp_path / "home", clickhouse_dsn=None)
    yield settings
    disconnect(settings.warehouse_dsn)


def land(settings: Settings, invoices: list[dict]) -> None:
    """Invoices inserted as they land (one insert), with made-up Kafka coordinates."""
    client = connect(settings.warehouse_dsn)
    columns = ["invoice_id", "account_id", "subscription_id", "plan_id", "currency",
               "issued_at", "reason", "total", "line_count", "payment_method", "_partition",
               "_offset"]  # fmt: skip
    client.insert("invoices", [[inv[c] for c in columns] for inv in invoices], column_names=columns)


def invoice(i: int, **changes: object) -> dict:
    rec = sample("invoice", i)
    return {**rec, "line_count": len(rec["lines"]), "_partition": 0, "_offset": i, **changes}


def test_an_id_landed_with_two_contents_is_caught(warehouse: Settings) -> None:
    settings = warehouse
    from streams.warehouse import open_warehouse

    open_warehouse(settings)  # the migrations
    invoices = [invoice(i) for i in range(5)]
    totals = {inv["invoice_id"]: inv["total"] for inv in invoices}
    land(settings, invoices)
    clean = warehouse_copies(settings, "invoices", totals)
    assert clean.ok, clean.summary()
    assert warehouse_copies(settings, "invoices", 5).ok

    # the same content again (a batch re-landed after a crash): what the engine is for
    land(settings, invoices[:2])
    again = warehouse_copies(settings, "invoices", totals)
    assert again.ok and again.raw_rows == 7, again.summary()

    # one id again with another total, in a later insert: two contents among the copies
    altered = invoice(1, total=invoices[1]["total"] + 1, _offset=99)
    land(settings, [altered])
    across = warehouse_copies(settings, "invoices", 5)
    assert not across.ok and across.conflicting == 1, across.summary()
    assert across.conflicting_examples == {"inv-1": 2}
    assert across.final_rows == 5  # FINAL shows one row: count = uniqExact there

    # a FINAL count other than expected (here: the copies agree)
    without_1 = "invoice_id != 'inv-1'"
    assert warehouse_copies(settings, "invoices", 4, where=without_1).ok
    short = warehouse_copies(settings, "invoices", 5, where=without_1)
    assert not short.ok and short.conflicting == 0 and short.final_rows == 4


def test_two_contents_in_one_insert_are_caught_by_the_expected_amounts(
    warehouse: Settings,
) -> None:
    """ClickHouse collapses two rows of one key in one insert (optimize_on_insert): the
    raw copies show one content, so the amounts expected are what catches it."""
    settings = warehouse
    from streams.warehouse import open_warehouse

    open_warehouse(settings)
    invoices = [invoice(i) for i in range(5)]
    totals = {inv["invoice_id"]: inv["total"] for inv in invoices}
    doubled = {**invoices[2], "total": invoices[2]["total"] + Decimal(1000)}
    land(settings, [*invoices, doubled])
    check = warehouse_copies(settings, "invoices", totals)
    assert not check.ok, check.summary()
    assert check.wrong_amounts == {"inv-2": (invoices[2]["total"] + 1000, invoices[2]["total"])}
    assert check.final_rows == 5 and check.conflicting == 0  # the rest cannot see it
    # ids missing or not expected are wrong amounts too
    del totals["inv-0"]
    assert "inv-0" in warehouse_copies(settings, "invoices", totals).wrong_amounts
