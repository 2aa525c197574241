"""`streambill bench billrun`: from the clock passing the period end of N subscriptions to
the last invoice landed in ClickHouse."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from streams.config import Settings
from streams.kafka.topics import INVOICES, SUBSCRIPTIONS, USAGE, group_id
from streams.processors.rating import GROUP
from streams.publish import issue_bill_run
from streams.stack import ProcessorProcess, wait_for_warehouse_endpoint
from streams.testbed.bench.harness import (
    bench_env,
    committed_lag,
    peak_rss_mb,
    produce_encoded,
    start_rating,
    wait,
)
from streams.testbed.bench.inputs import (
    PERIOD_END,
    encoded_subscriptions,
    encoded_usage,
    monthly_plans,
    subscription_stamps,
    unique_catalog,
    usage_stamps,
)
from streams.testbed.duplicates import topic_copies, warehouse_copies
from streams.ui import progress_bar
from streams.warehouse import query


def run(
    base: Settings,
    subscriptions: int,
    workers: int,
    usage_per_sub: int,
    console: Console,
    unique_every: int = 0,
) -> dict[str, Any]:
    """From the clock passing the period end to the last invoice landed in ClickHouse.
    unique_every k: every k-th subscription on a plan with a unique_count charge, its usage
    naming users (the rating contract's version 2 only)."""
    if unique_every and base.rating_contract != 2:
        raise ValueError("a unique_count charge needs STREAMBILL_RATING_CONTRACT=2")
    with bench_env(base, base.partitions) as env:
        plans = monthly_plans()
        sub_items = encoded_subscriptions(subscriptions, plans, unique_every)
        usage_items = encoded_usage(subscriptions, usage_per_sub, unique_every=unique_every)
        sink = ProcessorProcess(env.settings, env.bootstrap, "sink").start()
        catalog = unique_catalog(env.settings.home / "catalog.json") if unique_every else None
        rating = start_rating(env, workers, catalog=catalog)
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
                produce_encoded(
                    env,
                    SUBSCRIPTIONS,
                    sub_items,
                    lambda n: progress.advance(task, n),
                    subscription_stamps(len(sub_items)),
                )
                produce_encoded(
                    env,
                    USAGE,
                    usage_items,
                    lambda n: progress.advance(task, n),
                    usage_stamps(subscriptions, usage_per_sub),
                )
                task = progress.add_task("rated + landed (not timed)", total=subscriptions)

                def ingested() -> bool:
                    done = landed("created")
                    progress.update(task, completed=done)
                    lag = committed_lag(env, group, [SUBSCRIPTIONS.name, USAGE.name])
                    return lag == 0 and done >= subscriptions

                wait(ingested, procs, 3600, "ingestion")
                task = progress.add_task("bill run → ClickHouse", total=subscriptions)
                started = time.perf_counter()
                issue_bill_run(env.settings, env.bootstrap, PERIOD_END)

                def closed() -> bool:
                    done = landed("period_end")
                    progress.update(task, completed=done)
                    return done >= subscriptions

                wait(closed, procs, 3600, "the bill run")
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
