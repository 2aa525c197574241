"""confluent-kafka client settings shared by every processor."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from streams.config import Settings
from streams.logging import KAFKA_LOGGER

T = TypeVar("T")


def _base(settings: Settings, bootstrap: str) -> dict[str, Any]:
    # librdkafka's own lines (connection failures, ...) go to the JSON log, not raw stderr
    return {"bootstrap.servers": bootstrap, "logger": KAFKA_LOGGER, **settings.kafka_security}


def admin(settings: Settings, bootstrap: str) -> AdminClient:
    return AdminClient(_base(settings, bootstrap))


# for latency-critical clients (the priority lane): librdkafka leaves Nagle's algorithm
# on, so a small request written while an earlier one is unacknowledged can wait for the
# broker's delayed ACK (the Java clients turn it off)
NO_DELAY = {"socket.nagle.disable": True}


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
        # names the process in group descriptions (streambill scale, streambill lag)
        "client.id": f"streambill-{os.getpid()}",
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


def retrying(call: Callable[[], T], attempts: int = 40, delay: float = 0.25) -> T:
    """Run a metadata/offset request again while the cluster answers with a transient
    error (e.g. NOT_LEADER_FOR_PARTITION right after topics were created or deleted)."""
    for attempt in range(attempts):
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            transient = getattr(error, "retriable", lambda: False)() or getattr(
                error, "code", lambda: None
            )() in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")
