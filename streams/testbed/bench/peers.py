"""`streambill bench peers`: one job run by streambill's rating, by faust-streaming and by
Quix Streams, alternated on the same broker, with raw Kafka as the ceiling.

The job: N pre-encoded usage events (the project's Avro, on `billing.usage` with the
project's partitions) added up per subscription and metric, state in a changelogged
store, exactly once. streambill's side is what `bench usage` runs (the rating processor,
its subscriptions created first, not timed); each peer is a small program
(peer_faust.py, peer_quix.py) run by the python of its own venv (peer_venvs.py).
streambill runs `--workers` rating processes, each peer `--peer-workers` processes (one by
default: faust-streaming's exactly-once crashed when a second worker joined), in one
consumer group each, on a fresh namespace (topics and groups) of the same broker. A
contender's clock runs from the first usage record produced until its group's committed
offsets cover them all (the same as `bench usage`). Its CPU seconds are the user + system
time of its processes (all their threads), read from /proc/<pid>/stat, from the clock's
start to 1 s after it stopped (what a commit leaves to do, as writing RocksDB, counted)
less their idle rate, measured over 1 s before the clock started, over that last second.
Then every contender's totals are checked against the reference added up from the input
itself: a mismatch fails the run.

A round runs each contender once, raw Kafka (`bench kafka`'s code, on the same bytes)
included, in an order rotated from round to round; `--rounds` of them are folded by the
harness (medians). The ratios: streambill's events per CPU-second over each peer's
(`ratio_vs_faust`, `ratio_vs_quix`, the median of the rounds' ratios) and streambill's
events/s over raw Kafka's msgs/s (`ratio_vs_kafka`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console

from streams.codec import codec
from streams.config import SCHEMAS_DIR, Settings
from streams.kafka import clients
from streams.kafka.topics import (
    ALL_TOPICS,
    RATING_CHANGELOG,
    SUBSCRIPTIONS,
    USAGE,
    group_id,
    namespace,
)
from streams.processors.rating import GROUP
from streams.stack import ProcessExited, ProcessorProcess
from streams.testbed.bench import kafka as raw_kafka
from streams.testbed.bench.harness import (
    CommittedLag,
    Env,
    bench_env,
    committed_lag,
    peak_rss_mb,
    produce_encoded,
    start_rating,
    wait,
    wait_for_members,
)
from streams.testbed.bench.inputs import encoded_subscriptions, encoded_usage, monthly_plans
from streams.testbed.bench.peer_common import total_key
from streams.testbed.bench.peer_venvs import (
    FAUST,
    PEERS,
    QUIX,
    Peer,
    ensure_venv,
    peer_script,
    venv_python,
)
from streams.ui import progress_bar

Totals = dict[str, Decimal]  # total_key (subscription|metric) -> the sum of quantities

CONTENDERS = ("streambill", FAUST.name, QUIX.name, "kafka")
PER_SUBSCRIPTION = 10  # usage events per subscription, as `bench usage`
COMMIT_INTERVAL_S = 1.0  # the peers' (streambill commits a transaction per poll)
STALL_S = 180.0  # no progress for this long: the contender is stuck
IDLE_S = 1.0  # a contender's idle CPU rate is measured over this long before its clock
SETTLE_S = 1.0  # its CPU is read this long after its last commit (work left after it)
WARM_UP_MESSAGES = 100_000  # raw produce + consume before the first round (not reported)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class TotalsMismatch(RuntimeError):
    """A contender's totals are not the reference's."""


# --- the pure parts: the reference, the check, the figures ---------------------------


def reference_totals(items: Iterable[tuple[bytes, bytes]]) -> Totals:
    """The totals every contender must end with, added up from the encoded input."""
    decode = codec(USAGE.schema).decode
    totals: Totals = {}
    for _key, value in items:
        event = decode(value)
        key = total_key(event)
        totals[key] = totals.get(key, Decimal(0)) + event["quantity"]
    return totals


def check_totals(who: str, reference: Totals, got: Totals) -> None:
    """TotalsMismatch unless `got` has every key of the reference, with the same value
    (numerically: 10 and 10.000 are equal), and no other key."""
    missing = sorted(reference.keys() - got.keys())
    unexpected = sorted(got.keys() - reference.keys())
    wrong = sorted(k for k in reference.keys() & got.keys() if got[k] != reference[k])
    if missing or unexpected or wrong:
        examples = [f"{k}: {got[k]} != {reference[k]}" for k in wrong[:3]]
        examples += [f"{k} missing" for k in missing[:3]]
        examples += [f"{k} unexpected" for k in unexpected[:3]]
        raise TotalsMismatch(
            f"{who}: totals differ from the reference ({len(reference)} keys): "
            f"{len(wrong)} wrong, {len(missing)} missing, {len(unexpected)} unexpected; "
            + "; ".join(examples)
        )


def merge_worker_totals(who: str, per_worker: list[dict[str, str]]) -> Totals:
    """The totals of a contender's processes in one. A key two of them hold with two
    values (a partition that moved mid-run, its state restored elsewhere) is a mismatch."""
    merged: Totals = {}
    for totals in per_worker:
        for key, text in totals.items():
            value = Decimal(text)
            if key in merged and merged[key] != value:
                raise TotalsMismatch(f"{who}: two workers hold {key} ({merged[key]}, {value})")
            merged[key] = value
    return merged


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator > 0 else 0.0


def contender_figures(events: int, seconds: float, cpu_s: float) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds) if seconds > 0 else 0,
        "cpu_s": round(cpu_s, 3),
        "cpu_s_per_m_events": round(cpu_s * 1_000_000 / events, 2),
        "events_per_cpu_s": round(events / cpu_s) if cpu_s > 0 else 0,
    }


def round_metrics(
    events: int, workers: int, peer_workers: int, results: dict[str, dict[str, Any]]
) -> dict:
    """One round's figures: the contract's (``<contender>_events_per_s``,
    ``kafka_msgs_per_s``, the ratios) first, then each contender's own. Ratios are taken
    from CPU seconds and seconds, not from the rounded rates."""
    sb, faust, quix, kafka = (results[c] for c in CONTENDERS)
    return {
        "events": events,
        "workers": workers,
        "peer_workers": peer_workers,
        "streambill_events_per_s": sb["events_per_s"],
        "faust_events_per_s": faust["events_per_s"],
        "quix_events_per_s": quix["events_per_s"],
        "kafka_msgs_per_s": kafka["msgs_per_s"],
        "streambill_cpu_s_per_m_events": sb["cpu_s_per_m_events"],
        "faust_cpu_s_per_m_events": faust["cpu_s_per_m_events"],
        "quix_cpu_s_per_m_events": quix["cpu_s_per_m_events"],
        # streambill's events per CPU-second over the peer's (same events: CPU over CPU)
        "ratio_vs_faust": _ratio(faust["cpu_s"], sb["cpu_s"]),
        "ratio_vs_quix": _ratio(quix["cpu_s"], sb["cpu_s"]),
        # streambill's events/s over raw Kafka's msgs/s (same records)
        "ratio_vs_kafka": _ratio(events / sb["seconds"], kafka["messages"] / kafka["seconds"]),
        "totals_match": True,  # a mismatch fails the run before any figure is kept
        "streambill": sb,
        "faust": faust,
        "quix": quix,
        "kafka": kafka,
    }


def rotated(names: tuple[str, ...], round_index: int) -> list[str]:
    k = round_index % len(names)
    return [*names[k:], *names[:k]]


# --- measuring a process ---------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system time of the process (all its threads) and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # fields[0] is stat's field 3 (state): utime, stime, cutime, cstime are fields 14-17
    return sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


def timed_usage(
    env: Env,
    group: str,
    items: list[tuple[bytes, bytes]],
    procs: list[ProcessorProcess],
    progress: Any,
    label: str,
) -> tuple[float, float, float]:
    """Produce the usage, then wait until `group`'s committed offsets cover it. Returns
    the seconds from the first record produced; the CPU seconds `procs` spent from then
    until SETTLE_S after (what a commit leaves to do, as writing RocksDB, included), less
    their idle rate over those SETTLE_S; and that idle rate (CPU-s per s, measured over
    IDLE_S before the clock starts)."""
    pids = [p.proc.pid for p in procs if p.proc]

    def cpu() -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    task = progress.add_task(f"{label}: usage", total=len(items))
    idle_from, idle_cpu = time.perf_counter(), cpu()
    time.sleep(IDLE_S)
    cpu_before = cpu()
    started = time.perf_counter()
    idle_rate = (cpu_before - idle_cpu) / (started - idle_from)
    produce_encoded(env, USAGE, items, lambda n: None)
    lag = CommittedLag(env, group, [USAGE.name])
    try:
        last, moved = -1, time.monotonic()
        while (left := lag()) > 0:
            progress.update(task, completed=len(items) - left)
            for p in procs:
                if not p.alive:
                    raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
            if left != last:
                last, moved = left, time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise TimeoutError(f"{label}: {left} records uncommitted for {STALL_S:.0f} s")
            time.sleep(0.1)
        seconds = time.perf_counter() - started
    finally:
        lag.close()
    progress.update(task, completed=len(items))
    done = time.perf_counter()
    time.sleep(SETTLE_S)
    settled = time.perf_counter()
    spent = cpu() - cpu_before - idle_rate * (settled - done)
    return seconds, spent, idle_rate


# --- streambill ----------------------------------------------------------------------


def changelog_totals(env: Env) -> Totals:
    """The usage sums of the rating state committed on its changelog (the latest record
    of each subscription), per subscription and metric."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    from streams.domain.rating import SubscriptionState

    consumer = clients.consumer(env.settings, env.bootstrap, group_id("bench-peers-check"),
                                **{"enable.partition.eof": True})  # fmt: skip
    partitions = range(env.settings.partitions)
    consumer.assign([TopicPartition(RATING_CHANGELOG.name, p, OFFSET_BEGINNING)
                     for p in partitions])  # fmt: skip
    latest: dict[bytes, bytes | None] = {}
    at_end: set[int] = set()
    deadline = time.monotonic() + 300
    try:
        while len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                raise TimeoutError("reading the rating changelog took too long")
            for msg in consumer.consume(10_000, timeout=1.0):
                error = msg.error()
                if error is None:
                    latest[msg.key()] = msg.value()
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                else:
                    raise RuntimeError(f"reading the rating changelog: {error}")
    finally:
        consumer.close()
    totals: Totals = {}
    for value in latest.values():
        if value is None:
            continue
        state = SubscriptionState.from_bytes(value)
        for metric, aggregates in state.usage.items():
            if "sum" in aggregates:
                key = total_key({"subscription_id": state.subscription_id, "metric": metric})
                totals[key] = aggregates["sum"]
    return totals


