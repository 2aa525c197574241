"""The sink on the real broker and chDB: every topic lands exactly once, whatever
happens to the sink."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition

from streams.codec import codec
from streams.config import Settings
from streams.generator import (
    DEFAULT_UNTIL,
    Dataset,
    expected_invoices,
    subscription_events,
    usage_events,
)
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
from streams.publish import issue_bill_run, publish
from tests.integration.helpers import Procs, scalar, start_rating, start_sink, wait_until
from tests.integration.test_pipeline import CATALOG
from tests.samples import sample

pytestmark = pytest.mark.kafka

# topic -> (landing table, its id: one row per id)
LANDED = {
    SUBSCRIPTIONS: ("subscription_events", "(_partition, _offset)"),
    USAGE: ("usage_events", "(_partition, _offset)"),
    INVOICES: ("invoices", "invoice_id"),
    PAYMENT_RESULTS: ("payment_attempts", "payment_id"),
    REFUND_RESULTS: ("refunds", "refund_id"),
    ENTITLEMENTS: ("entitlements", "entitlement_id"),
    DEAD_LETTER: ("dead_letters", "dead_letter_id"),
}


def committed_messages(settings: Settings, bootstrap: str, topic: TopicSpec) -> int:
    """Messages a read_committed consumer sees on the topic (transaction markers and
    aborted records excluded), counted by reading it to the end."""
    consumer = clients.consumer(
        settings, bootstrap, f"count-{time.monotonic_ns()}", **{"enable.partition.eof": True}
    )
    try:
        parts = [TopicPartition(topic.name, p, 0) for p in range(settings.partitions)]
        consumer.assign(parts)
        seen, at_end = 0, set()
        while len(at_end) < len(parts):
            for msg in consumer.consume(10_000, timeout=1.0):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition())
                    continue
                seen += 1
        return seen
    finally:
        consumer.close()


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
            for spec, (table, _) in LANDED.items()
        }

    try:
        wait_until(lambda: all(a >= b for a, b in landed().values()), 120,
                   "every topic", [sink, rating])  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (landed, on the topic) per table: {landed()}") from None
    time.sleep(2)  # anything landing twice would show now
    for spec, (table, key) in LANDED.items():
        rows = scalar(settings, f"SELECT count() FROM {table} FINAL")
        assert rows == expected[spec], landed()
        assert scalar(settings, f"SELECT uniqExact({key}) FROM {table}") == rows, table
    lines = scalar(settings, "SELECT count() FROM invoice_lines FINAL")
    assert lines == scalar(settings, "SELECT sum(line_count) FROM invoices FINAL")
    reasons = query_rows(settings, "SELECT processor, reason FROM dead_letters FINAL")
    assert sorted(reasons) == [["rating", "unknown_schema"], ["sink", "unknown_schema"]]


def query_rows(settings: Settings, sql: str) -> list[list[Any]]:
    from streams.warehouse import query

    return query(settings, sql)["rows"]
