"""Exactly-once output: a batch's records and the input offsets it consumed, in one Kafka
transaction, written once for every processor that transacts.

    with transactions.open() as offsets:
        ...produce, with on_delivery=transactions.on_delivery where a failure must count...
        offsets[(topic, partition)] = next offset to consume
    # committed here; on any exception (a delivery failure included) aborted and re-raised

At the end of the block the offsets go into the transaction with the consumer's group
metadata (so the broker refuses them from a member no longer in the group's generation:
a zombie cannot commit), the producer is flushed (every delivery report is in), a delivery
failure is raised, and the transaction commits. On any exception on the way, the body's
own included, it is aborted: nothing of it is visible to read_committed readers, and its
input offsets are not committed, so its records are read again by whoever consumes the
partitions next (after a restart, this worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from confluent_kafka import TopicPartition

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> next offset to consume


class Transactions:
    def __init__(self, producer: Any, consumer: Any) -> None:
        """``producer`` has a ``transactional.id``; its transactions are initialised here
        (which fences an earlier producer of the same id and aborts what it left open)."""
        self.producer = producer
        self.consumer = consumer
        self.delivery_error: Exception | None = None
        producer.init_transactions()

    def on_delivery(self, err: Any, _msg: Any) -> None:
        """A delivery report: a failure fails the open transaction."""
        if err is not None:
            self.delivery_error = RuntimeError(f"delivery failed: {err}")

    @contextmanager
    def open(self) -> Iterator[Offsets]:
        self.delivery_error = None  # the last transaction's flush had every report in
        offsets: Offsets = {}
        self.producer.begin_transaction()
        try:
            yield offsets
            if offsets:
                self.producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    self.consumer.consumer_group_metadata(),
                )
            self.producer.flush()
            if self.delivery_error is not None:
                raise self.delivery_error
            self.producer.commit_transaction()
        except BaseException:
            self.producer.abort_transaction()
            raise
