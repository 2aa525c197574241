"""`streambill bench sink`: invoice lines landed in the embedded warehouse by the sink
catching up on a topic that already holds them."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from streams.config import Settings
from streams.kafka.topics import INVOICES
from streams.stack import ProcessorProcess, wait_for_warehouse_endpoint
from streams.testbed.bench.harness import bench_env, peak_rss_mb, produce_encoded, wait
from streams.testbed.bench.inputs import encoded_invoices
from streams.ui import progress_bar
from streams.warehouse import query


def run(base: Settings, rows: int, lines_per_invoice: int, console: Console) -> dict[str, Any]:
    """Invoice lines landed in the embedded warehouse by the sink catching up on a topic
    that already holds them: from the sink having opened the warehouse (it consumes right
    after) to the last row queryable."""
    with bench_env(base, base.partitions) as env:
        items = encoded_invoices(rows, lines_per_invoice)
        expected = len(items) * lines_per_invoice
        with progress_bar(console) as progress:
            task = progress.add_task("invoices produced (not timed)", total=len(items))
            produce_encoded(env, INVOICES, items, lambda n: progress.advance(task, n))
            del items
            sink = ProcessorProcess(env.settings, env.bootstrap, "sink").start()
            try:
                wait_for_warehouse_endpoint(env.settings, sink)
                started = time.perf_counter()
                task = progress.add_task("invoice lines landed", total=expected)

                def landed() -> bool:
                    sql = "SELECT count() FROM invoice_lines"
                    done = int(query(env.settings, sql)["rows"][0][0])
                    progress.update(task, completed=done)
                    return done >= expected

                wait(landed, [sink], 3600, "the sink")
                seconds = time.perf_counter() - started
                counts = query(
                    env.settings,
                    "SELECT (SELECT count() FROM invoice_lines FINAL), "
                    "(SELECT count() FROM invoices FINAL)",
                )["rows"][0]
                rss = peak_rss_mb(sink.proc.pid) if sink.proc else 0.0
            finally:
                sink.stop()
    return {
        "rows": int(counts[0]),
        "invoices": int(counts[1]),
        "seconds": round(seconds, 3),
        "rows_per_s": round(int(counts[0]) / seconds),
        "invoices_per_s": round(int(counts[1]) / seconds),
        "peak_rss_mb": round(rss, 1),
    }
