"""The core every processor runs on: its consumer and producer, consumer lag, the stop flag.

``StreamLoop`` is built from the clients (``StreamLoop.from_settings`` builds them for the
CLI) and gives a processor what every consume loop needs, written once:

- ``subscribe``: a revoked partition is resumed before the processor's own hook runs. The
  consumer keeps a partition paused through its revocation and a later reassignment,
  while whatever the processor paused it for (backpressure, a bill run, held retries, a
  warehouse outage) goes with the revocation: left paused, it would never be fetched again.
- ``poll``: a batch of records (Kafka-level errors raised, not returned); consumer lag is
  refreshed every few seconds on the way (right after an assignment, at once).
- ``processed``: the batch metrics, per processed batch (its time, its records per topic).
  Counted once the batch is done, not at the poll: an aborted batch is read again and
  counted then, and the time is that of processing, not of waiting for records.
- ``close``: leaves the group at once (no wait for the session time-out).

``published_ms``: when a consumed record was published (its Kafka timestamp).

Exactly-once output (a Kafka transaction per batch) is ``streams.runtime.transaction``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from streams.config import Settings
from streams.metrics import BATCH_SECONDS, RECORDS, LagTracker
from streams.runtime.process import StopFlag, poll_batch

Rebalance = Callable[[Any, list[Any]], None]  # (consumer, topic-partitions)


def published_ms(msg: Any) -> int | None:
    """A consumed record's Kafka timestamp (epoch ms), None if it has none."""
    kind, ms = msg.timestamp()
    return ms if kind else None


class StreamLoop:
    def __init__(
        self, name: str, consumer: Any, producer: Any = None, stop: StopFlag | None = None
    ) -> None:
        self.name = name  # the processor's: metric labels
        self.consumer = consumer
        self.producer = producer
        self.lag = LagTracker(consumer, name)
        self.stop = stop if stop is not None else StopFlag()
        self.batch_seconds = BATCH_SECONDS.labels(name)

    @classmethod
    def from_settings(
        cls,
        name: str,
        settings: Settings,
        bootstrap: str,
        group: str,
        consumer_config: dict[str, Any] | None = None,
        producer_config: dict[str, Any] | None = None,
    ) -> StreamLoop:
        """A loop with the shared client settings (``streams.kafka.clients``), the given
        overrides on top; ``group`` is the unnamespaced group id."""
        from streams.kafka import clients
        from streams.kafka.topics import group_id

        consumer = clients.consumer(settings, bootstrap, group_id(group), **(consumer_config or {}))
        producer = clients.producer(settings, bootstrap, **(producer_config or {}))
        return cls(name, consumer, producer)

    def subscribe(
        self,
        topics: list[str],
        on_assign: Rebalance | None = None,
        on_revoke: Rebalance | None = None,
    ) -> None:
        def assigned(consumer: Any, partitions: list[Any]) -> None:
            self.lag.assigned()  # their lag within a fetch or two: the lag alert reads it
            if on_assign is not None:
                on_assign(consumer, partitions)  # else the client assigns them as they are

        def revoked(consumer: Any, partitions: list[Any]) -> None:
            consumer.resume(partitions)
            if on_revoke is not None:
                on_revoke(consumer, partitions)

        self.consumer.subscribe(topics, on_assign=assigned, on_revoke=revoked)

    def poll(self, max_messages: int, timeout: float) -> list[Any]:
        self.lag.maybe_update()
        return poll_batch(self.consumer, max_messages, timeout)

    def processed(self, msgs: list[Any], started: float) -> None:
        """A batch is done: its processing time (since ``started``, a perf_counter) and
        its records per topic."""
        self.batch_seconds.observe(time.perf_counter() - started)
        for topic, n in Counter(m.topic() for m in msgs).items():
            RECORDS.labels(self.name, topic).inc(n)

    def close(self) -> None:
        self.consumer.close()
