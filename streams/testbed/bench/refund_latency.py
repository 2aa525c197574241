"""`streambill bench refund-latency`: refund latency (request produced -> result and
entitlement on Kafka) with the bulk load off, then during a payment run and a bill run."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from confluent_kafka import TopicPartition
from rich.console import Console

from streams.codec import codec
from streams.config import Settings
from streams.domain.money import round_money
from streams.kafka import clients
from streams.kafka.topics import (
    ENTITLEMENTS,
    INVOICES,
    REFUND_RESULTS,
    REFUNDS,
    SUBSCRIPTIONS,
    group_id,
)
from streams.metrics import scrape
from streams.payments.http_gateway import fetch_ledger, fetch_stats
from streams.processors.lane import STAGES_HEADER
from streams.processors.rating import GROUP
from streams.publish import issue_bill_run
from streams.stack import ProcessorProcess, wait_for_warehouse_endpoint
from streams.testbed.bench.harness import (
    Env,
    bench_env,
    committed_lag,
    percentile,
    produce_encoded,
    start_rating,
    wait,
)
from streams.testbed.bench.inputs import (
    PERIOD_END,
    encoded_due_invoices,
    encoded_subscriptions,
    monthly_plans,
)
from streams.testbed.gateway_simulator import AccountConfig, SimulatorConfig, SimulatorProcess
from streams.ui import progress_bar
from streams.warehouse import query

BULK_NICE = 10  # CPU priority of bulk processors next to the priority lane
BULK_SETTLE_S = 5.0  # the busy minute starts this long after the bulk runs


class ArrivalClock:
    """Notes when each refund's result and entitlement reach Kafka, and where the lane
    spent its time (the result's STAGES_HEADER): a consumer of both topics in its own
    thread, starting at their current end."""

    def __init__(self, env: Env) -> None:
        self.results: dict[str, float] = {}
        self.entitlements: dict[str, float] = {}
        self.completed: dict[str, float] = {}  # the lane's clock when the gateway answered
        self.stages: dict[str, dict[str, float]] = {}  # the lane's stages (ms) per refund
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
                    for name, value in msg.headers() or ():
                        if name == STAGES_HEADER:
                            self.stages.setdefault(result["refund_id"], orjson.loads(value))
                else:
                    cause = decode_entitlement(msg.value())["cause"]
                    self.entitlements.setdefault(cause.removeprefix("refund:"), now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def _refund_phase(
    upstream: tuple[Any, ArrivalClock],
    targets: list[tuple[str, str, Decimal]],
    seconds: float,
    every: float,
    tag: str,
) -> dict[str, Any]:
    """One refund request every `every` s for `seconds` s; latency from its produce to
    both its result and its entitlement on Kafka."""
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
    stages = {r: clock.stages[r] for r in sent if r in clock.stages}
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


def run(
    base: Settings,
    seconds: float,
    payments: int,
    subscriptions: int,
    console: Console,
) -> dict[str, Any]:
    """Refund latency with the bulk load off, then during a payment run and a bill run."""
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
        refunder = ProcessorProcess(env.settings, env.bootstrap, "lane", "priority",
                                    env=gateway_env)  # fmt: skip
        procs = [sink, payer, refunder.start(), *start_rating(env, 2, nice=BULK_NICE)]
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

                wait(paid, procs, 600, "refundable invoices paid")
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
            quiet = _refund_phase(upstream, targets[:per_phase], seconds, every, "quiet")
            with progress_bar(console) as progress:
                bulk_subs = encoded_subscriptions(subscriptions, monthly_plans())
                task = progress.add_task("bill-run subscriptions rated (not timed)",
                                         total=len(bulk_subs))  # fmt: skip
                produce_encoded(env, SUBSCRIPTIONS, bulk_subs, lambda n: None)
                del bulk_subs
                group = group_id(GROUP)
                wait(lambda: committed_lag(env, group, [SUBSCRIPTIONS.name]) == 0, procs, 3600,
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
            busy = _refund_phase(upstream, targets[per_phase:], seconds, every, "busy")
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
