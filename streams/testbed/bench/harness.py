"""What every benchmark scenario shares: a fresh namespace on the broker, producing
pre-encoded records, waiting on consumer groups and processes, measuring them, and
folding several runs into one set of figures.

Each scenario (one module beside this one) runs in a fresh topic namespace and home
directory on the local broker (or the configured cluster), pre-encodes its input (Avro
encoding is not what is measured), and deletes its topics afterwards. ``--runs K``
repeats it and reports each correctness figure as its worst run and each performance
figure as the median, with every run's figures printed and kept under ``runs``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition

from streams.config import DEFAULT_CATALOG, Settings
from streams.kafka import clients
from streams.kafka.local import bootstrap_servers
from streams.kafka.topics import TopicSpec
from streams.stack import ProcessorProcess, isolated_namespace, wait_while_running


@dataclass
class Env:
    settings: Settings
    bootstrap: str


@contextmanager
def bench_env(base: Settings, partitions: int) -> Iterator[Env]:
    """A fresh namespace + home on the shared broker, torn down afterwards."""
    bootstrap = bootstrap_servers(base)
    with isolated_namespace(base.home / "bench", bootstrap, partitions, "bench") as settings:
        yield Env(settings, bootstrap)


def percentile(ordered: list[float], q: float) -> float:
    """The q-quantile (0..1) of an ascending list, nearest rank; 0 for none."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def produce_encoded(
    env: Env,
    topic: TopicSpec,
    items: list[tuple[bytes, bytes]],
    advance: Callable[[int], None],
    stamps_ms: list[int] | None = None,
) -> None:
    """Produce pre-encoded (key, value) pairs, each with its record timestamp from
    `stamps_ms` if given (when the event arrived: what the rating contract's version 2
    reads) or the producer's clock; waits for every acknowledgement."""
    producer = clients.producer(env.settings, env.bootstrap)
    errors: list[Any] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    for n, (key, value) in enumerate(items, 1):
        stamp = stamps_ms[n - 1] if stamps_ms is not None else 0
        while True:
            try:
                producer.produce(topic.name, key=key, value=value, on_delivery=delivered,
                                 timestamp=stamp)  # fmt: skip
                break
            except BufferError:
                producer.poll(0.05)
        if n % 50_000 == 0:
            producer.poll(0)
            advance(50_000)
    producer.flush()
    advance(len(items) % 50_000)
    if errors:
        raise RuntimeError(f"{len(errors)} records not delivered: {errors[0]}")


class CommittedLag:
    """Records of `topics` not yet committed by `group` (its transactions included), asked
    through one probe consumer and one admin client for the whole wait: two requests a
    look, so that looking every 0.1 s of a timed window costs the broker little."""

    def __init__(self, env: Env, group: str, topics: list[str]) -> None:
        self.probe = clients.consumer(env.settings, env.bootstrap, group)
        self.admin = clients.admin(env.settings, env.bootstrap)
        self.tps = [TopicPartition(t, p) for t in topics for p in range(env.settings.partitions)]

    def __call__(self) -> int:
        from confluent_kafka.admin import OffsetSpec

        committed = clients.retrying(lambda: self.probe.committed(self.tps, timeout=30))

        def ends() -> dict[tuple[str, int], int]:
            futures = self.admin.list_offsets(
                {tp: OffsetSpec.latest() for tp in self.tps}, request_timeout=30
            )
            return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

        high = clients.retrying(ends)
        return sum(high[(tp.topic, tp.partition)] - max(tp.offset, 0) for tp in committed)

    def close(self) -> None:
        self.probe.close()


def committed_lag(env: Env, group: str, topics: list[str]) -> int:
    """One look at CommittedLag, for waits outside a timed window."""
    lag = CommittedLag(env, group, topics)
    try:
        return lag()
    finally:
        lag.close()


def wait(
    check: Callable[[], bool], procs: list[ProcessorProcess], timeout: float, what: str
) -> None:
    wait_while_running(check, procs, timeout, what, every=0.5)


def wait_for_members(
    env: Env, group: str, members: int, procs: list[ProcessorProcess], timeout: float = 120
) -> None:
    """Until `members` consumers of the group each own partitions (rebalance done)."""
    from confluent_kafka import KafkaException

    from streams.kafka.lag import group_members

    admin = clients.admin(env.settings, env.bootstrap)

    def joined() -> bool:
        try:
            owners = group_members(admin, group)
        except KafkaException:
            return False
        return len(owners) == members and all(owners.values())

    wait(joined, procs, timeout, f"{members} members in {group}")


def start_rating(
    env: Env, workers: int, nice: int = 0, catalog: Path | None = None
) -> list[ProcessorProcess]:
    procs = []
    for w in range(workers):
        proc = ProcessorProcess(env.settings, env.bootstrap, "rating", "--catalog",
                                str(catalog or DEFAULT_CATALOG), "--clock", "event",
                                "--worker", str(w), nice=nice)  # fmt: skip
        proc.log_path = proc.log_path.with_name(f"rating-{w}.log")
        procs.append(proc.start())
    return procs


# counts of broken promises, at any depth of a bench's figures: the worst run is the
# largest (a median would hide one bad run among good ones)
WORST_IS_MAX = frozenset({
    "double_charges", "differences", "lost", "lost_kafka", "lost_warehouse", "duplicates",
    "duplicates_in_kafka", "doubled", "dead_letters", "errors_5xx", "timeouts",
    "connection_errors", "gave_up",
})  # fmt: skip


def aggregate_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' figures in one: a promise (a boolean) holds only if it held in every
    run, a count of broken promises (WORST_IS_MAX) is its largest, any other number is
    the median; nested figures likewise; anything else (text, lists) as in the first run."""
    return {
        key: _aggregate(key, [r[key] for r in runs if key in r])
        for key in dict.fromkeys(k for r in runs for k in r)
    }


def _aggregate(key: str, values: list[Any]) -> Any:
    if all(isinstance(v, bool) for v in values):
        return all(values)
    if all(isinstance(v, dict) for v in values):
        return aggregate_runs(values)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return max(values) if key in WORST_IS_MAX else statistics.median(values)
    return values[0]


def runs_table(scenario: str, runs: list[dict[str, Any]], aggregate: dict[str, Any]) -> Any:
    """Every run's figures and their aggregate, one row per figure (nested ones dotted)."""
    from rich.table import Table

    def flat(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in figures.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    if len(runs) == 1:
        table = Table("metric", "value", title=scenario)
        for key, value in flat(aggregate).items():
            table.add_row(key, str(value))
        return table
    table = Table("metric", *(f"run {i}" for i in range(1, len(runs) + 1)),
                  f"of {len(runs)} runs", title=scenario)  # fmt: skip
    per_run = [flat(r) for r in runs]
    for key, value in flat(aggregate).items():
        leaf = key.rsplit(".", 1)[-1]
        how = "worst" if isinstance(value, bool) or leaf in WORST_IS_MAX else "median"
        if not isinstance(value, int | float):
            how = "first"
        table.add_row(key, *(str(r.get(key, "-")) for r in per_run), f"{value} ({how})")
    return table
