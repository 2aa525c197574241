"""Publishing records to the billing topics (generator, bill runs, tests, benchmarks)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from streams.codec import codec
from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import CONTROL, SUBSCRIPTIONS, USAGE, TopicSpec, group_id


class DeliveryError(RuntimeError):
    pass


def publish(
    producer: Producer,
    topic: TopicSpec,
    records: Iterable[dict[str, Any]],
    key_field: str = "account_id",
    progress: Callable[[int], None] | None = None,
) -> int:
    """Encode and produce records keyed by account; waits until all are acknowledged."""
    return publish_mixed(producer, ((topic, r) for r in records), key_field, progress)


def publish_in_time_order(
    producer: Producer,
    streams: Iterable[tuple[TopicSpec, Iterable[dict[str, Any]]]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Publish several topics' records interleaved by their timestamp, as upstream
    systems do when they publish events as they happen."""
    merged = sorted(
        ((t, r) for t, records in streams for r in records), key=lambda tr: tr[1]["timestamp"]
    )
    return publish_mixed(producer, merged, progress=progress)


def publish_mixed(
    producer: Producer,
    records: Iterable[tuple[TopicSpec, dict[str, Any]]],
    key_field: str = "account_id",
    progress: Callable[[int], None] | None = None,
) -> int:
    encoded = (
        (topic.name, rec[key_field].encode(), codec(topic.schema).encode(rec), None)
        for topic, rec in records
    )
    return produce_values(producer, encoded, progress)


def produce_values(
    producer: Producer,
    values: Iterable[tuple[str, bytes, bytes, int | None]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Produce (topic name, key, value, record timestamp in epoch ms or None for now) in
    order; waits until all are acknowledged."""
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    count = 0
    for topic_name, key, value, timestamp_ms in values:
        while True:
            try:
                producer.produce(
                    topic_name,
                    key=key,
                    value=value,
                    on_delivery=delivered,
                    timestamp=timestamp_ms or 0,  # 0: the producer's clock
                )
                break
            except BufferError:  # local queue full: let it drain
                producer.poll(0.05)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
            if progress:
                progress(10_000)
    producer.flush()
    if progress:
        progress(count % 10_000)
    if errors:
        raise DeliveryError(f"{len(errors)} records not delivered, first: {errors[0]}")
    return count


def end_offsets(consumer: Consumer, topic: str, partitions: int) -> list[int]:
    return [
        clients.retrying(
            lambda p=p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
        )[1]
        for p in range(partitions)
    ]


def partition_count(consumer: Consumer, topic: str) -> int:
    return len(consumer.list_topics(topic, timeout=30).topics[topic].partitions)


def issue_bill_run(
    settings: Settings, bootstrap: str, until: datetime, accounts: list[str] | None = None
) -> dict[int, int]:
    """Ask every rating partition to close the periods ending <= until, once it has
    consumed everything published so far. Returns partition -> control record offset."""
    probe = clients.consumer(settings, bootstrap, group_id("streambill-billrun"))
    try:
        n = partition_count(probe, CONTROL.name)
        barriers = {t.name: end_offsets(probe, t.name, n) for t in (SUBSCRIPTIONS, USAGE)}
    finally:
        probe.close()
    run_id = str(uuid.uuid4())
    producer = clients.producer(settings, bootstrap)
    offsets: dict[int, int] = {}

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            offsets[msg.partition()] = msg.offset()

    encode = codec(CONTROL.schema).encode
    for p in range(n):
        record = {
            "run_id": run_id,
            "until": until,
            "accounts": accounts,
            "barrier": {topic: ends[p] for topic, ends in barriers.items()},
            "issued_at": datetime.now(UTC),
        }
        producer.produce(CONTROL.name, value=encode(record), partition=p, on_delivery=delivered)
    producer.flush()
    if len(offsets) != n:
        raise DeliveryError("bill run not delivered to every partition")
    return offsets


def bill_run_done(settings: Settings, bootstrap: str, offsets: dict[int, int]) -> int:
    """How many partitions have completed the run (committed past its control record)."""
    from streams.processors.rating import GROUP

    probe = clients.consumer(settings, bootstrap, group_id(GROUP))
    try:
        committed = probe.committed([TopicPartition(CONTROL.name, p) for p in offsets], timeout=30)
    finally:
        probe.close()
    return sum(1 for tp in committed if tp.offset > offsets[tp.partition])


def issue_payment_run(settings: Settings, bootstrap: str, until: datetime) -> str:
    """Ask every payments partition to collect now everything due up to `until`."""
    from streams.kafka.topics import PAYMENT_CONTROL

    probe = clients.consumer(settings, bootstrap, group_id("streambill-paymentrun"))
    try:
        n = partition_count(probe, PAYMENT_CONTROL.name)
    finally:
        probe.close()
    run_id = str(uuid.uuid4())
    record = {"run_id": run_id, "until": until, "issued_at": datetime.now(UTC)}
    value = codec(PAYMENT_CONTROL.schema).encode(record)
    producer = clients.producer(settings, bootstrap)
    for p in range(n):
        producer.produce(PAYMENT_CONTROL.name, value=value, partition=p)
    if producer.flush(30):
        raise DeliveryError("payment run not delivered to every partition")
    return run_id


def read_topic(settings: Settings, bootstrap: str, topic: TopicSpec) -> list[dict[str, Any]]:
    """Every committed record of a topic, decoded, read to its current end (records
    that do not decode are skipped: they are the dead-letter topic's business)."""
    from contextlib import suppress

    from confluent_kafka import KafkaError

    from streams.codec import DecodeError

    consumer = clients.consumer(
        settings, bootstrap, group_id(f"streambill-reader-{uuid.uuid4().hex}"),
        **{"enable.partition.eof": True},
    )  # fmt: skip
    decode = codec(topic.schema).decode
    out: list[dict[str, Any]] = []
    try:
        n = partition_count(consumer, topic.name)
        consumer.assign([TopicPartition(topic.name, p, 0) for p in range(n)])
        at_end: set[int] = set()
        while len(at_end) < n:
            for msg in consumer.consume(10_000, timeout=1.0):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition())
                    continue
                with suppress(DecodeError):
                    out.append(decode(msg.value()))
        return out
    finally:
        consumer.close()
