"""Event-time alignment of two co-partitioned input topics, as Kafka Streams does (KIP-695).

Each partition's records of both topics wait in small buffers (``buffers``: partition ->
topic -> records in offset order, each with a ``timestamp`` and its ``msg``) and are
released in timestamp order, the first topic's first on ties. A record is released only
when the other topic's buffer has data too or that topic is caught up (nothing of it
left to fetch: a record never overtakes an earlier one that is published but not yet
fetched); only when the broker cannot say do records flow after ``max_idle`` seconds.
Records held back are looked at again every turn, new input or not (``waiting``).

A topic-partition whose buffer fills up (the other topic lags behind in event time) is
paused until it is down to half (``backpressure``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

MAX_BUFFERED = 5_000  # records waiting for event-time order, per topic-partition
Positions = dict[tuple[str, int], int]  # (topic, partition) -> next offset consumed


class Alignment:
    def __init__(
        self, consumer: Any, admin: Any, first: str, second: str, max_idle: float = 0.5
    ) -> None:
        """first, second: the topics' names; the first topic's record goes first on a
        tie. admin: for the end offsets (caught up?)."""
        self.consumer, self.admin = consumer, admin
        self.first, self.second = first, second
        self.max_idle = max_idle
        self.buffers: dict[int, dict[str, deque[Any]]] = {}
        # partition -> since when (monotonic) its records wait for the other topic: only
        # while some do
        self.blocked_since: dict[int, float] = {}
        self.throttled: set[tuple[str, int]] = set()  # paused: their buffer is full

    @property
    def waiting(self) -> bool:
        """Records are held back for the other topic (see ``drain``)."""
        return bool(self.blocked_since)

    def buffer(self, p: int) -> dict[str, deque[Any]]:
        """Partition p's buffers, by topic."""
        topics = self.buffers.get(p)
        if topics is None:
            topics = self.buffers[p] = {self.first: deque(), self.second: deque()}
        return topics

    def revoke(self, p: int) -> None:
        """Partition p is gone: its unreleased records are fetched again from the
        committed offsets by whoever gets it."""
        self.buffers.pop(p, None)
        self.blocked_since.pop(p, None)
        self.throttled = {(t, q) for t, q in self.throttled if q != p}

    def holds_before(self, p: int, barrier: dict[str, int]) -> bool:
        """Does partition p still hold a record before the given offsets (topic -> offset)?"""
        buffers = self.buffers.get(p, {})
        return any(
            buffers.get(t) and buffers[t][0].msg.offset() < end for t, end in barrier.items()
        )

    def drain(self, positions: Positions, release: Callable[[list[Any], int], None]) -> None:
        """Release what may go of every partition's buffers: ``release(records, p)`` with
        partition p's records in the order they are to be applied; the next offset of each
        released record's topic-partition goes into `positions`. The caught-up looks that
        releasing needs are made together (one request to the broker per round)."""
        caught: dict[tuple[str, int], bool | None] = {}
        todo = list(self.buffers)
        while todo:
            needs = {}
            for p in todo:
                ready: list[Any] = []
                need = self.order(p, positions, caught, ready)
                if ready:
                    release(ready, p)
                if need is not None:
                    needs[need] = p
            if not needs:
                return
            caught.update(self.caught_up(set(needs)))
            todo = list(needs.values())

    def order(
        self,
        p: int,
        positions: Positions,
        caught: dict[tuple[str, int], bool | None],
        ready: list[Any],
    ) -> tuple[str, int] | None:
        """Moves partition p's records that may go now, in the order they are to be
        applied, from its buffers to `ready`. Returns the (topic, p) whose caught-up state
        (`caught`: True, False, or None when the broker cannot say) must be looked up
        before it can go on, if any."""
        first = self.buffers[p][self.first]
        second = self.buffers[p][self.second]
        while first or second:
            if first and second:
                self.blocked_since.pop(p, None)
            else:
                empty = (self.first if not first else self.second, p)
                if empty not in caught:
                    return empty
                if not caught[empty]:
                    since = self.blocked_since.setdefault(p, time.monotonic())
                    if caught[empty] is False or time.monotonic() - since < self.max_idle:
                        return None  # the silent topic may still hold earlier events
                # the other topic has nothing before them: all of this one's go, in order
                waiting = first or second
                ready.extend(waiting)
                positions[(waiting[-1].msg.topic(), p)] = waiting[-1].msg.offset() + 1
                waiting.clear()
                self.blocked_since.pop(p, None)
                return None
            if not second or (first and first[0].timestamp <= second[0].timestamp):
                record = first.popleft()
            else:
                record = second.popleft()
            msg = record.msg
            positions[(msg.topic(), p)] = msg.offset() + 1
            ready.append(record)
        return None

    def backpressure(self) -> None:
        """After draining: a topic-partition with MAX_BUFFERED records still waiting is
        paused, so that waiting records cannot grow without bound, and resumed once it is
        down to half of that. Decided after the drain, not while buffering a batch:
        pausing drops what the consumer has fetched ahead, and a large batch of one topic
        usually drains at once."""
        for p, topics in self.buffers.items():
            for topic, waiting in topics.items():
                if (topic, p) in self.throttled:
                    if len(waiting) < MAX_BUFFERED // 2:
                        self.consumer.resume([TopicPartition(topic, p)])
                        self.throttled.discard((topic, p))
                elif len(waiting) >= MAX_BUFFERED:
                    self.consumer.pause([TopicPartition(topic, p)])
                    self.throttled.add((topic, p))

    def positions(self, topics: list[str], p: int) -> dict[str, int]:
        """Next offset to be delivered per topic of partition p. A partition that has
        delivered nothing since it was assigned has no position yet: the committed
        offset (where its consumption resumed) stands in for it."""
        tps = [TopicPartition(t, p) for t in topics]
        positions = {tp.topic: tp.offset for tp in self.consumer.position(tps)}
        unknown = [TopicPartition(t, p) for t, o in positions.items() if o < 0]
        if unknown:
            for tp in self.consumer.committed(unknown, timeout=5.0):
                if tp.error is not None:  # not "offset 0": the broker could not say
                    raise KafkaException(tp.error)
                positions[tp.topic] = max(tp.offset, 0)
        return positions

    def caught_up(self, keys: set[tuple[str, int]]) -> dict[tuple[str, int], bool | None]:
        """Has each (topic, partition) delivered everything committed so far? None when the
        broker cannot tell. A fresh look (one request for all of them), not the cached high
        watermark: that can predate records already published, which would let a later
        event overtake them. Read-committed, so the bound is the last stable offset."""
        tps = [TopicPartition(t, p) for t, p in sorted(keys)]
        try:
            futures = self.admin.list_offsets(
                {tp: OffsetSpec.latest() for tp in tps},
                isolation_level=IsolationLevel.READ_COMMITTED,
                request_timeout=5.0,
            )
            ends = {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
            # a time-out under load means "cannot say", never a stopped worker
            return {(t, p): self.positions([t], p)[t] >= ends[(t, p)] for t, p in keys}
        except KafkaException:
            return dict.fromkeys(keys)
