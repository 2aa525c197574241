"""`streambill bench usage`: usage ingested and aggregated by the rating processor, until
committed in its state."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from streams.config import Settings
from streams.kafka.topics import SUBSCRIPTIONS, USAGE, group_id
from streams.processors.rating import GROUP
from streams.testbed.bench.harness import (
    CommittedLag,
    bench_env,
    committed_lag,
    peak_rss_mb,
    produce_encoded,
    start_rating,
    wait,
    wait_for_members,
)
from streams.testbed.bench.inputs import (
    encoded_subscriptions,
    encoded_usage,
    monthly_plans,
    subscription_stamps,
    usage_stamps,
)
from streams.ui import progress_bar


def run(base: Settings, events: int, workers: int, console: Console) -> dict[str, Any]:
    """Usage ingested and aggregated by the rating processor (committed in its state)."""
    per_sub = 10
    subs = max(1, events // per_sub)
    with bench_env(base, base.partitions) as env:
        plans = monthly_plans()
        sub_items = encoded_subscriptions(subs, plans)
        usage_items = encoded_usage(subs, per_sub)
        rating = start_rating(env, workers)
        group = group_id(GROUP)
        try:
            with progress_bar(console) as progress:
                task = progress.add_task("subscriptions (not timed)", total=subs)
                produce_encoded(
                    env,
                    SUBSCRIPTIONS,
                    sub_items,
                    lambda n: progress.advance(task, n),
                    subscription_stamps(len(sub_items)),
                )
                # every worker in the group first: one joining later would rebalance the
                # group (and restore state) inside the timed window
                wait_for_members(env, group, workers, rating)
                wait(lambda: committed_lag(env, group, [SUBSCRIPTIONS.name]) == 0, rating, 600,
                      "subscriptions")  # fmt: skip
                task = progress.add_task("usage ingested", total=len(usage_items))
                started = time.perf_counter()
                produce_encoded(
                    env, USAGE, usage_items, lambda n: None, usage_stamps(subs, per_sub)
                )
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
