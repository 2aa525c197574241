"""Benchmarks: commands that start what they need, print figures and write JSON.

Each scenario runs in a fresh topic namespace and home directory on the local broker
(or the configured cluster), pre-encodes its input (Avro encoding is not what is
measured), and deletes its topics afterwards. ``--runs K`` repeats it and reports each
correctness figure as its worst run and each performance figure as the median, with
every run's figures printed and kept under ``runs``.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from rich.console import Console

from streams.codec import codec
from streams.config import DEFAULT_CATALOG, Settings
from streams.kafka import clients
from streams.kafka.local import bootstrap_servers
from streams.kafka.topics import (
    SUBSCRIPTIONS,
    USAGE,
    TopicSpec,
    group_id,
)
from streams.stack import (
    ProcessorProcess,
    isolated_namespace,
    start_api,
    wait_for_warehouse_endpoint,
)
from streams.ui import progress_bar

CATALOG = DEFAULT_CATALOG
ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 2, 1, tzinfo=UTC)  # monthly plans anchored at ANCHOR
BULK_NICE = 10  # CPU priority of bulk processors next to the priority lane
BULK_SETTLE_S = 5.0  # refund-latency: the busy minute starts this long after the bulk runs


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
    env: Env, topic: TopicSpec, items: list[tuple[bytes, bytes]], advance: Callable[[int], None]
) -> None:
    """Produce pre-encoded (key, value) pairs; waits for every acknowledgement."""
    producer = clients.producer(env.settings, env.bootstrap)
    errors: list[Any] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    for n, (key, value) in enumerate(items, 1):
        while True:
            try:
                producer.produce(topic.name, key=key, value=value, on_delivery=delivered)
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
    look. (A fresh consumer per look, with one watermark request per partition, cost the
    broker and the bench a connection and a dozen round trips every 0.2 s of a timed
    window.)"""

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


# --- inputs -------------------------------------------------------------------------


def encoded_subscriptions(n: int, plans: list[str]) -> list[tuple[bytes, bytes]]:
    encode = codec(SUBSCRIPTIONS.schema).encode
    out = []
    for i in range(n):
        account = f"acct-{i:08d}"
        out.append((account.encode(), encode({
            "event_id": f"sub-{i:08d}-created", "type": "subscription.created",
            "timestamp": ANCHOR, "account_id": account, "subscription_id": f"sub-{i:08d}",
            "plan_id": plans[i % len(plans)], "mode": None, "payment_method": f"tok_{i}",
        })))  # fmt: skip
    return out