def run_streambill(
    base: Settings,
    subscriptions: list[tuple[bytes, bytes]],
    usage: list[tuple[bytes, bytes]],
    reference: Totals,
    workers: int,
    console: Console,
) -> dict[str, Any]:
    with bench_env(base, base.partitions) as env:
        rating = start_rating(env, workers)
        group = group_id(GROUP)
        try:
            with progress_bar(console) as progress:
                task = progress.add_task("streambill: subscriptions (not timed)",
                                         total=len(subscriptions))  # fmt: skip
                produce_encoded(env, SUBSCRIPTIONS, subscriptions,
                                lambda n: progress.advance(task, n))  # fmt: skip
                wait_for_members(env, group, workers, rating)
                wait(lambda: committed_lag(env, group, [SUBSCRIPTIONS.name]) == 0, rating, 600,
                     "subscriptions")  # fmt: skip
                seconds, cpu, idle = timed_usage(env, group, usage, rating, progress,
                                                 "streambill")  # fmt: skip
            rss = max(peak_rss_mb(p.proc.pid) for p in rating if p.proc)
            totals = changelog_totals(env)
        finally:
            for p in rating:
                p.stop()
    check_totals("streambill", reference, totals)
    return {
        **contender_figures(len(usage), seconds, cpu),
        "idle_cpu_s_per_s": round(idle, 4),
        "peak_rss_mb": round(rss, 1),
    }


