"""The sink on the real broker and chDB: every topic lands exactly once, whatever
happens to the sink."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from streams.codec import codec
from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import (
    DEAD_LETTER,
    ENTITLEMENTS,
    INVOICES,
    PAYMENT_RESULTS,
    REFUND_RESULTS,
    SUBSCRIPTIONS,
    USAGE,
    TopicSpec,
)
from streams.publish import issue_bill_run, publish, read_topic
from streams.testbed.duplicates import committed_values, topic_copies, warehouse_copies
from streams.testbed.generator import (
    DEFAULT_UNTIL,
    Dataset,
    expected_invoices,
    subscription_events,
    usage_events,
)
from tests.integration.helpers import Procs, scalar, start_rating, start_sink, wait_until
from tests.integration.test_pipeline import CATALOG
from tests.samples import sample

pytestmark = pytest.mark.kafka

# topic -> its landing table (ids and contents: streams.testbed.duplicates.LANDINGS)
LANDED = {
    SUBSCRIPTIONS: "subscription_events",
    USAGE: "usage_events",
    INVOICES: "invoices",
    PAYMENT_RESULTS: "payment_attempts",
    REFUND_RESULTS: "refunds",
    ENTITLEMENTS: "entitlements",
    DEAD_LETTER: "dead_letters",
}


def committed_messages(settings: Settings, bootstrap: str, topic: TopicSpec) -> int:
    """Messages a read_committed consumer sees on the topic (transaction markers and
    aborted records excluded), counted by reading it to the end."""
    return sum(1 for _ in committed_values(settings, bootstrap, topic))


def publish_samples(producer: Any, topic: TopicSpec, schema: str, n: int) -> None:
    encode = codec(schema).encode
    for i in range(n):
        rec = sample(schema, i)
        producer.produce(topic.name, key=rec["account_id"].encode(), value=encode(rec))
        producer.poll(0)
    producer.flush()


def test_sink_killed_ten_times_lands_every_message_exactly_once(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    ds = Dataset(accounts=3000, seed=5)
    producer = clients.producer(settings, kafka_bootstrap)
    rating = procs.add(start_rating(settings, kafka_bootstrap))
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    publish(producer, SUBSCRIPTIONS, subscription_events(ds, CATALOG))
    publish(producer, USAGE, usage_events(ds, CATALOG))
    # a usage record no decoder accepts: the rating processor and the sink dead-letter it
    producer.produce(USAGE.name, key=b"acct-x", value=b"\xc3\x01not avro at all")
    publish_samples(producer, PAYMENT_RESULTS, "payment_result", 2000)
    publish_samples(producer, REFUND_RESULTS, "refund_result", 500)
    publish_samples(producer, ENTITLEMENTS, "entitlement", 500)
    issue_bill_run(settings, kafka_bootstrap, DEFAULT_UNTIL)
    want_invoices = expected_invoices(ds, CATALOG, DEFAULT_UNTIL)

    rng = random.Random(7)
    kills = 0
    for _ in range(10):
        time.sleep(rng.uniform(0.2, 1.5))
        sink.kill()  # SIGKILL: no flush, no commit, no goodbye
        kills += 1
        sink = procs.add(start_sink(settings, kafka_bootstrap))
    assert kills == 10

    count = "SELECT count() FROM invoices FINAL"
    wait_until(lambda: scalar(settings, count) >= want_invoices, 240, "invoices", [sink, rating])
    expected = {spec: committed_messages(settings, kafka_bootstrap, spec) for spec in LANDED}
    assert expected[INVOICES] == want_invoices
    assert expected[DEAD_LETTER] == 2  # the bad usage record: once per processor
    expected[USAGE] -= 1  # ... and not a usage row: messages = rows + the sink's dead letters

    def landed() -> dict[str, tuple[int, int]]:
        return {
            table: (scalar(settings, f"SELECT count() FROM {table} FINAL"), expected[spec])
            for spec, table in LANDED.items()
        }

    try:
        wait_until(lambda: all(a >= b for a, b in landed().values()), 120,
                   "every topic", [sink, rating])  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (landed, on the topic) per table: {landed()}") from None
    time.sleep(2)  # anything landing twice would show now
    # each message once: as many rows as messages, no id landed with two contents, and
    # every invoice with the total it has on the topic
    totals = {r["invoice_id"]: r["total"] for r in read_topic(settings, kafka_bootstrap, INVOICES)}
    for spec, table in LANDED.items():
        landed_once = warehouse_copies(
            settings, table, totals if spec is INVOICES else expected[spec]
        )
        assert landed_once.ok, landed_once.summary()
    lines = scalar(settings, "SELECT sum(line_count) FROM invoices FINAL")
    # one insert lands an invoice batch into both tables through two views: the invoices
    # can be seen before their lines, so the lines get the time the other tables had
    wait_until(lambda: scalar(settings, "SELECT count() FROM invoice_lines FINAL") >= lines,
               120, "the invoices' lines", [sink, rating])  # fmt: skip
    lines_once = warehouse_copies(settings, "invoice_lines", lines)
    assert lines_once.ok, lines_once.summary()
    on_topic = topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id")
    assert on_topic.ok and len(on_topic.copies) == want_invoices, on_topic.summary()
    reasons = query_rows(settings, "SELECT processor, reason FROM dead_letters FINAL")
    assert sorted(reasons) == [["rating", "unknown_schema"], ["sink", "unknown_schema"]]


def query_rows(settings: Settings, sql: str) -> list[list[Any]]:
    from streams.warehouse import query

    return query(settings, sql)["rows"]
