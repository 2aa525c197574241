"""runtime.jobs alone: a job pauses its control partition, runs only once its barrier is
applied, keeps its record uncommitted until its last chunk, then resumes the partition after
its record; a revoked partition forgets it. The consumer and the alignment are stand-ins
recording what is asked of them (their real behaviour is tested in test_loop and
test_alignment, and bill runs end to end in the rating tests)."""

from __future__ import annotations

from datetime import UTC, datetime

from confluent_kafka import KafkaException

from streams.runtime.jobs import Job, Jobs

CONTROL = "control"


class Consumer:
    def __init__(self) -> None:
        self.paused: set[tuple[str, int]] = set()
        self.seeks: list[tuple[str, int, int]] = []

    def pause(self, tps) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def seek(self, tp) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


class Alignment:
    def __init__(self) -> None:
        self.at: dict[str, int] = {"usage": 0}
        self.holding = False
        self.broken = False

    def positions(self, topics: list[str], p: int) -> dict[str, int]:
        if self.broken:
            raise KafkaException("no answer")
        return {t: self.at[t] for t in topics}

    def holds_before(self, p: int, barrier: dict[str, int]) -> bool:
        return self.holding


def job(offset: int = 7, barrier: dict[str, int] | None = None) -> Job:
    until = datetime(2026, 1, 1, tzinfo=UTC)
    return Job(offset, "run-1", until, None, barrier if barrier is not None else {"usage": 10})


def test_a_job_waits_for_its_barrier_and_commits_its_record_only_when_done() -> None:
    consumer, alignment = Consumer(), Alignment()
    jobs = Jobs(consumer, CONTROL, alignment)  # type: ignore[arg-type]
    jobs.start(3, job())
    assert consumer.paused == {(CONTROL, 3)}
    chunks: list[bytes] = []

    def chunk(p: int, j: Job) -> tuple[bytes, bool]:
        chunks.append(j.cursor)
        return j.cursor + b"x", len(chunks) == 2

    assert jobs.step({3}, chunk) == set() and not jobs.busy()  # barrier not fetched
    alignment.at["usage"] = 10
    alignment.holding = True  # fetched, but still buffered
    assert jobs.step({3}, chunk) == set()
    alignment.broken, alignment.holding = True, False  # the broker cannot say
    assert jobs.step({3}, chunk) == set()
    alignment.broken = False
    assert jobs.step({2}, chunk) == set()  # not owned (a revocation under way)

    assert jobs.step({3}, chunk) == {3} and jobs.busy()
    positions: dict = {}
    jobs.commit_positions(positions, {3})
    assert positions == {(CONTROL, 3): 7}  # not done: its record stays uncommitted
    jobs.finish()
    assert consumer.paused == {(CONTROL, 3)} and consumer.seeks == []

    assert jobs.step({3}, chunk) == {3}
    assert chunks == [b"", b"x"]  # the second chunk resumed after the first's cursor
    jobs.commit_positions(positions, {3})
    assert positions == {(CONTROL, 3): 8}  # done: committed with its last chunk
    jobs.finish()
    assert jobs.running == {} and consumer.paused == set()
    assert consumer.seeks == [(CONTROL, 3, 8)]


def test_a_revoked_partition_forgets_its_job() -> None:
    consumer = Consumer()
    jobs = Jobs(consumer, CONTROL, Alignment())  # type: ignore[arg-type]
    jobs.start(1, job(barrier={}))
    jobs.drop(1)
    assert jobs.step({1}, lambda p, j: (b"", True)) == set() and jobs.running == {}
    positions: dict = {}
    jobs.commit_positions(positions, {1})
    assert positions == {}
