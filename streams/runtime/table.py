"""A compacted topic read whole into a dict and kept current: the latest value per key.

Kafka Streams calls this a global table. A processor that needs, for any key, the
latest record of a compacted topic (the payments processor: an account's current
payment method from ``billing.customers``) holds one. A thread of its own reads every
partition from the beginning with a consumer outside any group (nothing is committed:
the topic is read whole at every start) and keeps reading, so a change published now is
seen within a poll. ``catch_up`` waits until everything published before the call is
in the dict: a processor calls it before its first use, so that a restart never acts on
an older record than the one that was current.

A record that does not decode is skipped with a warning (and counted); the previous
value of its key stays. A tombstone (null value) deletes its key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import OffsetSpec

from streams.codec import DecodeError
from streams.config import Settings
from streams.kafka import clients
from streams.metrics import TABLE_RECORDS

log = structlog.get_logger(__name__)
V = TypeVar("V")


class TopicTable(Generic[V]):
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        topic: str,
        decode: Callable[[bytes], V],
        name: str,
    ) -> None:
        """decode: a record's value -> what the table holds (raises DecodeError);
        name: the holder's, for logs and metrics."""
        self.topic = topic
        self.decode = decode
        self.name = name
        self.values: dict[str, V] = {}
        self.positions: dict[int, int] = {}  # partition -> next offset to apply
        self.consumer = clients.consumer(settings, bootstrap, f"{name}-table-unused",
                                         **{"enable.partition.eof": False})  # fmt: skip
        # the ends are asked of another client: the consumer's own calls from this thread
        # would wait on its polling thread
        self.admin = clients.admin(settings, bootstrap)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.partitions: list[int] = []
        self.applied = TABLE_RECORDS.labels(name, topic, "applied")
        self.skipped = TABLE_RECORDS.labels(name, topic, "undecodable")

    def start(self) -> TopicTable[V]:
        partitions = clients.retrying(
            lambda: self.consumer.list_topics(self.topic, timeout=10).topics[self.topic]
        )
        if partitions.error is not None:
            raise KafkaException(partitions.error)
        self.partitions = sorted(partitions.partitions)
        self.consumer.assign(
            [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self.partitions]
        )
        self.thread = threading.Thread(target=self._run, name=f"table-{self.topic}", daemon=True)
        self.thread.start()
        return self

    def get(self, key: str) -> V | None:
        return self.values.get(key)

    def __len__(self) -> int:
        return len(self.values)

    def _run(self) -> None:
        assigned = [TopicPartition(self.topic, p) for p in self.partitions]
        while not self.stopped.is_set():
            for msg in self.consumer.consume(500, timeout=0.1):
                if msg.error() is not None:
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("table read error", table=self.topic, error=str(msg.error()))
                    continue
                self._apply(msg)
            # the consumer's positions, not the last record's offset + 1: a transaction's
            # commit marker takes an offset of its own, which is never delivered
            for tp in self.consumer.position(assigned):
                if tp.offset >= 0:
                    self.positions[tp.partition] = max(self.positions.get(tp.partition, 0),
                                                       tp.offset)  # fmt: skip

    def _apply(self, msg: Any) -> None:
        key = (msg.key() or b"").decode("utf-8", "replace")
        value = msg.value()
        if value is None:
            self.values.pop(key, None)
        else:
            try:
                self.values[key] = self.decode(value)
                self.applied.inc()
            except DecodeError as exc:
                self.skipped.inc()
                log.warning("a table record does not decode; the key keeps its value",
                            table=self.topic, partition=msg.partition(), offset=msg.offset(),
                            reason=exc.reason, detail=exc.detail)  # fmt: skip
        self.positions[msg.partition()] = msg.offset() + 1

    def caught_up_with(self, ends: dict[int, int]) -> bool:
        return all(self.positions.get(p, 0) >= end for p, end in ends.items())

    def catch_up(self, timeout: float = 60.0) -> None:
        """Wait until every record published before this call is applied. Raises
        TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        ends = clients.retrying(self._ends)
        while not self.caught_up_with(ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic} not read up to its end in {timeout:.0f} s")
            time.sleep(0.01)

    def _ends(self) -> dict[int, int]:
        wanted = {TopicPartition(self.topic, p): OffsetSpec.latest() for p in self.partitions}
        answers = self.admin.list_offsets(
            wanted, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=10
        )
        return {tp.partition: future.result().offset for tp, future in answers.items()}

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.consumer.close()
