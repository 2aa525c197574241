"""`streambill bench kafka`: raw produce, then consume, of usage-sized Avro records on the
same broker (the ceiling the processors run under)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import USAGE, group_id
from streams.testbed.bench.harness import bench_env, produce_encoded
from streams.testbed.bench.inputs import encoded_usage
from streams.ui import progress_bar


def run(base: Settings, messages: int, console: Console) -> dict[str, Any]:
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
