"""The loop of a processor whose records become asyncio tasks (gateway calls).

The payments processor and the lanes start a task per record and let many run at once;
the tasks finish out of order, so offsets are committed through an ``OffsetTracker`` (a
partition up to its first unfinished record). ``TaskLoop`` is that loop, once, on a
``streams.runtime.loop.StreamLoop``: poll a batch (the lag refreshed on the way), hand it
to the processor, let the processor do its periodic work,
serve the producer's delivery callbacks, commit now and then, stop on a failed delivery
or task; on stop, the tasks in flight finish, their outputs are flushed and the last
commit made; then the consumer and the processor's other resources are closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from streams.runtime.loop import Rebalance, StreamLoop
from streams.runtime.offsets import OffsetTracker


class TaskLoop:
    def __init__(
        self,
        stream: StreamLoop,
        *,
        batch: int,
        commit_every_s: float,
        idle_s: float,
        max_tasks: int | None = None,
        task_kind: str = "task",
    ) -> None:
        """stream: the processor's clients; batch: records consumed at most per turn;
        commit_every_s: how often the finished offsets are committed; idle_s: the pause
        of a turn that had nothing to do; max_tasks: no more records are consumed while
        this many tasks are in flight; task_kind: names a failed task in the error that
        stops the loop."""
        self.stream = stream
        self.batch = batch
        self.commit_every_s = commit_every_s
        self.idle_s = idle_s
        self.max_tasks = max_tasks
        self.task_kind = task_kind
        self.offsets = OffsetTracker()
        self.tasks: set[asyncio.Task[None]] = set()
        self.error: str | None = None  # a failed task: the loop stops

    def subscribe(
        self, topics: list[str], on_assign: Rebalance | None = None,
        on_revoke: Rebalance | None = None,
    ) -> None:  # fmt: skip
        """On revocation (the partitions resumed first, by ``StreamLoop``) the finished
        offsets are committed and the revoked ones forgotten, before `on_revoke`."""

        def revoked(consumer: Any, partitions: list[Any]) -> None:
            self.commit()
            for tp in partitions:
                self.offsets.forget((tp.topic, tp.partition))
            if on_revoke is not None:
                on_revoke(consumer, partitions)

        self.stream.subscribe(topics, on_assign=on_assign, on_revoke=revoked)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.error = f"{self.task_kind} task failed: {task.exception()!r}"

    def commit(self) -> None:
        self.offsets.commit(self.stream.consumer, self.stream.name)

    async def run(
        self,
        on_records: Callable[[list[Any]], None],
        every_turn: Callable[[], int] | None = None,
        on_stop: Callable[[], None] | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Until stopped. on_records: a consumed batch; every_turn: the processor's own
        work between batches, returning how much it did (0: the turn may idle); on_stop:
        before the tasks in flight are awaited; close: the processor's resources (its
        gateway), after the consumer."""
        stream, producer = self.stream, self.stream.producer
        last_commit = 0.0
        try:
            while not stream.stop:
                busy = self.max_tasks is not None and len(self.tasks) >= self.max_tasks
                msgs = [] if busy else stream.poll(self.batch, 0)
                if msgs:
                    on_records(msgs)
                did = every_turn() if every_turn is not None else 0
                producer.poll(0)
                now = time.monotonic()
                if now - last_commit > self.commit_every_s:
                    self.commit()
                    last_commit = now
                if self.error or self.offsets.error:
                    raise RuntimeError(self.error or self.offsets.error)
                await asyncio.sleep(0 if msgs or did else self.idle_s)
            if on_stop is not None:
                on_stop()
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=30)
            producer.flush(30)
            self.commit()
        finally:
            stream.close()
            if close is not None:
                await close()
