"""Topic history read into memory beside a processor's own input, never ahead of it.

A processor that judges a request by what other topics sharing its key have said (the
lanes: payments, invoices, refunds, subscriptions of the request's partition) reads the
same partitions of those topics from their beginning when it is assigned its input, with
a consumer of their own (``enable.partition.eof``, assigned by hand). ``History`` applies
them in bounded chunks between the processor's polls, so that bulk history never queues
ahead of a request; a partition is ready once every history topic reported its end.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

CHUNK = 500  # records fetched at a time
# history applied per loop turn at most: between two turns the processor's requests and
# gateway answers wait, and a request takes several turns (consume, call, answer, publish)
BUDGET_S = 0.005


class History:
    def __init__(
        self,
        consumer: Consumer,
        topics: list[str],
        apply: Callable[[Any], None],
        on_ready: Callable[[int], None],
    ) -> None:
        """apply: one history record; on_ready: a partition read up to its end in every
        topic since its assignment."""
        self.consumer = consumer
        self.topics = topics
        self.apply = apply
        self.on_ready = on_ready
        self.fetched: deque[Any] = deque()  # fetched, not applied yet
        self.pending_ends: set[tuple[str, int]] = set()

    def assign(self, partitions: list[int]) -> None:
        """Read these partitions of every topic from the beginning."""
        self.fetched.clear()
        self.pending_ends = {(t, p) for t in self.topics for p in partitions}
        self.consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in self.topics for p in partitions]
        )

    def revoke(self) -> None:
        self.consumer.assign([])
        self.fetched.clear()

    def apply_some(self) -> int:
        """Apply history for at most BUDGET_S; returns how many records."""
        if not self.fetched:
            self.fetched.extend(self.consumer.consume(CHUNK, timeout=0))
        deadline = time.perf_counter() + BUDGET_S
        applied = 0
        while self.fetched and time.perf_counter() < deadline:
            msg = self.fetched.popleft()
            applied += 1
            if msg.error() is None:
                self.apply(msg)
            elif msg.error().code() == KafkaError._PARTITION_EOF:
                self._at_end(msg.topic(), msg.partition())
        return applied

    def _at_end(self, topic: str, partition: int) -> None:
        if (topic, partition) not in self.pending_ends:
            return
        self.pending_ends.discard((topic, partition))
        if not any(p == partition for _, p in self.pending_ends):
            self.on_ready(partition)

    def caught_up(self, partition: int) -> bool:
        """Has partition p of every topic been read up to the end last heard of, and
        applied? (Local figures, no broker round trip.)"""
        if any(msg.partition() == partition for msg in self.fetched):
            return False  # fetched, not applied yet
        for topic in self.topics:
            tp = TopicPartition(topic, partition)
            position = self.consumer.position([tp])[0].offset
            high = self.consumer.get_watermark_offsets(tp, cached=True)[1]
            if high > 0 and position < high:  # (an unknown position is negative)
                return False
        return True

    async def catch_up(self, partition: int, timeout: float) -> None:
        """Wait (at most `timeout` s) until partition p has caught up with what was
        published before now: it may be queued behind bulk history."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.caught_up(partition):
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.consumer.close()
