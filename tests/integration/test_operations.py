"""Operations on the real broker: every processor's metrics endpoint, consumer lag as
the broker sees it, and scaling a processor with the rebalance shown."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from streams import metrics
from streams.config import Settings
from streams.kafka import clients
from streams.kafka.lag import group_lags
from streams.kafka.topics import ALL_TOPICS, SUBSCRIPTIONS, group_id
from tests.integration.helpers import Procs, start_rating, start_sink, wait_until
from tests.integration.test_lanes import event, produce

pytestmark = pytest.mark.kafka


def scrape(settings: Settings, processor: str) -> str:
    """The processor's metrics ("" until it has advertised its endpoint)."""
    found = [e for e in metrics.endpoints(settings) if e["processor"] == processor]
    assert len(found) <= 1, found
    if not found:
        return ""
    with urllib.request.urlopen(found[0]["url"], timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_processors_expose_metrics_and_lag_is_reported(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    rating = procs.add(start_rating(settings, kafka_bootstrap))
    created = [event("created", f"e-{i}", f"acct-{i % 7}", f"sub-{i}", plan_id="pro-usd")
               for i in range(40)]  # fmt: skip
    produce(settings, kafka_bootstrap, SUBSCRIPTIONS, created)

    def counted() -> bool:
        text = scrape(settings, "rating")
        return sample(text, "streambill_invoices_total") >= 40

    wait_until(counted, 60, "rating's metrics", [rating, sink])
    text = scrape(settings, "rating")
    assert sample(text, "streambill_records_total", processor="rating",
                  topic=SUBSCRIPTIONS.name) == 40  # fmt: skip
    assert sample(text, "streambill_batch_seconds_count", processor="rating") >= 1

    def landed() -> bool:
        return sample(scrape(settings, "sink"), "streambill_records_total", processor="sink") >= 80

    wait_until(landed, 60, "the sink's metrics", [sink])
    assert "streambill_consumer_lag{" in scrape(settings, "sink")

    # the broker's view: rating committed everything it read
    rows = group_lags(settings, kafka_bootstrap)
    rating_rows = [r for r in rows if r.group == group_id("streambill-rating")
                   and r.topic == SUBSCRIPTIONS.name]  # fmt: skip
    assert rating_rows and sum(r.lag for r in rating_rows) == 0
    assert sum(r.end for r in rating_rows) == 40
    cli = subprocess.run([sys.executable, "-m", "streams.cli", "lag", "--json"],
                         capture_output=True, text=True, timeout=60, env=os.environ)  # fmt: skip
    assert cli.returncode == 0 and '"group"' in cli.stdout, cli.stderr[-2000:]


def test_scale_runs_workers_in_one_group_and_shows_the_rebalance(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "streams.cli", "scale", "payments", "2", "--for", "25"],
        capture_output=True, text=True, timeout=120, env=os.environ,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    shown = run.stderr
    assert "rebalance: 2 member(s)" in shown, shown
    # with both members in, every partition of the payments topics has exactly one owner
    last = shown[shown.rindex("rebalance: 2 member(s)") :]
    owned = [part for line in last.splitlines()[1:3] for part in line.split(" — ")[1].split(", ")]
    assert len(owned) == len(set(owned)) > 0
    assert "payments: 2 worker(s) stopped" in shown


def test_sigterm_lets_in_flight_payments_finish_and_nothing_is_half_sent(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    import asyncio
    from collections import Counter

    from streams.kafka.topics import PAYMENT_RESULTS
    from streams.payments.http_gateway import fetch_ledger
    from streams.publish import read_topic
    from streams.testbed.gateway_simulator import AccountConfig, SimulatorConfig, SimulatorProcess
    from tests.integration.test_payments import invoice, publish_invoices, start_payments

    settings = pipeline_env
    slow = AccountConfig(max_concurrency=20, latency_median_ms=400, latency_p99_ms=900,
                         decline_rate=0.0)  # fmt: skip
    sim = SimulatorProcess.start(SimulatorConfig(accounts={"merchant-1": slow,
                                                           "merchant-2": slow}, seed=3),
                                 settings.home / "logs")  # fmt: skip
    try:
        invoices = [invoice(i, f"tok_ok_{i}") for i in range(400)]
        publish_invoices(settings, kafka_bootstrap, invoices)
        payer = start_payments(settings, kafka_bootstrap, sim.url, "1d")

        def results() -> list[dict]:
            return read_topic(settings, kafka_bootstrap, PAYMENT_RESULTS)

        wait_until(lambda: len(results()) >= 10, 60, "the first results", [payer])
        assert payer.stop(timeout=60) == 0  # SIGTERM: a clean exit after the drain
        ledger = asyncio.run(fetch_ledger(sim.url))
        charged = {e["invoice_id"] for e in ledger if e["kind"] == "charge"}
        answered = {r["invoice_id"] for r in results()}
        assert len(answered) < len(invoices)  # it did stop part-way
        assert charged <= answered  # every charge the gateway made has its result

        procs.add(start_payments(settings, kafka_bootstrap, sim.url, "1d"))
        wait_until(lambda: len({r["invoice_id"] for r in results()}) == len(invoices), 90,
                   "every invoice paid after the restart")  # fmt: skip
        ledger = asyncio.run(fetch_ledger(sim.url))
        per_invoice = Counter(e["invoice_id"] for e in ledger
                              if e["kind"] == "charge" and e["status"] == "succeeded")  # fmt: skip
        assert len(per_invoice) == len(invoices) and set(per_invoice.values()) == {1}
    finally:
        sim.stop()


def test_topics_grow_partitions_and_refuse_to_move_keyed_data_silently(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    def topics(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "streams.cli", "topics", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)

    def counts() -> set[int]:
        meta = clients.admin(pipeline_env, kafka_bootstrap).list_topics(timeout=30).topics
        return {len(meta[t.name].partitions) for t in ALL_TOPICS}

    assert topics("--partitions", "6").returncode == 0 and counts() == {6}
    produce(pipeline_env, kafka_bootstrap, SUBSCRIPTIONS,
            [event("created", "e-1", "acct-1", "sub-1", plan_id="pro-usd")])  # fmt: skip
    refused = topics("--partitions", "8")
    assert refused.returncode == 2 and "rating state" in refused.stderr and counts() == {6}
    assert topics("--partitions", "8", "--force").returncode == 0 and counts() == {8}
