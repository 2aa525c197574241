"""`streambill bench signup-spike`: a launch-weekend signup spike through the ingestion
API, every accepted signup then looked for in Kafka and in ClickHouse."""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any

import uvloop
from rich.console import Console

from streams.api.tenants import Tenant, hash_key, new_key, save
from streams.config import Settings
from streams.kafka.topics import SUBSCRIPTIONS
from streams.stack import ProcessorProcess, start_api, wait_for_warehouse_endpoint
from streams.testbed.bench.harness import bench_env, peak_rss_mb, percentile, wait
from streams.testbed.duplicates import topic_copies
from streams.testbed.loadgen import run_load, signup_request
from streams.ui import progress_bar
from streams.warehouse import query


def run(
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
                wait(landed, [sink], 120, "the sink")
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