# --- a peer --------------------------------------------------------------------------


class PeerProcess(ProcessorProcess):
    """A peer program run by its venv's python (logs, stop and tail as a processor's)."""

    def __init__(self, env: Env, name: str, argv: list[str]) -> None:
        super().__init__(env.settings, env.bootstrap, name)
        self.peer_argv = argv

    @property
    def command(self) -> list[str]:
        return self.peer_argv


START_ATTEMPTS = 3


def start_peer_process(
    env: Env, name: str, argv: list[str], work: Path, console: Console
) -> ProcessorProcess:
    """The peer process, once it says it is ready. One that exits before (Quix Streams,
    now and then: the changelog topic it has just made not found yet) is started again:
    nothing is timed or processed yet."""
    for attempt in range(1, START_ATTEMPTS + 1):
        proc = PeerProcess(env, name, argv).start()
        try:
            wait(lambda: (work / "ready").exists(), [proc], 300, f"{name} to start")
            return proc
        except ProcessExited:
            if attempt == START_ATTEMPTS:
                raise
            last = (proc.tail(1) or "?").strip()
            console.print(f"[yellow]{name} exited while starting ({last}): again[/]")
    raise AssertionError("unreachable")


def delete_other_topics(env: Env) -> None:
    """The topics of this namespace that a peer made (changelogs, its own internals):
    the namespace's clean-up deletes only streambill's."""
    admin = clients.admin(env.settings, env.bootstrap)
    ns, declared = namespace(), {t.name for t in ALL_TOPICS}
    made = [t for t in admin.list_topics(timeout=30).topics if ns in t and t not in declared]
    for future in admin.delete_topics(made, operation_timeout=30).values() if made else ():
        future.result()


