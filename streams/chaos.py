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
- ``streambill reconcile`` finds no difference between ledger, results topic and warehouse;
- no processor exited on its own (a supervisor restarts it, but it is counted).

Scenarios: SIGKILL of every processor at random moments, several times each; loss of one
of three brokers (replication 3, min.insync.replicas 2, acks=all) and its return; a
warehouse outage; a complete gateway outage. The broker, processors and gateway faults
are real (signals, the simulator's outage switch); the warehouse outage is injected at
the sink's client (``streams.warehouse.outage_switch``) because chDB runs in the sink.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console
from rich.table import Table

from streams.config import DEFAULT_CATALOG, Settings
from streams.domain.catalog import Catalog
from streams.generator import DEFAULT_UNTIL, Dataset, expected_invoices
from streams.kafka import clients
from streams.kafka.local import start_local_kafka, start_local_node, stop_local_kafka
from streams.kafka.topics import (
    ENTITLEMENTS,
    INVOICES,
    REFUND_RESULTS,
    REFUNDS,
    SUBSCRIPTIONS,
    USAGE,
)
from streams.kafka.topics import namespace as current_namespace
from streams.offline import rate_events, record_to_json_line
from streams.payments.simulator import AccountConfig, SimulatorConfig, SimulatorProcess
from streams.publish import issue_bill_run, issue_payment_run, publish, read_topic
from streams.stack import ProcessorProcess, isolated_namespace, wait_for_warehouse_endpoint
from streams.ui import progress_bar
from streams.warehouse import WarehouseUnavailable, outage_switch, query

log = structlog.get_logger(__name__)

SCENARIOS = ("processor-kills", "broker-loss", "warehouse-outage", "gateway-outage")
PROCESSORS = ("rating", "payments", "sink", "lane")  # lane: the priority lane (refunds)
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
    broker_down_s: float
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


@dataclass
class Outcome:
    scenario: str
    faults: int = 0
    events: int = 0
    seconds: float = 0.0
    invariants: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(self.invariants.values())

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "faults": self.faults, "events": self.events,
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
    warehouse_refunds: tuple[int, int] = (0, 0)  # rows (FINAL), distinct refund ids


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
        "one_row_per_id": rows == ids
        and e.warehouse_attempts[0] == e.warehouse_attempts[1]
        and e.warehouse_refunds == (len(e.refund_requests), len(e.refund_requests)),
        "none_left_open": e.settled == e.payable,
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
        "STREAMBILL_KAFKA_PORT_BASE": os.environ.get(
            "STREAMBILL_CHAOS_KAFKA_PORT_BASE", str(CLUSTER_PORT_BASE)
        ),
        "KAFKA_HEAP_MB": os.environ.get("KAFKA_HEAP_MB", "512"),
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
        self.env = {**gateway_env, "STREAMBILL_FAULT_INJECTION": "1"}
        self.procs: dict[str, ProcessorProcess] = {}
        self.unplanned_exits: Counter[str] = Counter()

    def start(self, name: str) -> ProcessorProcess:
        args = {"rating": ("--catalog", str(DEFAULT_CATALOG), "--clock", "event"),
                "lane": ("priority",)}.get(name, ())  # fmt: skip
        proc = ProcessorProcess(self.settings, self.bootstrap, name, *args, env=self.env)
        self.procs[name] = proc.start()
        return proc

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.start(name)

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
        self.attempts_seen = 0
        self.new_attempts = 0  # payment attempts landed during the last scenario
        self.offline_lines: list[str] = []  # every published event, for the offline rater
        self.refund_ids: set[str] = set()
        self.refunded_invoices: set[str] = set()

    # -- workload --

    def publish_batch(self, k: int) -> int:
        ds = Dataset(accounts=self.plan.accounts, seed=self.seed * 100 + k)
        from streams.generator import subscription_events, usage_events

        producer = clients.producer(self.settings, self.bootstrap)
        subscriptions = list(subscription_events(ds, self.catalog))
        usage = list(usage_events(ds, self.catalog))
        n = publish(producer, SUBSCRIPTIONS, subscriptions)
        n += publish(producer, USAGE, usage)
        # the reference: the same events through the offline rater
        self.offline_lines += [record_to_json_line("sub", r) for r in subscriptions]
        self.offline_lines += [record_to_json_line("usage", r) for r in usage]
        issue_bill_run(self.settings, self.bootstrap, DEFAULT_UNTIL)
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

    # -- faults --

    def kill_processors(self, outcome: Outcome) -> None:
        assert self.supervisor
        order = [p for p in PROCESSORS for _ in range(self.plan.kills_per_processor)]
        self.rng.shuffle(order)
        for name in order:
            self._sleep(self.rng.uniform(0.3, 2.0))
            self.supervisor.kill(name)  # SIGKILL: no flush, no commit, no goodbye
            outcome.faults += 1
            self.console.print(f"  SIGKILL {name}", highlight=False)

    def lose_a_broker(self, outcome: Outcome) -> None:
        if self.cluster_env is None:
            outcome.notes.append("skipped: a configured cluster's brokers are not ours to kill")
            return
        node = self.rng.randint(1, BROKERS)
        pid_file = Path(self.cluster_env["STREAMBILL_KAFKA_DIR"]) / f"node-{node}" / "pid"
        self._sleep(1.0)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        outcome.faults += 1
        self.console.print(f"  SIGKILL broker {node} for {self.plan.broker_down_s:.0f} s")
        self._sleep(self.plan.broker_down_s)
        start_local_node(node, env=self.cluster_env)
        self.console.print(f"  broker {node} is back")

    def warehouse_outage(self, outcome: Outcome) -> None:
        switch = outage_switch(self.settings)
        switch.parent.mkdir(parents=True, exist_ok=True)
        self._sleep(0.5)
        switch.touch()
        outcome.faults += 1
        self.console.print(f"  warehouse down for {self.plan.outage_s:.0f} s")
        try:
            self._sleep(self.plan.outage_s)
        finally:
            switch.unlink(missing_ok=True)

    def gateway_outage(self, outcome: Outcome) -> None:
        assert self.simulator
        self._sleep(0.5)
        body = json.dumps({"seconds": self.plan.outage_s}).encode()
        request = urllib.request.Request(f"{self.simulator.url}/v1/admin/outage", data=body,
                                         method="POST")  # fmt: skip
        with urllib.request.urlopen(request, timeout=10):
            pass
        outcome.faults += 1
        self.console.print(
            f"  gateway down (every merchant account) for {self.plan.outage_s:.0f} s"
        )
        self._sleep(self.plan.outage_s)

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
        refunds = self._warehouse("SELECT count(), uniqExact(refund_id) FROM refunds FINAL")
        _, payable, settled_now = self.progress()
        evidence = Evidence(
            expected={
                inv.invoice_id: inv.total
                for inv in rate_events(self.catalog, self.offline_lines, DEFAULT_UNTIL).invoices
            },
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
            warehouse_refunds=(int(refunds[0][0]), int(refunds[0][1])),
        )
        self.new_attempts = evidence.warehouse_attempts[0] - self.attempts_seen
        self.attempts_seen = evidence.warehouse_attempts[0]
        return judge(evidence)

    def _ledger(self) -> list[dict[str, Any]]:
        import asyncio

        from streams.payments.http_gateway import fetch_ledger

        assert self.simulator
        return asyncio.run(fetch_ledger(self.simulator.url))

    def _reconcile(self) -> bool:
        """`streambill reconcile`, the command an operator runs, as a separate process."""
        assert self.simulator
        out = self.settings.home / "reconcile.json"
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
               "STREAMBILL_HOME": str(self.settings.home),
               "STREAMBILL_NAMESPACE": current_namespace(),
               "STREAMBILL_GATEWAY_URL": self.simulator.url}  # fmt: skip
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
        faults: dict[str, Callable[[Outcome], None]] = {
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
                inputs = self.publish_batch(k) + self.publish_refunds(k)
                faults[scenario](outcome)
                settled = self.wait_settled(scenario)
                outcome.invariants = self.invariants(settled)
                outcome.seconds = time.monotonic() - started
                outcome.events = (
                    inputs + self.published.invoices - invoices_before + self.new_attempts
                )
                self.supervisor.unplanned_exits.clear()
                outcomes.append(outcome)
                broken = [k for k, ok in outcome.invariants.items() if not ok]
                self.console.print(
                    f"  {outcome.faults} faults, {outcome.events} events, invariants "
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
        outcomes = chaos.run(scenarios)
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
    for col in ("faults", "events", "invariants held", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for o in outcomes:
        ok = o.held == len(o.invariants)
        held = f"{o.held}/{len(o.invariants)}"
        table.add_row(o.scenario + (f" ({'; '.join(o.notes)})" if o.notes else ""), str(o.faults),
                      f"{o.events:,}", f"[green]{held}[/]" if ok else f"[red]{held}[/]",
                      f"{o.seconds:.0f}")  # fmt: skip
    console.print(table)
