"""The payments processor on the real broker, chDB and the gateway simulator (a real
HTTP server in its own process): charges, transient failures retried with the same key,
dunning through the retry topics, crashes, an outage behind the circuit breaker, a
payment run, and reconciliation of the ledger, the results topic and ClickHouse."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from streams.codec import codec
from streams.config import Settings
from streams.domain.payments import parse_schedule
from streams.kafka import clients
from streams.kafka.topics import INVOICES
from streams.payments.http_gateway import fetch_ledger
from streams.payments.reconcile import collect, reconcile
from streams.stack import ProcessorProcess
from streams.testbed.gateway_simulator import AccountConfig, SimulatorConfig, SimulatorProcess
from tests.integration.helpers import Procs, scalar, start_sink, wait_until

pytestmark = pytest.mark.kafka


def invoice(i: int, token: str, total: str = "25.50") -> dict[str, Any]:
    now = datetime.now(UTC)
    amount = Decimal(total)
    return {
        "invoice_id": f"inv-{i:05d}", "account_id": f"acct-{i:05d}",
        "subscription_id": f"sub-{i:05d}", "plan_id": "pro-usd", "currency": "USD",
        "issued_at": now, "reason": "period_end",
        "lines": [{"charge_id": "base", "kind": "flat", "period_start": now,
                   "period_end": now + timedelta(days=30), "quantity": Decimal(1),
                   "amount": amount}],
        "total": amount, "payment_method": token,
    }  # fmt: skip


def publish_invoices(settings: Settings, bootstrap: str, invoices: list[dict]) -> None:
    producer = clients.producer(settings, bootstrap)
    encode = codec(INVOICES.schema).encode
    for inv in invoices:
        producer.produce(INVOICES.name, key=inv["account_id"].encode(), value=encode(inv))
    assert producer.flush(30) == 0


@pytest.fixture
def simulator(pipeline_env: Settings, request: pytest.FixtureRequest) -> Iterator[Any]:
    account = AccountConfig(
        max_concurrency=20, latency_median_ms=15, latency_p99_ms=60, decline_rate=0.0,
        transient_rate=getattr(request, "param", 0.15), timeout_delay_s=1.0,
    )  # fmt: skip
    config = SimulatorConfig(accounts={"merchant-1": account, "merchant-2": account}, seed=3)
    sim = SimulatorProcess.start(config, pipeline_env.home / "logs")
    yield sim
    sim.stop()


def gateway_env(url: str) -> dict[str, str]:
    return {"STREAMBILL_GATEWAY_URL": url, "STREAMBILL_MERCHANT_ACCOUNTS": "merchant-1,merchant-2",
            "STREAMBILL_GATEWAY_MAX_CONCURRENCY": "20", "STREAMBILL_PRIORITY_RESERVE": "2",
            "STREAMBILL_GATEWAY_TIMEOUT": "0.5"}  # fmt: skip


def slowed_gateway(settings: Settings, latency_ms: float, seed: int) -> SimulatorProcess:
    """The simulator with two merchant accounts of 2 calls at a time each, answering in
    about `latency_ms`, declining nothing: about 4 / latency charges a second."""
    slow = AccountConfig(max_concurrency=2, latency_median_ms=latency_ms,
                         latency_p99_ms=latency_ms * 1.5, decline_rate=0.0)  # fmt: skip
    accounts = {"merchant-1": slow, "merchant-2": slow}
    return SimulatorProcess.start(SimulatorConfig(accounts=accounts, seed=seed),
                                  settings.home / "logs")  # fmt: skip


def start_payments(settings: Settings, bootstrap: str, url: str, dunning: str) -> ProcessorProcess:
    env = {**gateway_env(url), "STREAMBILL_DUNNING": dunning}
    return ProcessorProcess(settings, bootstrap, "payments", env=env).start()


def statuses(settings: Settings) -> Counter:
    rows = scalar(settings, "SELECT groupArray((status, attempt)) FROM payment_attempts FINAL")
    return Counter((s, int(a)) for s, a in rows)


def test_payments_survive_crashes_and_transient_failures_without_a_double_charge(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, simulator: Any
) -> None:
    settings = pipeline_env
    declining = set(range(0, 300, 10))
    invoices = [invoice(i, f"tok_decline_{i}" if i in declining else f"tok_ok_{i}")
                for i in range(300)]  # fmt: skip
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    payer = procs.add(start_payments(settings, kafka_bootstrap, simulator.url, "1s,2s"))
    publish_invoices(settings, kafka_bootstrap, invoices)

    rng = random.Random(11)
    for _ in range(3):  # SIGKILL in the middle of charging, retrying and dunning
        time.sleep(rng.uniform(0.5, 2.0))
        payer.kill()
        payer = procs.add(start_payments(settings, kafka_bootstrap, simulator.url, "1s,2s"))

    def settled() -> bool:
        got = statuses(settings)
        return got[("succeeded", 1)] == 270 and got[("uncollectible", 3)] == 30

    wait_until(settled, 120, "every invoice paid or uncollectible", [sink, payer, simulator])
    time.sleep(1.5)
    got = statuses(settings)
    assert got == Counter({("succeeded", 1): 270, ("declined", 1): 30, ("declined", 2): 30,
                           ("declined", 3): 30, ("uncollectible", 3): 30})  # fmt: skip

    ledger = asyncio.run(fetch_ledger(simulator.url))
    paid = Counter(e["invoice_id"] for e in ledger
                   if e["kind"] == "charge" and e["status"] == "succeeded")  # fmt: skip
    assert len(paid) == 270 and set(paid.values()) == {1}  # never twice
    keys = Counter(e["idempotency_key"] for e in ledger if e["kind"] == "charge")
    assert set(keys.values()) == {1}  # one ledger entry per idempotency key
    assert len(keys) == 270 + 30 * 3

    # amounts due, each decline from its token, each write-off after every attempt of "1s,2s"
    report = reconcile(*collect(settings, kafka_bootstrap, simulator.url),
                       schedule=parse_schedule("1s,2s"))  # fmt: skip
    assert report.reconciled, report.differences[:10]
    assert report.invoices == {"paid": 270, "uncollectible": 30}
    assert report.totals["USD"]["gateway"] == Decimal("25.50") * 270


@pytest.mark.parametrize("simulator", [0.0], indirect=True)
def test_an_outage_opens_the_circuit_and_nothing_is_lost(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, simulator: Any
) -> None:
    import json
    import urllib.request

    settings = pipeline_env
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    payer = procs.add(start_payments(settings, kafka_bootstrap, simulator.url, "1d"))
    outage = urllib.request.Request(
        f"{simulator.url}/v1/admin/outage", data=json.dumps({"seconds": 4}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    urllib.request.urlopen(outage, timeout=5).read()
    publish_invoices(settings, kafka_bootstrap, [invoice(i, f"tok_ok_{i}") for i in range(100)])
    paid = "SELECT count() FROM payment_attempts FINAL WHERE status = 'succeeded'"
    time.sleep(2)
    assert scalar(settings, paid) == 0  # the gateway is down
    wait_until(lambda: scalar(settings, paid) == 100, 90, "payments", [sink, payer, simulator])
    log = payer.log_path.read_text()
    assert "circuit open" in log and "circuit closed" in log
    report = reconcile(*collect(settings, kafka_bootstrap, simulator.url),
                       schedule=parse_schedule("1d"))  # fmt: skip
    assert report.reconciled and report.invoices == {"paid": 100}


@pytest.mark.parametrize("simulator", [0.0], indirect=True)
def test_payment_run_collects_dunning_retries_due_by_its_date(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, simulator: Any
) -> None:
    settings = pipeline_env
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    payer = procs.add(start_payments(settings, kafka_bootstrap, simulator.url, "1d,3d"))
    invoices = [invoice(i, f"tok_decline_{i}" if i < 5 else f"tok_ok_{i}") for i in range(20)]
    publish_invoices(settings, kafka_bootstrap, invoices)
    wait_until(lambda: sum(statuses(settings).values()) >= 20, 60, "first attempts",
               [sink, payer])  # fmt: skip
    time.sleep(1)
    assert statuses(settings) == Counter({("succeeded", 1): 15, ("declined", 1): 5})

    # the retries wait a day: a payment run up to two days ahead collects them now
    payment_run(days_ahead=2)
    got = statuses(settings)
    assert got[("declined", 2)] == 5 and got[("declined", 3)] == 0  # 3rd attempt: day 4
    payment_run(days_ahead=5)
    got = statuses(settings)
    assert got[("declined", 3)] == 5 and got[("uncollectible", 3)] == 5
    assert payer.alive


def payment_run(days_ahead: int) -> None:
    """`streambill payment-run` up to `days_ahead` days from now; it waits for the run."""
    until = (datetime.now(UTC) + timedelta(days=days_ahead)).isoformat()
    run = subprocess.run([sys.executable, "-m", "streams.cli", "payment-run", "--until", until,
                          "--timeout", "60"], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("simulator", [0.0], indirect=True)
def test_a_dunning_retry_charges_the_card_the_customer_gave_since(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, simulator: Any
) -> None:
    """Four invoices declined on their first attempt; two customers then give a new card
    (`streambill customer set`): their retries charge it and succeed, the two others are
    declined again on the card of the invoice. Results, warehouse and ledger name the card
    charged, and reconcile accepts a card the customer gave (and nothing else)."""
    settings = pipeline_env
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    payer = procs.add(start_payments(settings, kafka_bootstrap, simulator.url, "1d,3d"))
    publish_invoices(settings, kafka_bootstrap, [invoice(i, f"tok_decline_{i}") for i in range(4)])
    wait_until(lambda: statuses(settings)[("declined", 1)] == 4, 60, "first attempts",
               [sink, payer])  # fmt: skip

    for i in (0, 1):
        run = subprocess.run([sys.executable, "-m", "streams.cli", "customer", "set",
                              f"acct-{i:05d}", "--country", "FR",
                              "--payment-method", f"tok_ok_new_{i}"],
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert json.loads(run.stdout)["payment_method"] == f"tok_ok_new_{i}"
    shown = subprocess.run([sys.executable, "-m", "streams.cli", "customer", "show", "acct-00000"],
                           capture_output=True, text=True)  # fmt: skip
    assert json.loads(shown.stdout)["country"] == "FR"
    # a change keeps the other fields of the record
    run = subprocess.run([sys.executable, "-m", "streams.cli", "customer", "set", "acct-00000",
                          "--grace-hours", "24", "--address", r"Main St 1\nAmsterdam"],
                         capture_output=True, text=True)  # fmt: skip
    assert json.loads(run.stdout) | {"updated_at": None} == {
        "account_id": "acct-00000", "name": None, "email": None,
        "address": "Main St 1\nAmsterdam", "country": "FR",
        "tax_exempt": False, "grace_hours": 24, "payment_method": "tok_ok_new_0",
        "updated_at": None,
    }  # fmt: skip

    payment_run(days_ahead=2)
    rows = scalar(settings, "SELECT groupArray((invoice_id, status, payment_method)) "
                            "FROM payment_attempts FINAL WHERE attempt = 2")  # fmt: skip
    assert sorted(map(tuple, rows)) == [
        ("inv-00000", "succeeded", "tok_ok_new_0"),
        ("inv-00001", "succeeded", "tok_ok_new_1"),
        ("inv-00002", "declined", "tok_decline_2"),
        ("inv-00003", "declined", "tok_decline_3"),
    ]
    ledger = asyncio.run(fetch_ledger(simulator.url))
    paid = {e["invoice_id"]: e["payment_method"] for e in ledger
            if e["kind"] == "charge" and e["status"] == "succeeded"}  # fmt: skip
    assert paid == {"inv-00000": "tok_ok_new_0", "inv-00001": "tok_ok_new_1"}
    wait_until(lambda: scalar(settings, "SELECT count() FROM customers FINAL") == 3, 30,
               "the customer records landed", [sink])  # fmt: skip
    sources = collect(settings, kafka_bootstrap, simulator.url)
    report = reconcile(*sources, schedule=parse_schedule("1d,3d"))
    assert report.reconciled, report.differences[:10]
    # a card nobody gave is still another card
    forged = sources._replace(customer_cards={})
    kinds = {d["kind"] for d in reconcile(*forged, schedule=parse_schedule("1d,3d")).differences}
    assert kinds == {"charged_another_card"}
    assert payer.alive


def test_a_capacity_answer_predicts_a_measured_payment_run_within_a_quarter(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, tmp_path: Any
) -> None:
    """A gateway slowed to about 40 charges a second: a first payment run of 400 is
    recorded; `streambill capacity --payments 1200` then predicts the next run from it,
    and a run of 1200 takes the predicted time within 25 %."""
    settings = pipeline_env
    sim = slowed_gateway(settings, latency_ms=100, seed=2)
    try:
        sink = procs.add(start_sink(settings, kafka_bootstrap))
        payer = procs.add(start_payments(settings, kafka_bootstrap, sim.url, "1d"))
        tomorrow = datetime.now(UTC) + timedelta(days=1)  # held until a payment run
        first = [{**invoice(i, f"tok_ok_{i}"), "issued_at": tomorrow} for i in range(400)]
        publish_invoices(settings, kafka_bootstrap, first)
        wait_until(lambda: scalar(settings, "SELECT count() FROM invoices FINAL") == 400, 60,
                   "the first invoices landed", [sink, payer])  # fmt: skip
        payment_run(days_ahead=2)
        (recorded,) = (settings.home / "runs").glob("payment-run-*.json")
        assert json.loads(recorded.read_text())["items"] == 400

        later = tomorrow + timedelta(days=2)
        second = [{**invoice(i, f"tok_ok_{i}"), "issued_at": later} for i in range(400, 1600)]
        publish_invoices(settings, kafka_bootstrap, second)
        wait_until(lambda: scalar(settings, "SELECT count() FROM invoices FINAL") == 1600, 60,
                   "the second invoices landed", [sink, payer])  # fmt: skip
        out = tmp_path / "capacity.json"
        run = subprocess.run([sys.executable, "-m", "streams.cli", "capacity", "--payments",
                              "1200", "--window", "1h", "--json", str(out)],
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        predicted = json.loads(out.read_text())
        assert predicted["workers_now"] == 1 and predicted["fits_now"]
        assert predicted["measured"]["source"].startswith("run recorded")
        started = time.monotonic()
        payment_run(days_ahead=4)
        measured = time.monotonic() - started
        assert abs(predicted["seconds_now"] - measured) <= 0.25 * measured, (predicted, measured)
        assert payer.alive
    finally:
        sim.stop()
