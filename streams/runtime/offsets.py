"""Offsets of records whose work finishes out of order (asyncio tasks, gateway calls).

A processor that starts many records at once and finishes them in any order may commit a
partition only up to its first unfinished record: after a crash the rest is processed
again, which its idempotency keys make harmless.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from streams.metrics import COMMIT_FAILURES

log = structlog.get_logger(__name__)
TP = tuple[str, int]


class OffsetTracker:
    """Per partition: the records started, in offset order, and which are finished; the
    commit position is the first unfinished one."""

    def __init__(self) -> None:
        self.error: str | None = None  # a failed delivery: the processor must stop
        self.started: dict[TP, deque[int]] = {}
        self.finished: dict[TP, set[int]] = {}
        self.position: dict[TP, int] = {}
        self.dirty: set[TP] = set()

    def start(self, tp: TP, offset: int) -> None:
        self.started.setdefault(tp, deque()).append(offset)
        self.finished.setdefault(tp, set())

    def finish(self, tp: TP, offset: int) -> None:
        started, finished = self.started.get(tp), self.finished.get(tp)
        if started is None or finished is None:
            return  # the partition was revoked meanwhile: its new owner redoes the record
        finished.add(offset)
        last = None
        while started and started[0] in finished:
            last = started.popleft()
            finished.discard(last)
        if last is not None:
            self.position[tp] = started[0] if started else last + 1
            self.dirty.add(tp)

    def forget(self, tp: TP) -> None:
        self.started.pop(tp, None)
        self.finished.pop(tp, None)
        self.position.pop(tp, None)
        self.dirty.discard(tp)

    def commits(self) -> list[TopicPartition]:
        out = [TopicPartition(t, p, self.position[(t, p)]) for t, p in self.dirty]
        self.dirty.clear()
        return out

    def commit(self, consumer: Consumer, processor: str) -> None:
        """Commit the finished positions. A commit refused because the group moved on (a
        rebalance, or its coordinator lost with a broker) is not fatal: the positions are
        committed again next time, and a partition that changed hands is re-read by its
        new owner, where the idempotency keys make the repeat harmless."""
        offsets = self.commits()
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].fatal():
                raise
            self.dirty.update((tp.topic, tp.partition) for tp in offsets
                              if (tp.topic, tp.partition) in self.position)  # fmt: skip
            COMMIT_FAILURES.labels(processor).inc()
            log.warning("offset commit refused; committed again later", error=str(exc))

    def finisher(self, tp: TP, offset: int, outputs: int) -> Callable[[Any, Any], None]:
        """A delivery callback: the source record is finished once all its `outputs` are
        acknowledged by Kafka."""
        left = [outputs]

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                self.error = f"delivery failed: {err}"
                return
            left[0] -= 1
            if left[0] == 0:
                self.finish(tp, offset)

        return delivered
