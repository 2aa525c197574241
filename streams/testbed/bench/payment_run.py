"""`streambill bench payment-run`: due invoices collected by the payments processor
through the gateway simulator (4 merchant accounts), then reconciled."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from streams.config import Settings
from streams.domain.payments import parse_schedule
from streams.kafka.topics import INVOICES
from streams.payments.http_gateway import fetch_stats
from streams.payments.reconcile import collect, reconcile
from streams.stack import ProcessorProcess, wait_for_warehouse_endpoint
from streams.testbed.bench.harness import bench_env, peak_rss_mb, produce_encoded, wait
from streams.testbed.bench.inputs import encoded_due_invoices
from streams.testbed.gateway_simulator import AccountConfig, SimulatorConfig, SimulatorProcess
from streams.ui import progress_bar
from streams.warehouse import query


def run(
    base: Settings,
    payments: int,
    workers: int,
    decline_rate: float,
    transient_rate: float,
    console: Console,
) -> dict[str, Any]:
    """The payments processor against the simulator (4 merchant accounts): from the
    first due invoice published to the last first-attempt result in ClickHouse."""
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

                wait(landed, procs, 3600, "the payment run")
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
