"""confluent-kafka client settings shared by every processor."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from streams.config import Settings


def _base(settings: Settings, bootstrap: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, **settings.kafka_security}


def admin(settings: Settings, bootstrap: str) -> AdminClient:
    return AdminClient(_base(settings, bootstrap))


def producer(settings: Settings, bootstrap: str, **overrides: Any) -> Producer:
    conf = {
        **_base(settings, bootstrap),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    }
    conf.update(overrides)
    return Producer(conf)


def consumer(settings: Settings, bootstrap: str, group_id: str, **overrides: Any) -> Consumer:
    conf = {
        **_base(settings, bootstrap),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # only committed transactional output is ever read downstream
        "isolation.level": "read_committed",
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
        "max.poll.interval.ms": 300_000,
        "fetch.max.bytes": 52_428_800,
        "max.partition.fetch.bytes": 10_485_760,
        # prefetch per partition: a worker holds dozens; librdkafka's 64 MiB default
        # would let prefetched records dominate its memory
        "queued.max.messages.kbytes": 8_192,
        "partition.assignment.strategy": "cooperative-sticky",
    }
    conf.update(overrides)
    return Consumer(conf)
