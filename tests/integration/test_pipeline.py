"""End to end on the real broker and chDB: generator -> rating -> invoices -> sink."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from streams.codec import codec
from streams.config import Settings
from streams.domain.catalog import Catalog
from streams.domain.invoice import invoice_to_dict
from streams.kafka import clients
from streams.kafka.topics import INVOICES, SUBSCRIPTIONS, USAGE
from streams.offline import rate_events, record_to_json_line
from streams.publish import publish, publish_in_time_order
from streams.replay import landed_invoices
from streams.testbed.demo import DEMO_CATALOG
from streams.testbed.duplicates import topic_copies, warehouse_copies
from streams.testbed.generator import (
    DEFAULT_UNTIL,
    Dataset,
    expected_invoices,
    subscription_events,
    usage_events,
)
from tests.integration.helpers import (
    Procs,
    as_streamed,
    run_bill_run,
    scalar,
    start_rating,
    start_sink,
    wait_until,
)

pytestmark = pytest.mark.kafka
CATALOG = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))


def lifecycle_events(ds: Dataset) -> list[dict]:
    """Plan changes and cancellations for a few subscriptions, inside their first period."""
    plans = sorted(CATALOG.plans)
    events = []
    for i in range(0, ds.accounts, 7):
        plan = plans[i % len(plans)]
        at = ds.anchor(i) + timedelta(days=10, hours=3)
        base = dict(
            account_id=ds.account(i), subscription_id=ds.subscription(i), timestamp=at,
            mode=None, payment_method=None, plan_id=None,
        )  # fmt: skip
        if plan == "starter-eur":
            change = {"type": "subscription.plan_changed", "plan_id": "growth-eur"}
            events.append({**base, **change, "event_id": f"{ds.subscription(i)}-chg"})
        elif i % 3 == 0:
            mode = "immediate" if i % 2 else "end_of_period"
            events.append({**base, "event_id": f"{ds.subscription(i)}-cancel",
                           "type": "subscription.cancelled", "mode": mode})  # fmt: skip
    return events


def test_pipeline_matches_offline_rater_and_replay_adds_nothing(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    ds = Dataset(accounts=400, seed=3)
    subs = list(subscription_events(ds, CATALOG))
    usage = list(usage_events(ds, CATALOG))
    changes = lifecycle_events(ds)
    assert changes, "the scenario must exercise plan changes and cancellations"

    # the reference: the offline rater on the same events
    lines = [record_to_json_line("sub", r) for r in subs + changes]
    lines += [record_to_json_line("usage", r) for r in usage]
    reference = rate_events(CATALOG, lines, DEFAULT_UNTIL)
    # usage after an immediate cancellation is rejected, by both
    assert {d["reason"] for d in reference.dead_letters} <= {"subscription has ended"}
    assert reference.deferred == 0
    expected = {inv.invoice_id: invoice_to_dict(inv) for inv in reference.invoices}

    sink = procs.add(start_sink(settings, kafka_bootstrap))
    # small transactions and cache: usage-only transactions poll on (up to 300 records,
    # at most 100 subscriptions), states are evicted and read back from RocksDB
    small = {"STREAMBILL_RATING_TRANSACTION_RECORDS": "60",
             "STREAMBILL_RATING_USAGE_TRANSACTION_RECORDS": "300",
             "STREAMBILL_RATING_STATE_CACHE": "100"}  # fmt: skip
    rating = procs.add(start_rating(settings, kafka_bootstrap, small))
    producer = clients.producer(settings, kafka_bootstrap)
    publish_in_time_order(producer, [(SUBSCRIPTIONS, subs + changes), (USAGE, usage)])
    run_bill_run(settings, kafka_bootstrap, DEFAULT_UNTIL, [sink, rating])
    count = f"SELECT count() FROM invoices FINAL WHERE startsWith(account_id, '{ds.prefix}')"
    wait_until(lambda: scalar(settings, count) >= len(expected), 120, "invoices", [sink])

    # field for field (ids, periods, quantities, reason, every line), as test_parity.py
    # does on the contract's cases: here at volume, on the generator's data
    def whole(inv: Any) -> dict[str, Any]:
        return {**as_streamed(invoice_to_dict(inv)), "reason": inv.reason}

    assert [whole(inv) for inv in landed_invoices(settings)] == [
        whole(inv) for inv in reference.invoices
    ]

    dead = "SELECT count() FROM dead_letters FINAL"
    wait_until(lambda: scalar(settings, dead) >= len(reference.dead_letters), 30, "dead letters")
    assert scalar(settings, dead) == len(reference.dead_letters)

    # replay every input: no new invoice, each duplicate is a dead letter, not a row
    publish(producer, SUBSCRIPTIONS, subs + changes)
    publish(producer, USAGE, usage)
    run_bill_run(settings, kafka_bootstrap, DEFAULT_UNTIL, [sink, rating])
    replayed = len(subs) + len(changes) + len(usage)
    wait_until(lambda: scalar(settings, dead) >= len(subs), 60, "dead letters", [sink])
    time.sleep(2)
    assert scalar(settings, count) == len(expected)
    # each invoice on one record of billing.invoices, landed once with its total and lines
    on_topic = topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", expected)
    assert on_topic.ok, on_topic.summary()
    totals = {invoice_id: Decimal(ref["total"]) for invoice_id, ref in expected.items()}
    landed_once = warehouse_copies(settings, "invoices", totals)
    assert landed_once.ok, landed_once.summary()
    n_lines = sum(len(ref["lines"]) for ref in expected.values())
    lines_once = warehouse_copies(settings, "invoice_lines", n_lines)
    assert lines_once.ok, lines_once.summary()
    assert scalar(settings, dead) <= replayed


def test_invalid_input_goes_to_dead_letter_and_pipeline_goes_on(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    ds = Dataset(accounts=20, seed=11)
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    rating = procs.add(start_rating(settings, kafka_bootstrap))
    producer = clients.producer(settings, kafka_bootstrap)
    # not Avro at all, truncated Avro, and a valid record with a negative quantity
    producer.produce(USAGE.name, key=b"acct-x", value=b"\x00garbage that is not avro")
    good = next(iter(usage_events(ds, CATALOG)))
    producer.produce(USAGE.name, key=b"acct-x", value=codec("usage_event").encode(good)[:-4])
    negative = {**good, "event_id": "neg", "quantity": Decimal("-5")}
    publish(producer, USAGE, [negative])
    producer.flush()
    # valid input after the bad one is still processed
    publish(producer, SUBSCRIPTIONS, list(subscription_events(ds, CATALOG)))
    publish(producer, USAGE, list(usage_events(ds, CATALOG)))
    run_bill_run(settings, kafka_bootstrap, DEFAULT_UNTIL, [sink, rating])
    want = expected_invoices(ds, CATALOG, DEFAULT_UNTIL)
    count = "SELECT count() FROM invoices FINAL"
    wait_until(lambda: scalar(settings, count) == want, 60, "invoices", [sink])
    reasons = "SELECT groupArray((processor, reason)) FROM dead_letters FINAL"
    wait_until(lambda: len(scalar(settings, reasons)) >= 5, 30, "dead letters", [sink])
    got = sorted(tuple(r) for r in scalar(settings, reasons))
    # the rating processor rejects all three; the sink lands the valid Avro record raw
    assert got == [("rating", "invalid_avro"), ("rating", "invalid_avro"),
                   ("rating", "invalid_event"), ("sink", "invalid_avro"),
                   ("sink", "invalid_avro")], got  # fmt: skip
    detail = scalar(
        settings, "SELECT any(detail) FROM dead_letters FINAL WHERE reason = 'invalid_event'"
    )
    assert "negative" in detail
    # the original bytes are kept, unaltered
    garbage = b"\x00garbage that is not avro".hex()
    kept = f"SELECT count() FROM dead_letters FINAL WHERE value = unhex('{garbage}')"
    assert scalar(settings, kept) == 2  # one per processor
    assert rating.alive and sink.alive


def test_bill_run_for_chosen_accounts_only(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    ds = Dataset(accounts=50, seed=9)
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    rating = procs.add(start_rating(settings, kafka_bootstrap))
    producer = clients.producer(settings, kafka_bootstrap)
    publish(producer, SUBSCRIPTIONS, subscription_events(ds, CATALOG))
    from streams.publish import bill_run_done, issue_bill_run

    chosen = [ds.account(i) for i in range(0, 50, 5)]
    offsets = issue_bill_run(settings, kafka_bootstrap, DEFAULT_UNTIL, chosen)
    wait_until(lambda: bill_run_done(settings, kafka_bootstrap, offsets) == len(offsets),
               60, "bill run", [rating])  # fmt: skip
    closed = "SELECT count() FROM invoices FINAL WHERE reason = 'period_end'"
    wait_until(lambda: scalar(settings, closed) >= len(chosen), 60, "invoices", [sink])
    time.sleep(1)
    assert scalar(settings, closed) == len(chosen)
    got = scalar(
        settings,
        "SELECT groupArray(account_id) FROM invoices FINAL WHERE reason = 'period_end'",
    )
    assert sorted(got) == sorted(chosen)
    assert scalar(settings, "SELECT count() FROM invoices FINAL WHERE reason = 'created'") == 50
