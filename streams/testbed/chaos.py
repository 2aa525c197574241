"""`streambill chaos`: the fault suite. Faults are injected while a bill run and a payment
run are in flight, then the promises are checked.

Each scenario publishes a fresh batch of subscriptions and usage, issues a bill run and a
payment run, injects its faults while the invoices are rated, landed and charged, waits
until every invoice is in ClickHouse and every payable invoice is paid or uncollectible,
and then checks the invariants over everything published so far:

- one invoice per period: ClickHouse and ``billing.invoices`` hold each expected invoice
  id exactly once, and nothing else;
- at most one successful charge per invoice, one ledger entry per idempotency key;
- one row per id in ClickHouse (invoices, payment attempts);
- every payable invoice settled (paid or uncollectible), none left open;
- ``streambill reconcile`` finds no difference between ledger, results topic and warehouse,
  nor with what was due: each charge of the invoice's amount, each decline one the card
  token gets, each write-off after every attempt of the dunning schedule;
- no processor exited on its own (a supervisor restarts it, but it is counted).

Scenarios: SIGKILL of every processor, several times each; loss of one of three brokers
(replication 3, min.insync.replicas 2, acks=all) and its return; a warehouse outage; a
complete gateway outage. The broker, processors and gateway faults are real (signals, the
simulator's outage switch); the warehouse outage is injected at the sink's client
(``streams.testbed.faults``) because chDB runs in the sink.

A fault counts only if it landed. Each waits for the progress it is meant to interrupt
(a processor holding unfinished records, charges being attempted, records flowing, rows
for the sink to insert) and records the evidence of its effect, measured from outside:
the committed records the killed process left unfinished, the calls the gateway refused,
the partitions that lost the killed broker as their leader, the inserts that failed.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import OffsetSpec
from rich.console import Console
from rich.table import Table

from streams.config import DEFAULT_CATALOG, Settings, child_environment
from streams.domain.catalog import Catalog
from streams.kafka import clients
from streams.kafka.lag import group_members
from streams.kafka.local import start_local_kafka, start_local_node, stop_local_kafka
from streams.kafka.topics import (
    ENTITLEMENTS,
    INVOICES,
    PAYMENT_RESULTS,
    RATING_CHANGELOG,
    REFUND_RESULTS,
    REFUNDS,
    SUBSCRIPTIONS,
    USAGE,
    group_id,
    spec_for,
)
from streams.kafka.topics import namespace as current_namespace
from streams.metrics import scrape
from streams.offline import rate_events, record_to_json_line
from streams.processors import lane, payments, rating, sink
from streams.publish import issue_bill_run, issue_payment_run, publish, read_topic
from streams.stack import ProcessorProcess, isolated_namespace, wait_for_warehouse_endpoint
from streams.testbed.duplicates import WarehouseCopies, topic_copies, warehouse_copies
from streams.testbed.faults import OutageSwitchedSink, outage_switch
from streams.testbed.gateway_simulator import AccountConfig, SimulatorConfig, SimulatorProcess
from streams.testbed.generator import DEFAULT_UNTIL, Dataset, expected_invoices
from streams.ui import progress_bar
from streams.warehouse import WarehouseUnavailable, query

log = structlog.get_logger(__name__)

SCENARIOS = ("processor-kills", "broker-loss", "warehouse-outage", "gateway-outage")
PROCESSORS = ("rating", "payments", "sink", "lane")  # lane: the priority lane (refunds)
GROUPS = {"rating": rating.GROUP, "payments": payments.GROUP, "sink": sink.GROUP,
          "lane": lane.lane_group("priority")}  # fmt: skip
# written by the rating processor's transactions: commit markers take offsets there
TRANSACTIONAL = (INVOICES, RATING_CHANGELOG)
# the longest a fault waits for the progress it is meant to hit: after a broker comes back
# under load, a consumer group took over two minutes to settle and consume again
GATE_TIMEOUT_S = 300.0
MERCHANTS = tuple(f"merchant-{n}" for n in range(1, 5))
CLUSTER_PORT_BASE = 29092  # the chaos cluster, apart from the everyday broker on 19092
BROKERS = 3
SETTLED = ("succeeded", "uncollectible")


@dataclass(frozen=True)
class Plan:
    """How hard to push. The short form runs in CI; the full one on demand."""

    accounts: int  # new subscriptions per scenario
    kills_per_processor: int
    outage_s: float  # warehouse and gateway outages
    broker_down_s: float  # once its partitions have moved to the other brokers
    settle_timeout_s: float
    partitions: int
    refunds: int  # refund requests per scenario, for invoices paid before it

    @classmethod
    def full(cls) -> Plan:
        return cls(accounts=5_000, kills_per_processor=3, outage_s=60, broker_down_s=30,
                   settle_timeout_s=900, partitions=6, refunds=200)  # fmt: skip

    @classmethod
    def short(cls) -> Plan:
        return cls(accounts=300, kills_per_processor=2, outage_s=8, broker_down_s=8,
                   settle_timeout_s=300, partitions=4, refunds=20)  # fmt: skip


def landed(kind: str, evidence: dict[str, Any]) -> bool:
    """Did a fault have its effect? Missing evidence says no (pure: tested on forged
    evidence)."""
    e = evidence
    if kind == "sigkill":
        # the victim owned partitions of its input, had started on the work (records taken,
        # or gateway calls in flight) and left some of it unfinished (records written before
        # the kill and not committed by its group, or calls in flight that died with it)
        in_flight = e.get("gateway_calls_in_flight", 0) > 0
        started = in_flight or e.get("records_taken", 0) > 0
        unfinished = in_flight or e.get("behind_at_kill", 0) > 0
        return e.get("partitions_held", 0) > 0 and started and unfinished
    if kind == "broker-sigkill":
        # it led partitions, and each of them got another leader (or none) while it was down
        return e.get("led_before", 0) > 0 and e.get("still_led", 1) == 0
    if kind == "warehouse-outage":
        # the sink's inserts failed, in the process that was landing when it began
        return e.get("insert_failures", 0) > 0 and e.get("sink_restarted", True) is False
    if kind == "gateway-outage":
        return e.get("calls_refused", 0) > 0
    raise ValueError(f"unknown fault kind {kind!r}")


@dataclass
class Fault:
    """One fault injected: what it hit, the progress it waited for, and the evidence that
    it landed."""

    kind: str  # sigkill, broker-sigkill, warehouse-outage, gateway-outage
    target: str
    at_progress: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def effective(self) -> bool:
        return landed(self.kind, self.evidence)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "at_progress": self.at_progress,
                "evidence": self.evidence, "effective": self.effective}  # fmt: skip


@dataclass
class Outcome:
    scenario: str
    injected: list[Fault] = field(default_factory=list)
    events: int = 0
    seconds: float = 0.0
    invariants: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def faults(self) -> int:
        return len(self.injected)

    @property
    def faults_effective(self) -> int:
        return sum(f.effective for f in self.injected)

    @property
    def held(self) -> int:
        return sum(self.invariants.values())

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "faults": self.faults,
                "faults_effective": self.faults_effective,
                "fault_evidence": [f.to_json() for f in self.injected], "events": self.events,
                "seconds": round(self.seconds, 1), "invariants": self.invariants,
                "notes": self.notes}  # fmt: skip


class InvariantBroken(AssertionError):
    pass


@dataclass
class Evidence:
    """What the checks look at, gathered from Kafka, ClickHouse, the ledger and reconcile."""

    expected: dict[str, Decimal]  # invoice id -> total, by the offline rater (one per period)
    warehouse_invoices: tuple[int, int, Decimal]  # rows (FINAL), distinct ids, sum of totals
    kafka_invoices: list[tuple[str, Decimal]]  # committed records of billing.invoices
    ledger: list[dict[str, Any]]  # the gateway's charges and refunds
    warehouse_attempts: tuple[int, int]  # rows (FINAL), distinct payment ids
    payable: int  # invoices with an amount due and a payment method
    settled: int  # of those, paid or uncollectible
    settled_in_time: bool
    reconciled: bool  # `streambill reconcile` found no difference
    unplanned_exits: int
    refund_requests: set[str] = field(default_factory=set)  # refund ids requested
    refund_results: list[tuple[str, str]] = field(default_factory=list)  # id, outcome
    refunds_deactivated: set[str] = field(default_factory=set)  # ids with an entitlement
    # invoices, payment attempts, refunds: streams.testbed.duplicates' checks
    landing_checks: tuple[WarehouseCopies, ...] = ()


def judge(e: Evidence) -> dict[str, bool]:
    """The promises, each true or false (pure: tested on forged evidence)."""
    charges = [x for x in e.ledger if x["kind"] == "charge"]
    paid = Counter(x["invoice_id"] for x in charges if x["status"] == "succeeded")
    per_key = Counter(x["idempotency_key"] for x in e.ledger)
    charged: Counter[str] = Counter()
    refunded: Counter[str] = Counter()
    for x in e.ledger:
        if x["status"] == "succeeded" and x["kind"] == "charge":
            charged[x["invoice_id"]] += Decimal(x["amount"])
        elif x["status"] == "refunded":
            refunded[x["invoice_id"]] += Decimal(x["amount"])
    outcomes: dict[str, set[str]] = {}
    for refund_id, outcome in e.refund_results:
        outcomes.setdefault(refund_id, set()).add(outcome)
    refunded_ids = {i for i, o in outcomes.items() if o == {"refunded"}}
    rows, ids, billed = e.warehouse_invoices
    on_kafka = Counter(invoice_id for invoice_id, _ in e.kafka_invoices)
    return {
        "settled_in_time": e.settled_in_time,
        "one_invoice_per_period": rows == ids == len(e.expected)
        and on_kafka.keys() == e.expected.keys()
        and max(on_kafka.values(), default=1) == 1,
        "totals_match_offline_rater": all(e.expected.get(i) == t for i, t in e.kafka_invoices)
        and billed == sum(e.expected.values(), Decimal(0)),
        "at_most_one_charge_per_invoice": max(paid.values(), default=1) == 1
        and max(per_key.values(), default=1) == 1,
        # a repeated request gets the first answer again; never more back than was paid
        "refunds_answered_once": outcomes.keys() == e.refund_requests
        and all(len(o) == 1 for o in outcomes.values())
        and refunded_ids <= e.refunds_deactivated
        and all(refunded[i] <= charged[i] for i in refunded),
        # no id landed with two contents, as many rows as expected, invoices' totals
        "one_row_per_id": bool(e.landing_checks) and all(c.ok for c in e.landing_checks),
        # settled, and every charge asked for the amount due (the offline rater's total)
        "none_left_open": e.settled == e.payable
        and all(Decimal(x["amount"]) == e.expected.get(x["invoice_id"]) for x in charges),
        "reconciled": e.reconciled,
        "no_processor_died_unasked": e.unplanned_exits == 0,
    }


# --- the parts: a three-broker cluster, the gateway simulator, supervised processors ----


@contextmanager
def chaos_cluster(settings: Settings, console: Console) -> Iterator[tuple[str, dict | None]]:
    """Three local brokers of our own (killable), or the configured cluster (not)."""
    if settings.bootstrap_servers:
        yield settings.bootstrap_servers, None
        return
    env = {
        "STREAMBILL_KAFKA_DIR": str(settings.home / "chaos" / "kafka"),
        "STREAMBILL_KAFKA_PORT_BASE": settings.chaos_kafka_port_base or str(CLUSTER_PORT_BASE),
        "KAFKA_HEAP_MB": settings.kafka_heap_mb,
        # a killed broker is fenced (its partitions move) in about 4 s: well within the
        # clients' 10 s session time-out, so they move with them (see broker-loss)
        "KAFKA_BROKER_SESSION_TIMEOUT_MS": "4000",
    }
    with suppress(subprocess.CalledProcessError):
        stop_local_kafka(env=env)  # a cluster left by an interrupted run
    shutil.rmtree(env["STREAMBILL_KAFKA_DIR"], ignore_errors=True)
    console.print(f"starting a {BROKERS}-broker Kafka cluster (replication 3, min ISR 2)")
    try:
        bootstrap = start_local_kafka(BROKERS, env=env)
        yield bootstrap, env
    finally:  # also when a node failed to start: the others must not outlive the run
        stop_local_kafka(env=env)


class Supervisor:
    """The processors of the run, restarted when they die, as Kubernetes would do; an exit
    that chaos did not cause is counted against the run."""

    def __init__(self, settings: Settings, bootstrap: str, gateway_env: dict[str, str]) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.env = gateway_env
        self.procs: dict[str, ProcessorProcess] = {}
        self.started: dict[str, float] = {}  # monotonic start of each current process
        self.unplanned_exits: Counter[str] = Counter()

    def start(self, name: str) -> ProcessorProcess:
        args = {"rating": ("--catalog", str(DEFAULT_CATALOG), "--clock", "event"),
                "lane": ("priority",)}.get(name, ())  # fmt: skip
        if name == "sink":  # its warehouse client behind the outage switch
            proc: ProcessorProcess = OutageSwitchedSink(self.settings, self.bootstrap,
                                                        env=self.env)  # fmt: skip
        else:
            proc = ProcessorProcess(self.settings, self.bootstrap, name, *args, env=self.env)
        self.procs[name] = proc.start()
        self.started[name] = time.monotonic()
        return proc

    def pid(self, name: str) -> int:
        proc = self.procs[name].proc
        assert proc is not None
        return proc.pid

    def kill(self, name: str) -> float:
        """SIGKILL (no flush, no commit, no goodbye), not restarted yet; returns the age of
        the process killed, in seconds."""
        self.procs[name].kill()
        return time.monotonic() - self.started[name]

    def check(self) -> list[str]:
        """Restart what died on its own; returns their names."""
        died = [name for name, proc in self.procs.items() if not proc.alive]
        for name in died:
            self.unplanned_exits[name] += 1
            log.error("processor exited on its own; restarting it", processor=name,
                      returncode=self.procs[name].proc.returncode,  # type: ignore[union-attr]
                      tail=self.procs[name].tail(15))  # fmt: skip
            self.start(name)
        return died

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


def simulator_config(seed: int) -> SimulatorConfig:
    # fast enough for a run of minutes; declines exercise dunning, transients the retries
    account = AccountConfig(
        max_concurrency=40, latency_median_ms=20, latency_p99_ms=120, decline_rate=0.05,
        transient_rate=0.03, timeout_delay_s=1.0,
    )  # fmt: skip
    return SimulatorConfig(accounts=dict.fromkeys(MERCHANTS, account), seed=seed)


def gateway_env(url: str) -> dict[str, str]:
    return {"STREAMBILL_GATEWAY": "simulator", "STREAMBILL_GATEWAY_URL": url,
            "STREAMBILL_MERCHANT_ACCOUNTS": ",".join(MERCHANTS),
            "STREAMBILL_GATEWAY_MAX_CONCURRENCY": "40", "STREAMBILL_GATEWAY_TIMEOUT": "1",
            "STREAMBILL_DUNNING": "1s,2s,3s"}  # fmt: skip


# --- the run ------------------------------------------------------------------------------


@dataclass
class Published:
    invoices: int = 0  # expected, cumulative
    inputs: int = 0


class Chaos:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        cluster_env: dict | None,
        plan: Plan,
        seed: int,
        console: Console,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.cluster_env = cluster_env
        self.plan = plan
        self.rng = random.Random(seed)
        self.seed = seed
        self.console = console
        self.catalog = Catalog.from_dict(json.loads(DEFAULT_CATALOG.read_text()))
        self.published = Published()
        self.simulator: SimulatorProcess | None = None
        self.supervisor: Supervisor | None = None
        self.admin = clients.admin(settings, bootstrap)
        self.attempts_seen = 0
        self.new_attempts = 0  # payment attempts landed during the last scenario
        self.offline_lines: list[str] = []  # every published event, for the offline rater
        self.refund_ids: set[str] = set()
        self.refunded_invoices: set[str] = set()

    # -- workload --

    def publish_batch(self, k: int, on_bill_run: Callable[[], None] | None = None) -> int:
        """New subscriptions with their usage, a bill run and a payment run; `on_bill_run`
        is called as soon as the bill run is issued (while it is being rated)."""
        ds = Dataset(accounts=self.plan.accounts, seed=self.seed * 100 + k)
        from streams.testbed.generator import subscription_events, usage_events

        producer = clients.producer(self.settings, self.bootstrap)
        subscriptions = list(subscription_events(ds, self.catalog))
        usage = list(usage_events(ds, self.catalog))
        n = publish(producer, SUBSCRIPTIONS, subscriptions)
        n += publish(producer, USAGE, usage)
        # the reference: the same events through the offline rater
        self.offline_lines += [record_to_json_line("sub", r) for r in subscriptions]
        self.offline_lines += [record_to_json_line("usage", r) for r in usage]
        issue_bill_run(self.settings, self.bootstrap, DEFAULT_UNTIL)
        if on_bill_run:
            on_bill_run()
        # the payment run collects the dunning retries due within a day: all of them, now
        issue_payment_run(self.settings, self.bootstrap, datetime.now(UTC) + timedelta(days=1))
        self.published.invoices += expected_invoices(ds, self.catalog, DEFAULT_UNTIL)
        self.published.inputs += n
        return n

    def publish_refunds(self, k: int) -> int:
        """Refund requests for invoices paid before this scenario: full refunds (the
        entitlement deactivated), one request repeated, and one asking for more than was
        paid (refused). Returns how many requests were published."""
        if not self.plan.refunds:
            return 0
        rows = self._warehouse(
            "SELECT invoice_id, account_id, toString(amount), currency FROM payment_attempts "
            "FINAL WHERE status = 'succeeded' ORDER BY invoice_id "
            f"LIMIT {len(self.refunded_invoices) + self.plan.refunds + 1}"
        )
        fresh = [r for r in rows if r[0] not in self.refunded_invoices][: self.plan.refunds + 1]
        now = datetime.now(UTC)
        requests = [
            {"refund_id": f"chaos-{k}-{i}", "invoice_id": invoice, "account_id": account,
             "amount": Decimal(amount) + (1 if i == len(fresh) - 1 else 0),  # the last: too much
             "currency": currency, "reason": "chaos", "deactivate": True, "requested_at": now}
            for i, (invoice, account, amount, currency) in enumerate(fresh)
        ]  # fmt: skip
        if requests:
            requests.append(requests[0])  # the same request again: the first answer again
        producer = clients.producer(self.settings, self.bootstrap)
        published = publish(producer, REFUNDS, requests)
        self.refund_ids |= {r["refund_id"] for r in requests}
        self.refunded_invoices |= {r["invoice_id"] for r in requests}
        return published

    # -- faults: each waits for the progress it is meant to hit, then records its effect --

    def kill_processors(self, outcome: Outcome, k: int) -> None:
        """Every processor killed once a round, each while it holds work of the round that
        it has started and not finished, in the order the work comes: the rating processor
        as the bill run is issued, the priority lane with refunds in flight, the payments
        processor with charges in flight (of the invoices its restarted upstream emits),
        the sink with records to land. Each round after the first brings a batch of its
        own, once the previous one has settled, so that the victims are processes that
        have been working, not replacements still starting."""
        for n in range(self.plan.kills_per_processor):
            if n:
                self.wait_settled(f"processor-kills, before round {n + 1}")
            batch = k if n == 0 else 100 + n
            self._await("every processor in its group", self._all_in_their_groups)
            taken = {name: self._records(name) for name in PROCESSORS}
            outcome.events += self.publish_batch(
                batch, on_bill_run=partial(self._kill_at_work, "rating", taken, outcome)
            )
            outcome.events += self.publish_refunds(batch)
            self._kill_at_work("lane", taken, outcome)
            self._kill_at_work("payments", taken, outcome)
            self._kill_at_work("sink", taken, outcome)

    def _kill_at_work(self, name: str, taken: dict[str, float], outcome: Outcome) -> None:
        """SIGKILL the processor once it is at work on the round, then restart it. At work:
        it owns partitions in its group (not a replacement still joining) and has taken
        records of the round (the lane and the payments processor: has gateway calls in
        flight; the sink: also has records not landed)."""
        assert self.supervisor
        group = group_id(GROUPS[name])
        calls = name in ("lane", "payments")

        def at_work() -> dict[str, Any] | None:
            seen: dict[str, Any] = {"partitions_held": self._partitions_held(name)}
            if not seen["partitions_held"]:
                return None
            if calls:
                seen["gateway_calls_in_flight"] = self._in_flight(name)
                return seen if seen["gateway_calls_in_flight"] else None
            seen["records_taken"] = int(self._records(name) - taken[name])
            if seen["records_taken"] <= 0:
                return None
            if name == "sink":
                seen["behind"] = sum(self._behind(group, self._ends(group)).values())
                return seen if seen["behind"] else None
            return seen

        at = self._await(f"{name} at work on the round", at_work)
        ends = self._ends(group)
        evidence: dict[str, Any] = {"pid": self.supervisor.pid(name)}
        if calls:  # measured the instant before the signal: calls that die with it
            evidence["gateway_calls_in_flight"] = self._in_flight(name)
        age = self.supervisor.kill(name)
        # nothing commits for the group until the replacement runs: what it has not
        # committed of what had been written before the kill, the killed process left
        behind = self._behind(group, ends)
        self.supervisor.start(name)
        evidence |= {"age_s": round(age, 1),
                     **{key: at[key] for key in ("partitions_held", "records_taken") if key in at},
                     "behind_at_kill": sum(behind.values()), "behind_by_topic": behind}  # fmt: skip
        self._injected(outcome, Fault("sigkill", name, at, evidence),
                       f"SIGKILL {name} (pid {evidence['pid']}, {age:.0f} s old)")  # fmt: skip

    def _in_flight(self, processor: str) -> int:
        """Gateway calls the processor's current process has in flight (its own gauge)."""
        return int(self._process_metric(processor, "streambill_gateway_in_flight") or 0)

    def _ends(self, group: str) -> dict[tuple[str, int], int]:
        """The read-committed ends, now, of the partitions the group has committed on
        whose records have no transaction markers among them (every producer but the
        rating processor's): there an offset is a record."""
        committed = self.admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=10
        )[group].result()
        wanted = {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest()
                  for tp in committed.topic_partitions
                  if spec_for(tp.topic) not in TRANSACTIONAL}  # fmt: skip
        return {(tp.topic, tp.partition): future.result().offset
                for tp, future in self.admin.list_offsets(
                    wanted, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=10
                ).items()}  # fmt: skip

    def _behind(self, group: str, ends: dict[tuple[str, int], int]) -> dict[str, int]:
        """Records below `ends` the group has not committed, by topic (base name)."""
        committed = self.admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=10
        )[group].result()
        behind: Counter[str] = Counter()
        for tp in committed.topic_partitions:
            end = ends.get((tp.topic, tp.partition))
            if end is not None and end > max(tp.offset, 0):
                behind[spec_for(tp.topic).base] += end - max(tp.offset, 0)
        return dict(behind)

    def lose_a_broker(self, outcome: Outcome, k: int) -> None:
        """Killed as the bill run is issued, the batch's usage just published."""
        if self.cluster_env is None:
            outcome.events += self.publish_batch(k) + self.publish_refunds(k)
            outcome.notes.append("skipped: a configured cluster's brokers are not ours to kill")
            return
        outcome.events += self.publish_batch(k, on_bill_run=partial(self._broker_down, outcome))
        outcome.events += self.publish_refunds(k)

    def _broker_down(self, outcome: Outcome) -> None:
        assert self.cluster_env
        node = self.rng.randint(1, BROKERS)
        pid_file = Path(self.cluster_env["STREAMBILL_KAFKA_DIR"]) / f"node-{node}" / "pid"
        at = self._await("records flowing (the sink behind)", self._sink_behind)
        led = self._led_by(node)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        self.console.print(f"  SIGKILL broker {node}, leader of {len(led)} partitions")
        # its partitions move once the controller fences it (broker session time-out);
        # then the cluster runs on two brokers for broker_down_s
        moved = self._await(f"the partitions broker {node} led to move",
                            lambda: None if self._led_by(node) else {})  # fmt: skip
        still = self._led_by(node)
        self._injected(outcome, Fault("broker-sigkill", f"broker-{node}", at, {
            "node": node, "led_before": len(led), "still_led": len(still),
            "moved_after_s": moved.get("waited_s"), "led_before_sample": led[:4],
        }), f"broker {node} stays down {self.plan.broker_down_s:.0f} s more")  # fmt: skip
        self._sleep(self.plan.broker_down_s)
        start_local_node(node, env=self.cluster_env)
        self.console.print(f"  broker {node} is back")

    def warehouse_outage(self, outcome: Outcome, k: int) -> None:
        """Down from the moment the bill run is issued, the batch's usage just published,
        and kept down for `outage_s` after the sink's first failed insert: the invoices of
        the bill run are rows the sink must land, so the outage always meets them (the
        refund requests go first: they look for paid invoices in the warehouse)."""
        outcome.events += self.publish_refunds(k)
        outcome.events += self.publish_batch(k, on_bill_run=partial(self._warehouse_down, outcome))

    def _warehouse_down(self, outcome: Outcome) -> None:
        assert self.supervisor
        switch = outage_switch(self.settings)
        switch.parent.mkdir(parents=True, exist_ok=True)
        pid = self.supervisor.pid("sink")
        failures = "streambill_warehouse_retries_total"
        before = self._process_metric("sink", failures, pid=pid) or 0
        switch.touch()
        self.console.print(f"  warehouse down, {self.plan.outage_s:.0f} s after the sink meets it")
        try:

            def failing() -> dict[str, Any] | None:
                # a pending insert waited on a consumer-lag gate before: the sink had
                # often landed the usage already and the invoices' transactional offsets
                # are not records, so the gate timed out though the sink was healthy
                failed = (self._process_metric("sink", failures, pid=pid) or 0) - before
                return {"insert_failures": int(failed)} if failed > 0 else None

            at = self._await("the sink's inserts to fail", failing)
            self._sleep(self.plan.outage_s)
            after = self._process_metric("sink", failures, pid=pid)
        finally:
            switch.unlink(missing_ok=True)
        restarted = self.supervisor.pid("sink") != pid
        self._injected(outcome, Fault("warehouse-outage", "sink", at, {
            "sink_pid": pid, "sink_restarted": restarted,
            "insert_failures": int(after - before) if after is not None else 0,
        }), "warehouse back")  # fmt: skip

    def gateway_outage(self, outcome: Outcome, k: int) -> None:
        """Down from the batch's first charges on: the bill run's invoices are being
        charged (its rating takes seconds, its charges a fraction of one)."""
        start = self._gateway_counts()
        down = partial(self._gateway_down, outcome, start)
        outcome.events += self.publish_batch(k, on_bill_run=down)
        outcome.events += self.publish_refunds(k)

    def _gateway_down(self, outcome: Outcome, start: dict[str, int]) -> None:
        assert self.simulator

        def charging() -> dict[str, Any] | None:
            now = self._gateway_counts()
            charged = now["charges"] - start["charges"]
            return {"charges_of_the_batch": charged, "in_flight": now["in_flight"]} if charged \
                else None  # fmt: skip

        at = self._await("charges of the batch being attempted", charging)
        before = self._gateway_counts()
        body = json.dumps({"seconds": self.plan.outage_s}).encode()
        request = urllib.request.Request(f"{self.simulator.url}/v1/admin/outage", data=body,
                                         method="POST")  # fmt: skip
        with urllib.request.urlopen(request, timeout=10):
            pass
        self.console.print(
            f"  gateway down (every merchant account) for {self.plan.outage_s:.0f} s"
        )
        self._sleep(self.plan.outage_s)
        after = self._gateway_counts()
        self._injected(outcome, Fault("gateway-outage", "gateway", at, {
            "calls_refused": after["refused_outage"] - before["refused_outage"],
            "requests": after["requests"] - before["requests"],
        }), "gateway back")  # fmt: skip

    def _injected(self, outcome: Outcome, fault: Fault, what: str) -> None:
        outcome.injected.append(fault)
        verdict = "[green]landed[/]" if fault.effective else "[red]did not land[/]"
        self.console.print(f"  {what}: {verdict} {json.dumps(fault.evidence)}", highlight=False)
        if not fault.effective:
            log.error("a fault did not land", kind=fault.kind, target=fault.target,
                      at_progress=fault.at_progress, evidence=fault.evidence)  # fmt: skip

    # -- what the faults wait for and what they leave: measured from outside --

    def _await(self, what: str, probe: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """Poll until `probe` returns the progress it waits for (restarting processors
        that die meanwhile). On time-out, says so loudly; the fault is injected all the
        same and its evidence shows that it missed."""
        started = time.monotonic()
        while True:
            try:
                seen = probe()
            except (KafkaException, LookupError, OSError) as exc:  # a rebalance, a node down
                log.debug("progress not measured", waiting_for=what, error=str(exc)[:200])
                seen = None
            waited = round(time.monotonic() - started, 2)
            if seen is not None:
                return {**seen, "waited_s": waited}
            if waited > GATE_TIMEOUT_S:
                log.error("the progress a fault waits for never came", waiting_for=what)
                self.console.print(f"  [red]gave up waiting for {what} after {waited} s[/]")
                return {"timed_out_waiting_for": what, "waited_s": waited}
            self._sleep(0.01)

    def _all_in_their_groups(self) -> dict[str, Any] | None:
        held = {name: self._partitions_held(name) for name in PROCESSORS}
        return {"partitions_held": held} if all(held.values()) else None

    def _sink_behind(self) -> dict[str, Any] | None:
        group = group_id(GROUPS["sink"])
        behind = sum(self._behind(group, self._ends(group)).values())
        return {"sink_behind": behind} if behind and self._partitions_held("sink") else None

    def _partitions_held(self, processor: str) -> int:
        """Partitions the processor's current process owns in its group (0 while joining)."""
        assert self.supervisor
        members = group_members(self.admin, group_id(GROUPS[processor]), timeout=5)
        return len(members.get(f"streambill-{self.supervisor.pid(processor)}", []))

    def _records(self, processor: str) -> float:
        """Records the processor's current process has consumed (its own counter)."""
        return self._process_metric(processor, "streambill_records_total") or 0

    def _process_metric(self, processor: str, sample: str, pid: int | None = None) -> float | None:
        """A sample's sum over its labels, from the metrics endpoint of one process (the
        processor's current one by default); None if it has none."""
        assert self.supervisor
        pid = pid or self.supervisor.pid(processor)
        values = [s.value for s in scrape(self.settings, pid=pid) if s.name == sample]
        return sum(values) if values else None

    def _gateway_counts(self) -> dict[str, int]:
        assert self.simulator
        with urllib.request.urlopen(f"{self.simulator.url}/v1/stats", timeout=10) as response:
            accounts = json.loads(response.read())["accounts"].values()
        return {key: sum(a[stat] for a in accounts)
                for key, stat in (("requests", "requests"), ("charges", "charges"),
                                  ("in_flight", "in_flight"),
                                  ("refused_outage", "rejected_outage"))}  # fmt: skip

    def _led_by(self, node: int) -> list[str]:
        """This run's partitions whose leader is broker `node`, in the cluster's metadata."""
        ns = current_namespace()
        return sorted(
            f"{topic}[{p}]"
            for topic, meta in self.admin.list_topics(timeout=10).topics.items()
            if topic.startswith(ns)
            for p, partition in meta.partitions.items()
            if partition.leader == node
        )

    def _sleep(self, seconds: float) -> None:
        """Sleep, restarting any processor that dies meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.supervisor:
                self.supervisor.check()
            time.sleep(min(0.2, left))

    # -- checks --

    def _warehouse(self, sql: str) -> list[list[Any]]:
        return query(self.settings, sql, timeout=30, open_here=False)["rows"]

    def progress(self) -> tuple[int, int, int]:
        """(invoices landed, payable invoices, payable invoices settled); refunds not all
        answered in ClickHouse yet count as one payable invoice not settled."""
        invoices, payable = self._warehouse(
            "SELECT count(), countIf(total > 0 AND payment_method IS NOT NULL) FROM invoices FINAL"
        )[0]
        settled = self._warehouse(
            "SELECT uniqExactIf(invoice_id, status IN ('succeeded', 'uncollectible')) "
            "FROM payment_attempts FINAL"
        )[0][0]
        answered = self._warehouse("SELECT uniqExact(refund_id) FROM refunds FINAL")[0][0]
        refunds_pending = int(answered) < len(self.refund_ids)
        return int(invoices), int(payable), int(settled) - refunds_pending

    def wait_settled(self, label: str) -> bool:
        deadline = time.monotonic() + self.plan.settle_timeout_s
        with progress_bar(self.console) as bar:
            landed = bar.add_task(f"{label}: invoices in ClickHouse", total=self.published.invoices)
            paid = bar.add_task(f"{label}: payable invoices settled", total=None)
            while time.monotonic() < deadline:
                self._sleep(0.5)
                try:
                    invoices, payable, settled = self.progress()
                except (WarehouseUnavailable, ValueError):
                    continue  # the sink restarts or the warehouse is (made) down
                bar.update(landed, completed=invoices)
                bar.update(paid, completed=settled, total=payable)
                if invoices >= self.published.invoices and settled >= payable:
                    return True
        return False

    def invariants(self, settled: bool) -> dict[str, bool]:
        assert self.simulator and self.supervisor
        time.sleep(1.0)  # anything landing twice would show now
        invoices = self._warehouse(
            "SELECT count(), uniqExact(invoice_id), toString(sum(total)) FROM invoices FINAL"
        )
        attempts = self._warehouse(
            "SELECT count(), uniqExact(payment_id) FROM payment_attempts FINAL"
        )
        _, payable, settled_now = self.progress()
        expected = {
            inv.invoice_id: inv.total
            for inv in rate_events(self.catalog, self.offline_lines, DEFAULT_UNTIL).invoices
        }
        evidence = Evidence(
            expected=expected,
            warehouse_invoices=(int(invoices[0][0]), int(invoices[0][1]), Decimal(invoices[0][2])),
            kafka_invoices=[
                (r["invoice_id"], r["total"])
                for r in read_topic(self.settings, self.bootstrap, INVOICES)
            ],
            ledger=self._ledger(),
            warehouse_attempts=(int(attempts[0][0]), int(attempts[0][1])),
            payable=payable,
            settled=settled_now,
            settled_in_time=settled,
            reconciled=self._reconcile(),
            unplanned_exits=sum(self.supervisor.unplanned_exits.values()),
            refund_requests=set(self.refund_ids),
            refund_results=[
                (r["refund_id"], f"{r['status']}:{r['reason']}:{r['amount']}")
                for r in read_topic(self.settings, self.bootstrap, REFUND_RESULTS)
            ],
            refunds_deactivated={
                r["cause"].removeprefix("refund:")
                for r in read_topic(self.settings, self.bootstrap, ENTITLEMENTS)
                if r["cause"].startswith("refund:") and r["action"] == "deactivate"
            },
            landing_checks=self.landing_checks(expected),
        )
        self.new_attempts = evidence.warehouse_attempts[0] - self.attempts_seen
        self.attempts_seen = evidence.warehouse_attempts[0]
        return judge(evidence)

    def landing_checks(self, expected: dict[str, Decimal]) -> tuple[WarehouseCopies, ...]:
        """Invoices (with the offline rater's totals), payment attempts (one per payment id
        on billing.payment-results) and refunds (one per request) each landed once."""
        results = topic_copies(self.settings, self.bootstrap, PAYMENT_RESULTS, "payment_id")
        wanted = {"invoices": expected, "payment_attempts": len(results.copies),
                  "refunds": len(self.refund_ids)}  # fmt: skip
        checks = tuple(
            warehouse_copies(self.settings, table, want, open_here=False)
            for table, want in wanted.items()
        )
        for check in checks:
            if not check.ok:
                log.error("landed more than once or not as expected", check=check.summary())
        return checks

    def _ledger(self) -> list[dict[str, Any]]:
        import asyncio

        from streams.payments.http_gateway import fetch_ledger

        assert self.simulator
        return asyncio.run(fetch_ledger(self.simulator.url))

    def _reconcile(self) -> bool:
        """`streambill reconcile`, the command an operator runs, as a separate process."""
        assert self.simulator
        out = self.settings.home / "reconcile.json"
        # the processors' gateway settings, so its dunning schedule judges the verdicts
        env = child_environment(**gateway_env(self.simulator.url),
                                KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
                                STREAMBILL_HOME=str(self.settings.home),
                                STREAMBILL_NAMESPACE=current_namespace())  # fmt: skip
        argv = [sys.executable, "-m", "streams.cli", "reconcile", "--json", str(out)]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):
            log.error("reconcile gave no report", stderr=proc.stderr[-2000:])
            return False
        if not report["reconciled"]:
            log.error("reconcile found differences", differences=report["differences"][:20])
        return proc.returncode == 0 and bool(report["reconciled"])

    # -- driver --

    def run(self, scenarios: list[str]) -> list[Outcome]:
        faults: dict[str, Callable[[Outcome, int], None]] = {
            "processor-kills": self.kill_processors,
            "broker-loss": self.lose_a_broker,
            "warehouse-outage": self.warehouse_outage,
            "gateway-outage": self.gateway_outage,
        }
        self.simulator = SimulatorProcess.start(simulator_config(self.seed),
                                                self.settings.home / "logs")  # fmt: skip
        self.supervisor = Supervisor(self.settings, self.bootstrap,
                                     gateway_env(self.simulator.url))  # fmt: skip
        outcomes = []
        try:
            sink = self.supervisor.start("sink")
            wait_for_warehouse_endpoint(self.settings, sink)
            for name in PROCESSORS[:2] + PROCESSORS[3:]:
                self.supervisor.start(name)
            if self.plan.refunds:  # invoices paid before the first scenario, to refund in it
                self.console.print("[bold]warm-up[/] (no fault): a first batch is billed and paid")
                self.publish_batch(len(scenarios))
                if not self.wait_settled("warm-up"):
                    raise InvariantBroken("the warm-up batch did not settle: see the logs")
                self.attempts_seen = int(
                    self._warehouse("SELECT count() FROM payment_attempts FINAL")[0][0]
                )  # the first scenario counts its own attempts only
            for k, scenario in enumerate(scenarios):
                outcome = Outcome(scenario)
                self.console.print(f"[bold]{scenario}[/]")
                started = time.monotonic()
                invoices_before = self.published.invoices
                faults[scenario](outcome, k)  # publishes the scenario's work, injects faults
                settled = self.wait_settled(scenario)
                outcome.invariants = self.invariants(settled)
                outcome.seconds = time.monotonic() - started
                outcome.events += self.published.invoices - invoices_before + self.new_attempts
                self.supervisor.unplanned_exits.clear()
                outcomes.append(outcome)
                broken = [k for k, ok in outcome.invariants.items() if not ok]
                self.console.print(
                    f"  {outcome.faults} faults ({outcome.faults_effective} landed), "
                    f"{outcome.events} events, invariants "
                    + (f"[red]broken: {', '.join(broken)}[/]" if broken else "[green]held[/]")
                )
        finally:
            self.supervisor.stop()
            self.simulator.stop()
            outage_switch(self.settings).unlink(missing_ok=True)
        return outcomes


def run_chaos(
    settings: Settings, plan: Plan, scenarios: list[str], seed: int, console: Console
) -> dict[str, Any]:
    started = time.monotonic()
    with (
        chaos_cluster(settings, console) as (bootstrap, cluster_env),
        isolated_namespace(
            settings.home / "chaos", bootstrap, plan.partitions, "chaos", keep_home=True
        ) as run_settings,
    ):
        chaos = Chaos(run_settings, bootstrap, cluster_env, plan, seed, console)
        try:
            outcomes = chaos.run(scenarios)
        finally:
            # its Kafka clients go before the cluster does: librdkafka aborted the process
            # (an enq_once assertion) when an admin client outlived the brokers it talked to
            del chaos
            gc.collect()
        keep = run_settings.home
    print_table(console, outcomes)
    checked = sum(len(o.invariants) for o in outcomes)
    held = sum(o.held for o in outcomes)
    console.print(f"logs and warehouse of the run: {keep}")
    return {
        "scenario": "chaos",
        "params": {"accounts_per_scenario": plan.accounts, "kills_per_processor":
                   plan.kills_per_processor, "outage_s": plan.outage_s,
                   "broker_down_s": plan.broker_down_s, "brokers": BROKERS if cluster_env
                   else None, "partitions": plan.partitions, "seed": seed},
        "metrics": {
            "scenarios": len(outcomes),
            "faults_injected": sum(o.faults for o in outcomes),
            "faults_effective": sum(o.faults_effective for o in outcomes),
            "events": sum(o.events for o in outcomes),
            "invariants_held": held,
            "invariants_checked": checked,
            "all_held": held == checked,
            "seconds": round(time.monotonic() - started, 1),
        },
        "results": [o.to_json() for o in outcomes],
    }  # fmt: skip


def print_table(console: Console, outcomes: list[Outcome]) -> None:
    table = Table(title="chaos: faults during a bill run and a payment run")
    table.add_column("scenario", no_wrap=True)
    for col in ("faults", "landed", "events", "invariants held", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for o in outcomes:
        ok = o.held == len(o.invariants)
        held = f"{o.held}/{len(o.invariants)}"
        landed = f"{o.faults_effective}/{o.faults}"
        table.add_row(o.scenario + (f" ({'; '.join(o.notes)})" if o.notes else ""), str(o.faults),
                      landed if o.faults_effective == o.faults else f"[red]{landed}[/]",
                      f"{o.events:,}", f"[green]{held}[/]" if ok else f"[red]{held}[/]",
                      f"{o.seconds:.0f}")  # fmt: skip
    console.print(table)