def run_peer(
    base: Settings,
    peer: Peer,
    usage: list[tuple[bytes, bytes]],
    reference: Totals,
    workers: int,
    console: Console,
) -> dict[str, Any]:
    header = codec(USAGE.schema).header.hex()
    with bench_env(base, base.partitions) as env:
        group = group_id(f"bench-peer-{peer.name}")
        dirs = [env.settings.home / f"peer-{peer.name}" / f"worker-{w}" for w in range(workers)]
        procs: list[ProcessorProcess] = []

        def ready() -> bool:
            # a process is ready once its rebalance is done, and no longer while another runs
            return all((d / "ready").exists() for d in dirs)

        try:
            for w, d in enumerate(dirs):
                d.mkdir(parents=True)
                argv = [
                    str(venv_python(base.home, peer)), str(peer_script(peer)),
                    "--bootstrap", env.bootstrap, "--topic", USAGE.name, "--group", group,
                    "--partitions", str(env.settings.partitions), "--worker", str(w),
                    "--state-dir", str(d / "state"),
                    "--schema", str(SCHEMAS_DIR / f"{USAGE.schema}.avsc"), "--header", header,
                    "--commit-interval", str(COMMIT_INTERVAL_S),
                    "--ready", str(d / "ready"), "--result", str(d / "result.json"),
                ]  # fmt: skip
                # one after the other: the first alone makes the peer's topics (two faust
                # workers racing to make its changelog saw it without partitions: the agent
                # crashed and its events were lost); a deployment makes them once too
                procs.append(start_peer_process(env, f"{peer.name}-{w}", argv, d, console))
            with progress_bar(console) as progress:
                wait_for_members(env, group, workers, procs, timeout=300)
                wait(ready, procs, 300, f"{peer.title}'s rebalance")
                seconds, cpu, idle = timed_usage(env, group, usage, procs, progress, peer.title)
            rss = max(peak_rss_mb(p.proc.pid) for p in procs if p.proc)
            # SIGTERM: each stops as it would in production and writes what it holds
            for p in procs:
                p.stop(timeout=120)
            results = []
            for p, d in zip(procs, dirs, strict=True):
                if not (d / "result.json").exists():
                    raise RuntimeError(f"{p.name} wrote no totals:\n{p.tail()}")
                results.append(json.loads((d / "result.json").read_text()))
        finally:
            for p in procs:
                p.stop()
            with suppress(Exception):  # best effort, as the namespace's own clean-up
                delete_other_topics(env)
    totals = merge_worker_totals(peer.title, [r["totals"] for r in results])
    check_totals(peer.title, reference, totals)
    return {
        "version": results[0]["version"],
        **contender_figures(len(usage), seconds, cpu),
        "idle_cpu_s_per_s": round(idle, 4),
        "cpu_s_process": round(sum(r["cpu_s_process"] for r in results), 3),
        "events_applied": sum(r["events"] for r in results),
        "peak_rss_mb": round(rss, 1),
    }


# --- the rounds ----------------------------------------------------------------------


class Rounds:
    """The peers' venvs and the input, made once; each call runs the next round."""

    def __init__(
        self, base: Settings, events: int, workers: int, peer_workers: int, console: Console
    ) -> None:
        self.base, self.console = base, console
        self.workers, self.peer_workers = workers, peer_workers
        self.venv_seconds = {p.name: ensure_venv(base.home, p, console) for p in PEERS}
        subscriptions = max(1, events // PER_SUBSCRIPTION)
        with console.status("encoding the input and adding up the reference (not timed)"):
            self.subscriptions = encoded_subscriptions(subscriptions, monthly_plans())
            self.usage = encoded_usage(subscriptions, PER_SUBSCRIPTION)
            self.reference = reference_totals(self.usage)
        self.done = 0
        self.runners: dict[str, Callable[[], dict[str, Any]]] = {
            "streambill": lambda: run_streambill(base, self.subscriptions, self.usage,
                                                 self.reference, workers, console),
            FAUST.name: lambda: run_peer(base, FAUST, self.usage, self.reference,
                                         peer_workers, console),
            QUIX.name: lambda: run_peer(base, QUIX, self.usage, self.reference,
                                        peer_workers, console),
            # bench kafka's code: its records are encoded_usage's, so the same bytes
            "kafka": lambda: raw_kafka.run(base, len(self.usage), console),
        }  # fmt: skip

    @property
    def versions(self) -> dict[str, str]:
        return {p.name: p.requirements[0] for p in PEERS}

    def __call__(self) -> dict[str, Any]:
        if self.done == 0:
            self.console.print("warming the broker up: raw produce + consume (not reported)")
            raw_kafka.run(self.base, min(WARM_UP_MESSAGES, len(self.usage)), self.console)
        order = rotated(CONTENDERS, self.done)
        results = {}
        for position, name in enumerate(order, 1):
            self.console.print(f"round {self.done + 1}: [bold]{name}[/] ({position}/{len(order)})")
            results[name] = {**self.runners[name](), "position": position}
        self.done += 1
        return round_metrics(len(self.usage), self.workers, self.peer_workers, results)