def encoded_usage(n_subs: int, per_sub: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    """per_sub usage events per subscription, spread over its first period."""
    encode = codec(USAGE.schema).encode
    span = int((PERIOD_END - ANCHOR).total_seconds())
    out = []
    for j in range(per_sub):
        for i in range(n_subs):
            account = f"acct-{i:08d}"
            out.append((account.encode(), encode({
                "event_id": f"u-{i:08d}-{start + j}", "account_id": account,
                "timestamp": ANCHOR + timedelta(seconds=(start + j) * 3_600 + i % 3_600),
                "subscription_id": f"sub-{i:08d}", "metric": "api_calls",
                "quantity": Decimal(1 + (i * 7 + j) % 500),
            })))  # fmt: skip
    assert all(j * 3_600 + 3_600 < span for j in range(start + per_sub))
    return out


def monthly_plans() -> list[str]:
    import json

    from streams.domain.catalog import Catalog

    catalog = Catalog.from_dict(json.loads(CATALOG.read_text()))
    return sorted(p for p, plan in catalog.plans.items() if plan.interval.value == "month")


# --- scenarios ------------------------------------------------------------------------


def bench_kafka(base: Settings, messages: int, console: Console) -> dict[str, Any]:
    """Raw produce, then consume, of usage-sized Avro records on the same broker."""
    with bench_env(base, base.partitions) as env:
        items = encoded_usage(max(1, messages // 10), 10)[:messages]
        size = sum(len(v) for _, v in items) / len(items)
        with progress_bar(console) as progress:
            task = progress.add_task("produce", total=len(items))
            started = time.perf_counter()
            produce_encoded(env, USAGE, items, lambda n: progress.advance(task, n))
            produced = time.perf_counter()
            task = progress.add_task("consume", total=len(items))
            consumer = clients.consumer(env.settings, env.bootstrap, group_id("bench-raw"))
            consumer.subscribe([USAGE.name])
            seen = 0
            while seen < len(items):
                batch = consumer.consume(5000, timeout=1.0)
                seen += sum(1 for m in batch if m.error() is None)
                progress.update(task, completed=seen)
            consumed = time.perf_counter()
            consumer.close()
        return {
            "messages": len(items),
            "value_bytes": round(size, 1),
            "produce_s": round(produced - started, 3),
            "consume_s": round(consumed - produced, 3),
            "seconds": round(consumed - started, 3),
            "msgs_per_s": round(len(items) / (consumed - started)),
            "produce_msgs_per_s": round(len(items) / (produced - started)),
            "consume_msgs_per_s": round(len(items) / (consumed - produced)),
        }


def _wait(
    check: Callable[[], bool], procs: list[ProcessorProcess], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if not p.alive:
                raise RuntimeError(f"{p.name} died:\n{p.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _wait_for_members(
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

    _wait(joined, procs, timeout, f"{members} members in {group}")


def _start_rating(env: Env, workers: int, nice: int = 0) -> list[ProcessorProcess]:
    procs = []
    for w in range(workers):
        proc = ProcessorProcess(env.settings, env.bootstrap, "rating", "--catalog", str(CATALOG),
                                "--clock", "event", "--worker", str(w), nice=nice)  # fmt: skip
        proc.log_path = proc.log_path.with_name(f"rating-{w}.log")
        procs.append(proc.start())
    return procs


def bench_usage(base: Settings, events: int, workers: int, console: Console) -> dict[str, Any]:
    """Usage ingested and aggregated by the rating processor (committed in its state)."""
    from streams.processors.rating import GROUP

    per_sub = 10
    subs = max(1, events // per_sub)
    with bench_env(base, base.partitions) as env:
        plans = monthly_plans()
        sub_items = encoded_subscriptions(subs, plans)
        usage_items = encoded_usage(subs, per_sub)
        rating = _start_rating(env, workers)
        group = group_id(GROUP)
        try:
            with progress_bar(console) as progress:
                task = progress.add_task("subscriptions (not timed)", total=subs)
                produce_encoded(env, SUBSCRIPTIONS, sub_items, lambda n: progress.advance(task, n))
                # every worker in the group first: one joining later would rebalance the
                # group (and restore state) inside the timed window
                _wait_for_members(env, group, workers, rating)
                _wait(lambda: committed_lag(env, group, [SUBSCRIPTIONS.name]) == 0, rating, 600,
                      "subscriptions")  # fmt: skip
                task = progress.add_task("usage ingested", total=len(usage_items))
                started = time.perf_counter()
                produce_encoded(env, USAGE, usage_items, lambda n: None)
                usage_lag = CommittedLag(env, group, [USAGE.name])
                try:
                    while (lag := usage_lag()) > 0:
                        progress.update(task, completed=len(usage_items) - lag)
                        for p in rating:
                            if not p.alive:
                                raise RuntimeError(f"rating died:\n{p.tail()}")
                        time.sleep(0.1)
                    seconds = time.perf_counter() - started
                finally:
                    usage_lag.close()
                progress.update(task, completed=len(usage_items))
            rss = max(peak_rss_mb(p.proc.pid) for p in rating if p.proc)
        finally:
            for p in rating:
                p.stop()
    return {
        "events": len(usage_items),
        "subscriptions": subs,
        "workers": workers,
        "seconds": round(seconds, 3),
        "events_per_s": round(len(usage_items) / seconds),
        "peak_rss_mb": round(rss, 1),
    }


def bench_billrun(
    base: Settings, subscriptions: int, workers: int, usage_per_sub: int, console: Console
) -> dict[str, Any]:
    """From the clock passing the period end to the last invoice landed in ClickHouse."""
    from streams.kafka.topics import INVOICES
    from streams.processors.rating import GROUP
    from streams.publish import issue_bill_run
    from streams.testbed.duplicates import topic_copies, warehouse_copies
    from streams.warehouse import query

    with bench_env(base, base.partitions) as env:
        plans = monthly_plans()
        sub_items = encoded_subscriptions(subscriptions, plans)
        usage_items = encoded_usage(subscriptions, usage_per_sub)
        sink = ProcessorProcess(env.settings, env.bootstrap, "sink").start()
        rating = _start_rating(env, workers)
        procs = [sink, *rating]
        group = group_id(GROUP)

        def landed(reason: str) -> int:
            # distinct ids, not FINAL: cheap enough to poll without slowing the sink
            sql = f"SELECT uniqExact(invoice_id) FROM invoices WHERE reason = '{reason}'"
            return int(query(env.settings, sql)["rows"][0][0])

        try:
            wait_for_warehouse_endpoint(env.settings, sink)
            with progress_bar(console) as progress:
                task = progress.add_task(
                    "inputs (not timed)", total=len(sub_items) + len(usage_items)
                )
                produce_encoded(env, SUBSCRIPTIONS, sub_items, lambda n: progress.advance(task, n))
                produce_encoded(env, USAGE, usage_items, lambda n: progress.advance(task, n))
                task = progress.add_task("rated + landed (not timed)", total=subscriptions)

                def ingested() -> bool:
                    done = landed("created")
                    progress.update(task, completed=done)
                    lag = committed_lag(env, group, [SUBSCRIPTIONS.name, USAGE.name])
                    return lag == 0 and done >= subscriptions

                _wait(ingested, procs, 3600, "ingestion")
                task = progress.add_task("bill run → ClickHouse", total=subscriptions)
                started = time.perf_counter()
                issue_bill_run(env.settings, env.bootstrap, PERIOD_END)

                def closed() -> bool:
                    done = landed("period_end")
                    progress.update(task, completed=done)
                    return done >= subscriptions

                _wait(closed, procs, 3600, "the bill run")
                seconds = time.perf_counter() - started
            dead_letters = int(
                query(env.settings, "SELECT count() FROM dead_letters")["rows"][0][0]
            )
            rss = max(peak_rss_mb(p.proc.pid) for p in rating if p.proc)
            sink_rss = peak_rss_mb(sink.proc.pid) if sink.proc else 0.0
            state_mb = (
                sum(
                    f.stat().st_size
                    for f in (env.settings.state_dir / "rating").rglob("*")
                    if f.is_file()
                )
                / 2**20
            )
            # after the peak RSS figures: the warehouse check runs its queries in the sink
            on_topic = topic_copies(env.settings, env.bootstrap, INVOICES, "invoice_id")
            landed_once = warehouse_copies(
                env.settings, "invoices", subscriptions, where="reason = 'period_end'"
            )
        finally:
            for p in procs:
                p.stop()
    return {
        "invoices": landed_once.final_rows,
        "seconds": round(seconds, 3),
        "invoices_per_s": round(landed_once.final_rows / seconds),
        # invoice records beyond one per id on billing.invoices (created ones included),
        # and period-end invoices landed with two different contents
        "duplicates": on_topic.extra_copies + landed_once.conflicting,
        "dead_letters": dead_letters,  # the input is all valid: must be 0
        "peak_rss_mb": round(rss, 1),
        "sink_peak_rss_mb": round(sink_rss, 1),
        "state_disk_mb": round(state_mb, 1),
        "workers": workers,
    }


def encoded_invoices(rows: int, lines_per_invoice: int) -> list[tuple[bytes, bytes]]:
    """Invoices of `lines_per_invoice` usage and flat lines, `rows` lines in all."""
    from streams.kafka.topics import INVOICES

    encode = codec(INVOICES.schema).encode
    out = []
    n_invoices = max(1, rows // lines_per_invoice)
    for i in range(n_invoices):
        account = f"acct-{i:08d}"
        lines = [{
            "charge_id": f"charge-{k}", "kind": "flat" if k == 0 else "usage",
            "period_start": ANCHOR, "period_end": PERIOD_END,
            "quantity": Decimal(1 + (i + k) % 997), "amount": Decimal(f"{(i * 31 + k) % 9999}.25"),
        } for k in range(lines_per_invoice)]  # fmt: skip
        out.append((account.encode(), encode({
            "invoice_id": f"inv-{uuid.UUID(int=i)}", "account_id": account,
            "subscription_id": f"sub-{i:08d}", "plan_id": "growth-eur", "currency": "EUR",
            "issued_at": PERIOD_END, "reason": "period_end", "lines": lines,
            "total": sum((ln["amount"] for ln in lines), Decimal(0)), "payment_method": f"tok_{i}",
        })))  # fmt: skip
    return out


def bench_sink(
    base: Settings, rows: int, lines_per_invoice: int, console: Console
) -> dict[str, Any]:
    """Invoice lines landed in the embedded warehouse by the sink catching up on a topic
    that already holds them: from the sink having opened the warehouse (it consumes right
    after) to the last row queryable."""
    from streams.kafka.topics import INVOICES
    from streams.warehouse import query

    with bench_env(base, base.partitions) as env:
        items = encoded_invoices(rows, lines_per_invoice)
        expected = len(items) * lines_per_invoice
        with progress_bar(console) as progress:
            task = progress.add_task("invoices produced (not timed)", total=len(items))
            produce_encoded(env, INVOICES, items, lambda n: progress.advance(task, n))
            del items
            sink = ProcessorProcess(env.settings, env.bootstrap, "sink").start()
            try:
                wait_for_warehouse_endpoint(env.settings, sink)
                started = time.perf_counter()
                task = progress.add_task("invoice lines landed", total=expected)

                def landed() -> bool:
                    sql = "SELECT count() FROM invoice_lines"
                    done = int(query(env.settings, sql)["rows"][0][0])
                    progress.update(task, completed=done)
                    return done >= expected

                _wait(landed, [sink], 3600, "the sink")
                seconds = time.perf_counter() - started
                counts = query(
                    env.settings,
                    "SELECT (SELECT count() FROM invoice_lines FINAL), "
                    "(SELECT count() FROM invoices FINAL)",
                )["rows"][0]
                rss = peak_rss_mb(sink.proc.pid) if sink.proc else 0.0
            finally:
                sink.stop()
    return {
        "rows": int(counts[0]),
        "invoices": int(counts[1]),
        "seconds": round(seconds, 3),
        "rows_per_s": round(int(counts[0]) / seconds),
        "invoices_per_s": round(int(counts[1]) / seconds),
        "peak_rss_mb": round(rss, 1),
    }


def encoded_due_invoices(
    n: int, issued_at: datetime, prefix: str = "", token: str = "tok_"
) -> list[tuple[bytes, bytes]]:
    """n invoices with an amount due and a card token on file (tokens decide declines)."""
    from streams.kafka.topics import INVOICES

    encode = codec(INVOICES.schema).encode
    out = []
    for i in range(n):
        account = f"{prefix}acct-{i:08d}"
        amount = Decimal(f"{10 + i % 490}.{i % 100:02d}")
        line = {"charge_id": "base", "kind": "flat", "period_start": issued_at,
                "period_end": issued_at + timedelta(days=30), "quantity": Decimal(1),
                "amount": amount}  # fmt: skip
        out.append((account.encode(), encode({
            "invoice_id": f"{prefix}inv-pay-{uuid.UUID(int=i)}", "account_id": account,
            "subscription_id": f"{prefix}sub-{i:08d}", "plan_id": "pro-usd", "currency": "USD",
            "issued_at": issued_at, "reason": "period_end", "lines": [line], "total": amount,
            "payment_method": f"{token}{i:08d}",
        })))  # fmt: skip
    return out


def bench_payment_run(
    base: Settings,
    payments: int,
    workers: int,
    decline_rate: float,
    transient_rate: float,
    console: Console,
) -> dict[str, Any]:
    """The payments processor against the simulator (4 merchant accounts): from the
    first due invoice published to the last first-attempt result in ClickHouse."""
    import asyncio
    import math

    from streams.domain.payments import parse_schedule
    from streams.kafka.topics import INVOICES
    from streams.payments.http_gateway import fetch_stats
    from streams.payments.reconcile import collect, reconcile
    from streams.payments.simulator import AccountConfig, SimulatorConfig, SimulatorProcess
    from streams.warehouse import query

    account = AccountConfig(decline_rate=decline_rate, transient_rate=transient_rate)
    config = SimulatorConfig(accounts={f"merchant-{n}": account for n in range(1, 5)}, seed=7)
    sigma = math.log(account.latency_p99_ms / account.latency_median_ms) / 2.3263479
    mean_latency_s = account.latency_median_ms * math.exp(sigma**2 / 2) / 1000
    ceiling_per_min = len(config.accounts) * account.max_concurrency / mean_latency_s * 60

    with bench_env(base, base.partitions) as env:
        items = encoded_due_invoices(payments, datetime.now(UTC))
        simulator = SimulatorProcess.start(config, env.settings.home / "logs")
        gateway_env = {
            "STREAMBILL_GATEWAY": "simulator",
            "STREAMBILL_GATEWAY_URL": simulator.url,
            "STREAMBILL_MERCHANT_ACCOUNTS": ",".join(config.accounts),
            "STREAMBILL_GATEWAY_MAX_CONCURRENCY": str(account.max_concurrency),
        }
        sink = ProcessorProcess(env.settings, env.bootstrap, "sink").start()
        payers = []
        for w in range(workers):
            payer = ProcessorProcess(env.settings, env.bootstrap, "payments", env=gateway_env)
            payer.log_path = payer.log_path.with_name(f"payments-{w}.log")
            payers.append(payer.start())
        procs = [sink, *payers]
        try:
            wait_for_warehouse_endpoint(env.settings, sink)
            with progress_bar(console) as progress:
                task = progress.add_task("payments → ClickHouse", total=len(items))
                started = time.perf_counter()
                produce_encoded(env, INVOICES, items, lambda n: None)

                def landed() -> bool:
                    sql = "SELECT uniqExact(invoice_id) FROM payment_attempts WHERE attempt = 1"
                    done = int(query(env.settings, sql)["rows"][0][0])
                    progress.update(task, completed=done)
                    return done >= len(items)

                _wait(landed, procs, 3600, "the payment run")
                seconds = time.perf_counter() - started
            time.sleep(1.0)  # anything landing twice would show now
            sources = collect(env.settings, env.bootstrap, simulator.url)
            ledger = sources.ledger
            simulator_stats = asyncio.run(fetch_stats(simulator.url))
            report = reconcile(*sources, schedule=parse_schedule(env.settings.dunning))
            statuses = query(env.settings, "SELECT status, count() FROM payment_attempts FINAL "
                             "WHERE attempt = 1 GROUP BY status")["rows"]  # fmt: skip
            rss = max(peak_rss_mb(p.proc.pid) for p in payers if p.proc)
        finally:
            for p in procs:
                p.stop()
            simulator.stop()
    per_min = payments / seconds * 60
    return {
        "payments": payments,
        "seconds": round(seconds, 3),
        "payments_per_min": round(per_min),
        "gateway_ceiling_per_min": round(ceiling_per_min),
        "ceiling_ratio": round(per_min / ceiling_per_min, 3),
        "double_charges": report.double_charges,
        "reconciled": report.reconciled,
        "differences": len(report.differences),
        "first_attempt_outcomes": {s: int(n) for s, n in statuses},
        "ledger_entries": len(ledger),
        "payments_peak_rss_mb": round(rss, 1),
        "workers": workers,
        # the gateway's side: 429s it answered (slots overrun), its own GC pauses
        "simulator": {
            "rejected_429": sum(a["rejected_429"] for a in simulator_stats["accounts"].values()),
            "max_in_flight_seen": max(
                a["max_in_flight_seen"] for a in simulator_stats["accounts"].values()
            ),
            "transient_injected": sum(
                a["transient_injected"] for a in simulator_stats["accounts"].values()
            ),
            "gc": simulator_stats["gc"],
        },
    }


class ArrivalClock:
    """Notes when each refund's result and entitlement reach Kafka (a consumer of both
    topics in its own thread, starting at their current end)."""

    def __init__(self, env: Env) -> None:
        import threading

        from streams.kafka.topics import ENTITLEMENTS, REFUND_RESULTS

        self.results: dict[str, float] = {}
        self.entitlements: dict[str, float] = {}
        self.completed: dict[str, float] = {}  # the lane's clock when the gateway answered
        self._stop = threading.Event()
        group = group_id(f"bench-clock-{uuid.uuid4().hex[:6]}")
        low_latency = {"fetch.wait.max.ms": 5, **clients.NO_DELAY}
        self._consumer = clients.consumer(env.settings, env.bootstrap, group, **low_latency)
        parts = []
        for topic in (REFUND_RESULTS.name, ENTITLEMENTS.name):
            for p in range(env.settings.partitions):
                tp = TopicPartition(topic, p)
                high = self._consumer.get_watermark_offsets(tp, timeout=10)[1]
                parts.append(TopicPartition(topic, p, high))
        self._consumer.assign(parts)
        self._result_schema, self._results_topic = REFUND_RESULTS.schema, REFUND_RESULTS.name
        self._entitlement_schema = ENTITLEMENTS.schema
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decode_result = codec(self._result_schema).decode
        decode_entitlement = codec(self._entitlement_schema).decode
        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, timeout=0.01):
                if msg.error():
                    continue
                now = time.time()
                if msg.topic() == self._results_topic:
                    result = decode_result(msg.value())
                    self.results.setdefault(result["refund_id"], now)
                    self.completed.setdefault(result["refund_id"],
                                              result["completed_at"].timestamp())  # fmt: skip
                else:
                    cause = decode_entitlement(msg.value())["cause"]
                    self.entitlements.setdefault(cause.removeprefix("refund:"), now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def _lane_stages(log_path: Path, tag: str) -> dict[str, dict[str, float]]:
    """The stages (ms) of each of the phase's refunds, from the lane's debug lines."""
    import json

    stages = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if '"refund stages"' not in line or f'"{tag}-' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        stages[entry["refund_id"]] = {
            k.removesuffix("_ms"): v for k, v in entry.items() if k.endswith("_ms")
        }
    return stages


def _refund_phase(
    upstream: tuple[Any, ArrivalClock],
    targets: list[tuple[str, str, Decimal]],
    seconds: float,
    every: float,
    tag: str,
    lane_log: Path,
) -> dict[str, Any]:
    """One refund request every `every` s for `seconds` s; latency from its produce to
    both its result and its entitlement on Kafka."""
    from streams.kafka.topics import REFUNDS

    producer, clock = upstream
    encode = codec(REFUNDS.schema).encode
    sent: dict[str, float] = {}
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds and n < len(targets):
        invoice_id, account, amount = targets[n]
        refund_id = f"{tag}-{n}"
        value = encode({"refund_id": refund_id, "invoice_id": invoice_id,
                        "account_id": account, "amount": amount, "currency": "USD",
                        "reason": "benchmark", "deactivate": True,
                        "requested_at": datetime.now(UTC)})  # fmt: skip
        sent[refund_id] = time.time()
        producer.produce(REFUNDS.name, key=account.encode(), value=value)
        producer.poll(0)
        n += 1
        time.sleep(max(0.0, start + n * every - time.monotonic()))
    producer.flush(30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        r in clock.results and r in clock.entitlements for r in sent
    ):
        time.sleep(0.1)
    done = [r for r in sent if r in clock.results and r in clock.entitlements]
    latencies = sorted(
        (max(clock.results[r], clock.entitlements[r]) - sent[r]) * 1000 for r in done
    )
    # where the time goes (same machine, one clock): request produced -> the lane has the
    # gateway's answer, and from there -> result and entitlement seen on Kafka
    in_lane = sorted((clock.completed[r] - sent[r]) * 1000 for r in done)
    out = sorted(
        (max(clock.results[r], clock.entitlements[r]) - clock.completed[r]) * 1000 for r in done
    )
    stages = _lane_stages(lane_log, tag)
    spans: dict[str, list[float]] = defaultdict(list)
    for one in stages.values():
        for stage, ms in one.items():
            spans[stage].append(ms)
    # the slowest refunds, when they were sent and where their time went
    total = {r: (max(clock.results[r], clock.entitlements[r]) - sent[r]) * 1000 for r in done}
    slowest = [{"sent_at_s": round(sent[r] - sent[f"{tag}-0"], 2), "ms": round(total[r], 1),
                **stages.get(r, {})}
               for r in sorted(done, key=total.get)[-12:]]  # fmt: skip
    return {"refunds": len(done), "sent": len(sent), "lost": len(sent) - len(done),
            "p50_ms": round(percentile(latencies, 0.5), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1),
            "max_ms": round(latencies[-1], 1),
            "to_gateway_answer_p99_ms": round(percentile(in_lane, 0.99), 1),
            "answer_to_kafka_p99_ms": round(percentile(out, 0.99), 1),
            "lane_stages": {f"{k}_p99_ms": round(percentile(sorted(v), 0.99), 1)
                            for k, v in spans.items()},
            "slowest": slowest}  # fmt: skip


def bench_refund_latency(
    base: Settings,
    seconds: float,
    payments: int,
    subscriptions: int,
    console: Console,
) -> dict[str, Any]:
    """Refund latency with the bulk load off, then during a payment run and a bill run."""
    import asyncio
    import math

    from streams.domain.money import round_money
    from streams.kafka.topics import INVOICES
    from streams.metrics import scrape
    from streams.payments.http_gateway import fetch_ledger, fetch_stats
    from streams.payments.simulator import AccountConfig, SimulatorConfig, SimulatorProcess
    from streams.processors.rating import GROUP
    from streams.publish import issue_bill_run
    from streams.warehouse import query

    account = AccountConfig(refund_latency_median_ms=100, refund_latency_p99_ms=300)
    config = SimulatorConfig(accounts={f"merchant-{n}": account for n in range(1, 5)}, seed=9)
    every = 0.05
    per_phase = int(seconds / every) + 1
    with bench_env(base, base.partitions) as env:
        simulator = SimulatorProcess.start(config, env.settings.home / "logs")
        gateway_env = {"STREAMBILL_GATEWAY": "simulator", "STREAMBILL_GATEWAY_URL": simulator.url,
                       "STREAMBILL_MERCHANT_ACCOUNTS": ",".join(config.accounts)}  # fmt: skip
        # bulk work runs at a lower CPU priority than the priority lane (and than the
        # simulator, which stands for a gateway on other machines): on 2 shared cores
        # that is what separate pods with their own CPU would give
        bulk = {"nice": BULK_NICE}
        sink = ProcessorProcess(env.settings, env.bootstrap, "sink", **bulk).start()
        payer = ProcessorProcess(env.settings, env.bootstrap, "payments", env=gateway_env,
                                 **bulk).start()  # fmt: skip
        # debug: the lane logs each refund's stages (_lane_stages)
        lane_env = {**gateway_env, "STREAMBILL_LOG_LEVEL": "DEBUG"}
        refunder = ProcessorProcess(env.settings, env.bootstrap, "lane", "priority", env=lane_env)
        procs = [sink, payer, refunder.start(), *_start_rating(env, 2, nice=BULK_NICE)]
        clock: ArrivalClock | None = None
        try:
            wait_for_warehouse_endpoint(env.settings, sink)
            now = datetime.now(UTC)
            refundable = encoded_due_invoices(2 * per_phase, now, prefix="r", token="tok_ok_")
            with progress_bar(console) as progress:
                task = progress.add_task("refundable invoices paid (not timed)",
                                         total=len(refundable))  # fmt: skip
                produce_encoded(env, INVOICES, refundable, lambda n: None)
                paid_sql = (
                    "SELECT count() FROM payment_attempts "
                    "WHERE status = 'succeeded' AND startsWith(invoice_id, 'rinv')"
                )

                def paid() -> bool:
                    done = int(query(env.settings, paid_sql)["rows"][0][0])
                    progress.update(task, completed=done)
                    return done >= len(refundable)

                _wait(paid, procs, 600, "refundable invoices paid")
            # every other refund takes half the invoice: sent twice, such a refund would be
            # accepted by the gateway again (a full one would be refused), so `doubled`
            # below can see a lane that repeats refunds
            targets, partial = [], set()
            for i in range(2 * per_phase):
                invoice_id = f"rinv-pay-{uuid.UUID(int=i)}"
                paid_total = Decimal(f"{10 + i % 490}.{i % 100:02d}")
                if i % 2 == 0:
                    partial.add(invoice_id)
                amount = round_money(paid_total / 2, "USD") if i % 2 == 0 else paid_total
                targets.append((invoice_id, f"racct-{i:08d}", amount))
            # one long-lived producer of requests (as the API's) and one clock for both
            # phases: a fresh idempotent producer's first records wait for its producer
            # id, which under load took up to a second, and that is not a refund's cost
            clock = ArrivalClock(env)
            requests = clients.producer(env.settings, env.bootstrap,
                                        **{"linger.ms": 0, **clients.NO_DELAY})  # fmt: skip
            upstream = (requests, clock)
            # bulk load off: nothing else in flight
            console.print(f"refunds, bulk load off: {seconds:.0f} s")
            quiet = _refund_phase(upstream, targets[:per_phase], seconds, every, "quiet",
                                  refunder.log_path)  # fmt: skip
            with progress_bar(console) as progress:
                bulk_subs = encoded_subscriptions(subscriptions, monthly_plans())
                task = progress.add_task("bill-run subscriptions rated (not timed)",
                                         total=len(bulk_subs))  # fmt: skip
                produce_encoded(env, SUBSCRIPTIONS, bulk_subs, lambda n: None)
                del bulk_subs
                group = group_id(GROUP)
                _wait(lambda: committed_lag(env, group, [SUBSCRIPTIONS.name]) == 0, procs, 3600,
                      "subscriptions rated")  # fmt: skip
            # what the bulk work landed while the refunds were timed: every payment
            # attempt (the bill-run subscriptions' creation invoices are charged too, ahead
            # of the payment run's invoices in the topic) and every period-end invoice
            progress_sql = (
                "SELECT (SELECT count() FROM payment_attempts),"
                " (SELECT count() FROM invoices WHERE reason = 'period_end'),"
                " (SELECT uniqExact(invoice_id) FROM payment_attempts"
                "  WHERE startsWith(invoice_id, 'binv'))"
            )
            console.print(f"refunds during a {payments:,}-payment run and a "
                          f"{subscriptions:,}-subscription bill run: {seconds:.0f} s")  # fmt: skip
            bulk_invoices = encoded_due_invoices(payments, datetime.now(UTC), prefix="b")
            produce_encoded(env, INVOICES, bulk_invoices, lambda n: None)
            del bulk_invoices
            before = query(env.settings, progress_sql)["rows"][0]
            issue_bill_run(env.settings, env.bootstrap, PERIOD_END)
            # the minute starts once both runs are under way (the first seconds are the
            # consumers catching up with 150,000 invoices published at once); both are
            # still in flight when it ends (bulk_in_flight_at_end)
            time.sleep(BULK_SETTLE_S)
            busy = _refund_phase(upstream, targets[per_phase:], seconds, every, "busy",
                                 refunder.log_path)  # fmt: skip
            after = query(env.settings, progress_sql)["rows"][0]
            ledger = asyncio.run(fetch_ledger(simulator.url))
            simulator_gc = asyncio.run(fetch_stats(simulator.url))["gc"]
            # the lane's full collections slower than 50 ms (its GC pause histogram)
            lane_gc = {s.labels["le"]: s.value for s in scrape(env.settings, "lane-priority")
                       if s.name == "streambill_gc_pause_seconds_bucket"
                       and s.labels["generation"] == "2"}  # fmt: skip
            bulk_done = [int(a) - int(b) for a, b in zip(after[:2], before[:2], strict=True)]
        finally:
            if clock is not None:
                clock.close()
            for p in procs:
                p.stop()
            simulator.stop()
    # what the phases asked for, per invoice, against what the gateway recorded: a refund
    # recorded more often, or more money refunded, than asked is doubled
    asked: dict[str, list[Decimal]] = defaultdict(list)
    for invoice_id, _, amount in [*targets[: quiet["sent"]],
                                  *targets[per_phase : per_phase + busy["sent"]]]:  # fmt: skip
        asked[invoice_id].append(amount)
    recorded: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in ledger:
        if e["kind"] == "refund":
            recorded[e["invoice_id"]].append(e)
    doubled = sum(
        1
        for invoice_id, entries in recorded.items()
        if len(entries) > len(asked[invoice_id])
        or sum(Decimal(e["amount"]) for e in entries if e["status"] == "refunded")
        > sum(asked[invoice_id], Decimal(0))
    )
    sigma = math.log(account.refund_latency_p99_ms / account.refund_latency_median_ms) / 2.3263479
    return {
        "refunds": busy["refunds"],
        "p50_ms": busy["p50_ms"],
        "p99_ms": busy["p99_ms"],
        "max_ms": busy["max_ms"],
        "gateway_p99_ms": round(account.refund_latency_median_ms * math.exp(2.3263479 * sigma)),
        "lost": busy["lost"] + quiet["lost"],
        "doubled": doubled,  # invoices refunded more often or by more than asked
        "partial_refunds": len(asked.keys() & partial),
        "ledger_refunds": sum(len(entries) for entries in recorded.values()),
        "busy": busy,  # with the split: to the gateway's answer, from it to Kafka
        "bulk_off": quiet,
        "bulk_progress_during_phase": {
            "payments": int(bulk_done[0]),
            "bill_run_invoices": int(bulk_done[1]),
        },
        "bulk": {"payments": payments, "subscriptions": subscriptions, "settle_s": BULK_SETTLE_S},
        "bulk_in_flight_at_end": {
            "payment_run": int(after[2]) < payments,
            "bill_run": int(after[1]) < subscriptions,
        },
        # stalls of the stand-in gateway and of the lane (each would add to the tail)
        "simulator_gc": simulator_gc,
        "lane_full_gc_over_50ms": lane_gc.get("+Inf", 0) - lane_gc.get("0.05", 0),
    }


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


def bench_signup_spike(
    base: Settings,
    signups: int,
    clients: int,
    workers: int,
    max_concurrency: int,
    rate: float,
    console: Console,
) -> dict[str, Any]:
    """Signups (POST /v1/subscriptions) from `clients` concurrent keep-alive clients that
    honour Retry-After, against the API (`workers` processes) of a tenant with the given
    limits; then every accepted signup is looked for in Kafka and in ClickHouse."""

    import orjson
    import uvloop

    from streams.api.tenants import Tenant, hash_key, new_key, save
    from streams.kafka.topics import SUBSCRIPTIONS
    from streams.testbed.duplicates import topic_copies
    from streams.testbed.loadgen import run_load, signup_request
    from streams.warehouse import query

    with bench_env(base, base.partitions) as env:
        key = new_key("spike")
        tenant = Tenant("spike", "spike-", [hash_key(key)], max_concurrency, rate)
        save(env.settings.home / "api" / "tenants.json", {"spike": tenant})
        sink = ProcessorProcess(env.settings, env.bootstrap, "sink").start()
        api, port = start_api(env.settings, env.bootstrap, workers)
        procs = [sink, api]
        try:
            wait_for_warehouse_endpoint(env.settings, sink)
            host = f"127.0.0.1:{port}"
            requests = []
            for i in range(signups):
                event_id = f"spike-signup-{i:07d}"
                body = orjson.dumps({"type": "subscription.created", "event_id": event_id,
                                     "account_id": f"spike-{i:07d}",
                                     "subscription_id": f"spike-sub-{i:07d}",
                                     "plan_id": "pro-usd",
                                     "payment_method": f"tok_ok_{i}"})  # fmt: skip
                requests.append((event_id, signup_request(host, key, event_id, body)))
            with progress_bar(console) as progress:
                task = progress.add_task("signups accepted", total=signups)
                started = time.perf_counter()
                stats = uvloop.run(run_load("127.0.0.1", port, requests, clients,
                                            lambda n: progress.advance(task, n)))  # fmt: skip
                seconds = time.perf_counter() - started
            del requests
            assert api.alive, f"the API died:\n{api.tail()}"
            accepted = set(stats.accepted)
            on_topic = topic_copies(env.settings, env.bootstrap, SUBSCRIPTIONS, "event_id",
                                    accepted)  # fmt: skip
            sql = "SELECT uniqExact(event_id) FROM subscription_events"

            def landed() -> bool:
                return int(query(env.settings, sql)["rows"][0][0]) >= len(accepted)

            with suppress(TimeoutError):
                _wait(landed, [sink], 120, "the sink")
            in_warehouse = {r[0] for r in query(env.settings, "SELECT DISTINCT event_id FROM "
                                                "subscription_events")["rows"]}  # fmt: skip
            rss = peak_rss_mb(api.proc.pid) if api.proc else 0.0
        finally:
            for proc in procs:
                proc.stop()
    latencies = sorted(stats.latencies_ms)
    five_xx = sum(n for status, n in stats.status.items() if status >= 500)
    return {
        "signups": len(accepted),
        "seconds": round(seconds, 3),
        "signups_per_s": round(len(accepted) / seconds),
        "lost": len(on_topic.missing) + len(accepted - in_warehouse),
        "lost_kafka": len(on_topic.missing),
        "lost_warehouse": len(accepted - in_warehouse),
        # records beyond one per accepted signup: copies, and signups not accepted
        "duplicates_in_kafka": on_topic.records - (len(accepted) - len(on_topic.missing)),
        "errors_5xx": five_xx,
        "timeouts": stats.timeouts,
        "connection_errors": stats.connection_errors,
        "gave_up": len(stats.gave_up),
        "rejected_429": stats.status.get(429, 0),
        "p50_ms": round(percentile(latencies, 0.5), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(latencies[-1], 1) if latencies else 0.0,
        "status_counts": {str(k): v for k, v in sorted(stats.status.items())},
        "clients": clients,
        "api_workers": workers,
        "tenant_max_concurrency": max_concurrency,
        "tenant_rate_per_s": rate,
        "api_peak_rss_mb": round(rss, 1),
    }
