"""Commands of a control topic run in chunks over many transactions (a bill run).

A job starts from its control record; its partition of the control topic is paused until
it is done (one job at a time per partition). It runs once every input record published
before it has been applied (its barrier: input topic -> offset), one chunk per
transaction, resuming after its cursor. Its control record is committed only with the
transaction of its last chunk, so a crash or a rebalance runs it again (idempotently: what
a chunk did is no longer to do); then the control partition resumes after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from confluent_kafka import KafkaException, TopicPartition

from streams.runtime.alignment import Alignment
from streams.runtime.transaction import Offsets

log = structlog.get_logger(__name__)


@dataclass
class Job:
    """A command in progress on one partition."""

    control_offset: int
    run_id: str
    until: datetime
    accounts: frozenset[str] | None
    barrier: dict[str, int]  # input topic -> offset this worker must have applied first
    cursor: bytes = b""  # where the next chunk resumes
    done: bool = False


class Jobs:
    def __init__(self, consumer: Any, control_topic: str, alignment: Alignment) -> None:
        self.consumer = consumer
        self.control_topic = control_topic
        self.alignment = alignment
        self.running: dict[int, Job] = {}  # partition -> its job
        self.stepped: set[int] = set()  # partitions whose job ran a chunk last turn

    def busy(self) -> bool:
        """A job ran a chunk last turn and is not done: the next turn need not wait."""
        return bool(self.stepped & set(self.running))

    def start(self, p: int, job: Job) -> None:
        self.running[p] = job
        self.consumer.pause([TopicPartition(self.control_topic, p)])
        log.info("job started on partition", run_id=job.run_id, partition=p,
                 until=job.until.isoformat(), barrier=job.barrier)  # fmt: skip

    def drop(self, p: int) -> None:
        """The partition was revoked: its new owner runs the job again from its record."""
        self.running.pop(p, None)

    def step(self, owned: set[int], chunk: Callable[[int, Job], tuple[bytes, bool]]) -> set[int]:
        """One chunk of every job whose barrier is reached: chunk(p, job) -> (cursor, done)."""
        self.stepped = set()
        for p, job in self.running.items():
            if p in owned and self._barrier_reached(p, job.barrier):
                job.cursor, job.done = chunk(p, job)
                self.stepped.add(p)
        return self.stepped

    def commit_positions(self, positions: Offsets, touched: set[int]) -> None:
        """A job's record stays uncommitted until it is done (a job started after an invalid
        record of the batch decides the partition's control offset)."""
        for p, job in self.running.items():
            if p in touched:
                positions[(self.control_topic, p)] = job.control_offset + job.done

    def finish(self) -> None:
        """After the commit: the done jobs' control partitions resume after their record."""
        for p, job in list(self.running.items()):
            if job.done:
                del self.running[p]
                control = TopicPartition(self.control_topic, p, job.control_offset + 1)
                self.consumer.seek(control)
                self.consumer.resume([control])
                log.info("job done on partition", run_id=job.run_id, partition=p)

    def _barrier_reached(self, p: int, barrier: dict[str, int]) -> bool:
        """Has partition p applied every input record published before the job?"""
        if not barrier:
            return True
        try:
            positions = self.alignment.positions(list(barrier), p)
        except KafkaException:
            return False
        if any(positions[t] < end for t, end in barrier.items()):
            log.debug("job waits for its barrier", partition=p, barrier=barrier,
                      positions=positions)  # fmt: skip
            return False
        # ... fetched, and applied: nothing before the barrier still waits in a buffer
        return not self.alignment.holds_before(p, barrier)
