"""Prometheus metrics: every metric any process exposes is declared here, once, so that
dashboards, alert rules and the Kubernetes manifests can be checked against one list.

Each processor process serves its registry on an HTTP port (``Settings.metrics_port``,
default: any free port) and advertises it in ``$STREAMBILL_HOME/metrics/<name>-<pid>.json``
so that the dashboard and ``streambill lag`` find every process on this machine.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from streams.config import Settings

RECORDS = Counter("streambill_records_total", "records consumed by a processor",
                  ["processor", "topic"])  # fmt: skip
DEAD_LETTERS = Counter("streambill_dead_letters_total", "records sent to the dead letters",
                       ["processor", "reason"])  # fmt: skip
BATCH_SECONDS = Histogram("streambill_batch_seconds", "time to process one batch",
                          ["processor"],
                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))  # fmt: skip
CONSUMER_LAG = Gauge("streambill_consumer_lag", "records behind the end of a partition",
                     ["processor", "topic", "partition"])  # fmt: skip
WAREHOUSE_RETRIES = Counter("streambill_warehouse_retries_total",
                            "batches held back because the warehouse was unavailable",
                            ["processor"])  # fmt: skip
COMMIT_FAILURES = Counter("streambill_commit_failures_total",
                          "offset commits refused by the group (rebalance, coordinator moved)",
                          ["processor"])  # fmt: skip
GC_PAUSE_SECONDS = Histogram("streambill_gc_pause_seconds",
                             "cyclic garbage collection pauses of the process",
                             ["generation"],
                             buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1))  # fmt: skip
TABLE_RECORDS = Counter("streambill_table_records_total",
                        "records of a compacted topic a processor keeps as a table",
                        ["processor", "topic", "outcome"])  # fmt: skip
RUN_ETA = Gauge("streambill_run_eta_seconds",
                "a bill run's or payment run's time to go at its rate of the last minutes",
                ["kind", "run"])  # fmt: skip
RUN_MARGIN = Gauge("streambill_run_deadline_margin_seconds",
                   "a run's deadline less its projected finish (negative: it will miss it)",
                   ["kind", "run"])  # fmt: skip
INVOICES_EMITTED = Counter("streambill_invoices_total", "invoices emitted by the rating processor")
PAYMENTS = Counter("streambill_payments_total", "payment attempts by outcome", ["status"])
GATEWAY_SECONDS = Histogram("streambill_gateway_call_seconds", "gateway call latency",
                            ["processor", "kind"],
                            buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10))  # fmt: skip
GATEWAY_IN_FLIGHT = Gauge("streambill_gateway_in_flight", "gateway calls in flight",
                          ["processor", "account"])  # fmt: skip
GATEWAY_LIMIT = Gauge("streambill_gateway_limit",
                      "calls a gateway account may have in flight now (its AIMD limit)",
                      ["processor", "account"])  # fmt: skip
LATE_LOOKUPS = Counter("streambill_gateway_late_lookups_total",
                      "charges whose answer was late, looked up by idempotency key meanwhile",
                      ["account", "found"])  # fmt: skip
CIRCUIT_OPEN = Gauge("streambill_circuit_open", "1 while a gateway account's breaker is open",
                     ["processor", "account"])  # fmt: skip
LANE_REQUESTS = Counter("streambill_lane_requests_total", "urgent workflow requests",
                        ["lane", "workflow", "outcome"])  # fmt: skip
REFUND_SECONDS = Histogram("streambill_refund_seconds",
                           "refund requested -> result published",
                           buckets=(.05, .1, .2, .3, .5, .75, 1, 2, 5))  # fmt: skip
# where an urgent request's time goes: queued (its produce -> the lane consumed it),
# decide (-> its gateway call may start), slot (waiting for a reserved gateway slot),
# gateway (the call itself, as the lane sees it), publish (answer -> results produced)
LANE_STAGE_SECONDS = Histogram("streambill_lane_stage_seconds",
                               "time of one stage of an urgent request", ["lane", "stage"],
                               buckets=(.001, .005, .01, .025, .05, .1, .2, .3, .5, 1, 2,
                                        5))  # fmt: skip
# the ingestion API (streams/api/server.py)
API_REQUESTS = Counter("streambill_api_requests_total", "API requests answered",
                       ["route", "status"])  # fmt: skip
API_TENANT_ERRORS = Counter("streambill_api_tenant_errors_total",
                            "API requests of a tenant answered 4xx/5xx",
                            ["tenant", "status"])  # fmt: skip
API_LATENCY = Histogram("streambill_api_request_seconds", "API request latency", ["route"],
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                 2.5, 5))  # fmt: skip
API_IN_FLIGHT = Gauge("streambill_api_in_flight", "API requests in progress")
API_EVENTS = Counter("streambill_api_events_total", "events accepted into Kafka", ["topic"])
API_KAFKA_DOWN = Gauge("streambill_api_kafka_unavailable", "1 while Kafka is known to be down")


def metrics_dir(settings: Settings) -> Path:
    return settings.home / "metrics"


class GcPauses:
    """Every cyclic garbage collection timed: a full one over a large in-memory state
    stops the process, urgent requests included, for as long. Observed into
    streambill_gc_pause_seconds, and kept as counts and the longest pause per generation
    for a process without a metrics endpoint (the gateway simulator's /v1/stats)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.max_pause_s = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> None:
        """Once per process."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        pause = time.perf_counter() - self._started
        self.collections[generation] += 1
        self.max_pause_s[generation] = max(self.max_pause_s[generation], pause)
        GC_PAUSE_SECONDS.labels(str(generation)).observe(pause)

    def stats(self) -> dict[str, list[float]]:
        return {"collections": list(self.collections),
                "max_pause_ms": [round(p * 1000, 1) for p in self.max_pause_s]}  # fmt: skip


GC_PAUSES = GcPauses()


def serve(settings: Settings, name: str) -> str:
    """Start this process's metrics endpoint and advertise it; returns its URL."""
    GC_PAUSES.install()
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    host, bound = server.server_address[:2]
    url = f"http://{host}:{bound}/metrics"
    path = metrics_dir(settings) / f"{name}-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"processor": name, "pid": os.getpid(), "url": url}))
    atexit.register(lambda: path.unlink(missing_ok=True))
    from streams.logging import ProgressLog

    ProgressLog(name, settings.progress_seconds, progress_figures).start()
    return url


# what a progress line reports (streams/logging.py ProgressLog), from this process's own
# registry: metric -> (figure, the label that splits it, if any)
_PROGRESS = {
    "streambill_records": ("records", None),
    "streambill_invoices": ("invoices", None),
    "streambill_payments": ("charges", "status"),
    "streambill_lane_requests": ("requests", "outcome"),
    "streambill_dead_letters": ("dead_letters", None),
    "streambill_consumer_lag": ("lag", None),
}


def progress_figures() -> Iterator[tuple[str, float]]:
    """(figure, value) per sample of the metrics a progress line reports; a figure that
    has stayed 0 in this process (another processor's counter) is left out."""
    from prometheus_client import REGISTRY

    for family in REGISTRY.collect():
        figure, split = _PROGRESS.get(family.name, (None, None))
        if figure is None:
            continue
        wanted = family.name + ("_total" if family.type == "counter" else "")
        for sample in family.samples:
            if sample.name == wanted and (sample.value or figure in ("records", "lag")):
                yield (f"{figure}_{sample.labels[split]}" if split else figure), sample.value


def endpoints(settings: Settings) -> list[dict[str, Any]]:
    """The metrics endpoints of live processes on this machine."""
    found = []
    for path in sorted(metrics_dir(settings).glob("*.json")):
        try:
            info = json.loads(path.read_text())
            os.kill(info["pid"], 0)
            found.append(info)
        except (OSError, ValueError, KeyError):
            continue
    return found


def scrape(
    settings: Settings, processor: str | None = None, pid: int | None = None
) -> Iterator[Sample]:
    """Every sample of every live endpoint (of one processor, or one process, if given);
    an endpoint that does not answer is skipped."""
    for e in endpoints(settings):
        if processor is not None and e["processor"] != processor:
            continue
        if pid is not None and e["pid"] != pid:
            continue
        try:
            with urllib.request.urlopen(e["url"], timeout=2) as response:
                text = response.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            yield from family.samples


class LagTracker:
    """Consumer lag of the partitions a consumer owns, from its own positions and the
    watermarks librdkafka caches, refreshed every few seconds. A partition that has
    delivered nothing since it was assigned has no position yet: its committed offset
    (where consumption resumed) stands in for it, asked of the broker once per
    assignment; until it is known the partition is not reported (never as wholly
    behind, which would fire the lag alert after every rebalance). After an assignment,
    until each owned partition is reported (its watermark comes with its first fetch),
    the refresh runs every ``soon_s``: a worker that took partitions over reports their
    lag within a fetch or two, not a whole period later."""

    def __init__(
        self, consumer: Any, processor: str, every_s: float = 5.0, soon_s: float = 0.2
    ) -> None:
        self.consumer = consumer
        self.processor = processor
        self.every_s = every_s
        self.soon_s = soon_s
        self.last = 0.0
        self.incomplete = False  # an owned partition is not reported yet
        self.reported: set[tuple[str, int]] = set()
        self.resumed_at: dict[tuple[str, int], int] = {}  # committed offset at assignment

    def assigned(self) -> None:
        """Partitions were assigned: refresh soon, until each is reported."""
        self.incomplete = True
        self.last = 0.0

    def maybe_update(self) -> None:
        now = time.monotonic()
        if now - self.last < (self.soon_s if self.incomplete else self.every_s):
            return
        self.last = now
        try:
            assigned = self.consumer.assignment()
            positions = self.consumer.position(assigned) if assigned else []
        except Exception:  # a closed or rebalancing consumer: try again next time
            return
        self._learn_where_consumption_resumed(positions)
        seen = set()
        for tp in positions:
            key = (tp.topic, tp.partition)
            start = tp.offset if tp.offset >= 0 else self.resumed_at.get(key)
            _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high < 0 or start is None:
                continue
            CONSUMER_LAG.labels(self.processor, tp.topic, str(tp.partition)).set(
                max(0, high - start)
            )
            seen.add(key)
        for topic, partition in self.reported - seen:  # handed to another worker
            CONSUMER_LAG.remove(self.processor, topic, str(partition))
        owned = {(tp.topic, tp.partition) for tp in positions}
        self.resumed_at = {k: v for k, v in self.resumed_at.items() if k in owned}
        self.reported = seen
        self.incomplete = seen != owned

    def _learn_where_consumption_resumed(self, positions: list[Any]) -> None:
        unknown = [
            tp for tp in positions
            if tp.offset < 0 and (tp.topic, tp.partition) not in self.resumed_at
        ]  # fmt: skip
        if not unknown:
            return
        try:
            committed = self.consumer.committed(unknown, timeout=1.0)
        except Exception:  # the broker did not answer in time: ask again next time
            return
        for tp in committed:
            if tp.error is None:  # never committed: consumption starts at the beginning
                self.resumed_at[(tp.topic, tp.partition)] = max(tp.offset, 0)
