"""``streambill dashboard``: the health page (aiohttp) and the figures behind it.

Figures come from where they are true: invoices, payments, refunds and dead letters from
the warehouse (per minute, over the time range the page asks for), consumer lag from the
broker (``streams.kafka.lag``), and API traffic from the API workers' Prometheus
endpoints, sampled every few seconds into an in-memory history (kept for
``HISTORY_HOURS``; it starts when the dashboard starts). The page polls
``/api/figures?minutes=N`` and draws with uPlot (vendored in ``streams/ops/static``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from streams.config import Settings
from streams.metrics import endpoints, scrape

log = structlog.get_logger(__name__)
STATIC = Path(__file__).parent / "static"
HISTORY_HOURS = 24
RANGES_MINUTES = (15, 60, 360, 1440)  # the page's time ranges (the longest: HISTORY_HOURS)
SAMPLE_EVERY_S = 5.0
CALENDAR_DAYS = 30  # the load calendar's panel: the coming days


# --- warehouse figures ------------------------------------------------------------------

WAREHOUSE_SQL = {
    # per minute of landing: what the pipeline did when, whatever the events' own times
    "invoices_per_minute": """
        SELECT toUnixTimestamp(toStartOfMinute(_landed_at)) AS t, uniqExact(invoice_id)
        FROM invoices WHERE _landed_at >= now() - INTERVAL {minutes} MINUTE
        GROUP BY t ORDER BY t""",
    "payments_per_minute": """
        SELECT toUnixTimestamp(toStartOfMinute(completed_at)) AS t,
               uniqExactIf(payment_id, status = 'succeeded'),
               uniqExactIf(payment_id, status != 'succeeded')
        FROM payment_attempts WHERE completed_at >= now() - INTERVAL {minutes} MINUTE
        GROUP BY t ORDER BY t""",
    "refund_latency": """
        SELECT toUnixTimestamp(toStartOfFiveMinutes(completed_at)) AS t,
               round(quantileExact(0.5)(dateDiff('millisecond', requested_at, completed_at))),
               round(quantileExact(0.99)(dateDiff('millisecond', requested_at, completed_at)))
        FROM refunds FINAL WHERE completed_at >= now() - INTERVAL {minutes} MINUTE
        GROUP BY t ORDER BY t""",
    "dead_letters": """
        SELECT processor, reason, count() FROM dead_letters FINAL
        WHERE failed_at >= now() - INTERVAL {minutes} MINUTE
        GROUP BY processor, reason ORDER BY count() DESC, processor, reason""",
    "totals": """
        SELECT
          (SELECT uniqExact(invoice_id) FROM invoices
            WHERE _landed_at >= now() - INTERVAL {minutes} MINUTE),
          (SELECT uniqExact(payment_id) FROM payment_attempts
            WHERE completed_at >= now() - INTERVAL {minutes} MINUTE),
          (SELECT uniqExactIf(payment_id, status = 'succeeded') FROM payment_attempts
            WHERE completed_at >= now() - INTERVAL {minutes} MINUTE),
          (SELECT count() FROM refunds FINAL
            WHERE completed_at >= now() - INTERVAL {minutes} MINUTE),
          (SELECT round(quantileExact(0.5)(dateDiff('millisecond', requested_at, completed_at)))
             FROM refunds FINAL WHERE completed_at >= now() - INTERVAL {minutes} MINUTE),
          (SELECT round(quantileExact(0.99)(dateDiff('millisecond', requested_at, completed_at)))
             FROM refunds FINAL WHERE completed_at >= now() - INTERVAL {minutes} MINUTE),
          (SELECT count() FROM dead_letters FINAL
            WHERE failed_at >= now() - INTERVAL {minutes} MINUTE)""",
}


def warehouse_figures(settings: Settings, minutes: int) -> dict[str, Any]:
    from streams.payments.progress import calendar_sql
    from streams.warehouse import query

    def rows(name: str) -> list[list[Any]]:
        sql = WAREHOUSE_SQL[name].format(minutes=int(minutes))
        return [[_number(v) for v in r] for r in query(settings, sql, open_here=False)["rows"]]

    invoices, payments, succeeded, refunds, p50, p99, dead = rows("totals")[0]
    calendar = query(settings, calendar_sql(settings, CALENDAR_DAYS, "day"), open_here=False)
    return {
        "calendar": [
            {
                "day": str(day)[:10],
                "currency": currency,
                "invoices": int(n),
                "payments": int(payments),
                "retries": int(retries),
            }
            for day, currency, n, _recurring, payments, retries in calendar["rows"]
        ],
        "invoices_per_minute": rows("invoices_per_minute"),
        "payments_per_minute": rows("payments_per_minute"),
        "refund_latency": rows("refund_latency"),
        "dead_letters": [
            {"processor": p, "reason": r, "count": n} for p, r, n in rows("dead_letters")
        ],
        "totals": {
            "invoices": invoices,
            "payments": payments,
            "payment_success_rate": round(succeeded / payments, 4) if payments else None,
            "refunds": refunds,
            "refund_p50_ms": p50 if refunds else None,
            "refund_p99_ms": p99 if refunds else None,
            "dead_letters": dead,
        },
    }


def _number(v: Any) -> Any:
    """Figures through the sink's JSON endpoint arrive as text; numbers as numbers."""
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() else f
    return v


# --- runs in flight, from their own metrics endpoints ----------------------------------


def runs_in_flight(settings: Settings) -> list[dict[str, Any]]:
    """Each bill run and payment run waiting in a `streambill` command now: its ETA and
    its margin to its deadline (None: not measured yet, or no deadline)."""
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in ("payment-run", "bill-run"):
        for s in scrape(settings, kind):
            field = {"streambill_run_eta_seconds": "eta_s",
                     "streambill_run_deadline_margin_seconds": "margin_s"}.get(s.name)  # fmt: skip
            if field is None:
                continue
            key = (s.labels.get("kind", kind), s.labels.get("run", ""))
            run = runs.setdefault(key, {"kind": key[0], "run": key[1], "eta_s": None,
                                        "margin_s": None})  # fmt: skip
            run[field] = None if math.isinf(s.value) else round(s.value, 1)
    return sorted(runs.values(), key=lambda r: (r["margin_s"] is None, r["margin_s"] or 0))


# --- API traffic, sampled from the API workers' metrics ---------------------------------


def api_counters(settings: Settings) -> tuple[float, float, float] | None:
    """(requests, 5xx, 4xx) summed over every live API worker; None when none runs."""
    if not any(e["processor"] == "api" for e in endpoints(settings)):
        return None
    requests = errors = refused = 0.0
    for s in scrape(settings, "api"):
        if s.name != "streambill_api_requests_total":
            continue
        status = s.labels.get("status", "")
        requests += s.value
        errors += s.value if status.startswith("5") else 0
        refused += s.value if status.startswith("4") else 0
    return requests, errors, refused


class ApiHistory:
    """Per-minute API requests, 5xx and 4xx, from counter samples (restarts of a worker,
    which reset its counters, count as zero for that interval)."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, tuple[float, float, float]]] = deque(
            maxlen=int(HISTORY_HOURS * 3600 / SAMPLE_EVERY_S)
        )

    def add(self, at: float, counters: tuple[float, float, float]) -> None:
        self.samples.append((at, counters))

    def per_minute(self, since: float = 0.0) -> list[list[float]]:
        minutes: dict[int, list[float]] = {}
        for (_, before), (at, after) in pairwise(self.samples):
            if at < since:
                continue
            delta = [max(0.0, a - b) for a, b in zip(after, before, strict=True)]
            bucket = minutes.setdefault(int(at // 60 * 60), [0.0, 0.0, 0.0])
            for i, d in enumerate(delta):
                bucket[i] += d
        return [[t, *v] for t, v in sorted(minutes.items())]

    def totals(self) -> dict[str, float]:
        if not self.samples:
            return {"requests": 0, "errors_5xx": 0, "refused_4xx": 0}
        requests, errors, refused = self.samples[-1][1]
        return {"requests": requests, "errors_5xx": errors, "refused_4xx": refused}


# --- the app ----------------------------------------------------------------------------


class Dashboard:
    def __init__(self, settings: Settings, bootstrap: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.api = ApiHistory()

    async def sample_api(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            counters = await loop.run_in_executor(None, api_counters, self.settings)
            if counters is not None:
                self.api.add(time.time(), counters)
            await asyncio.sleep(SAMPLE_EVERY_S)

    def _lag(self) -> list[dict[str, Any]]:
        """Every group with its total lag and its partitions, worst first (the page shows
        one row per group, so no group is pushed out by another's partitions)."""
        from streams.kafka.lag import group_lags

        def worst_first(p: dict[str, Any]) -> tuple[int, str, int]:
            return -p["lag"], p["topic"], p["partition"]

        by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in group_lags(self.settings, self.bootstrap):
            by_group[r.group].append({"topic": r.topic, "partition": r.partition, "lag": r.lag})
        groups = [
            {
                "group": group,
                "lag": sum(p["lag"] for p in partitions),
                "partitions": sorted(partitions, key=worst_first),
            }
            for group, partitions in by_group.items()
        ]
        return sorted(groups, key=lambda g: (-g["lag"], g["group"]))

    async def figures(self, request: web.Request) -> web.Response:
        from streams.warehouse import WarehouseUnavailable

        try:
            minutes = int(request.query.get("minutes", RANGES_MINUTES[-1]))
        except ValueError:
            raise web.HTTPBadRequest(text="minutes: a whole number") from None
        minutes = min(RANGES_MINUTES[-1], max(1, minutes))
        loop = asyncio.get_running_loop()
        body: dict[str, Any] = {"generated_at": datetime.now(UTC).isoformat(),
                                "minutes": minutes}  # fmt: skip
        try:
            body.update(await loop.run_in_executor(None, warehouse_figures, self.settings,
                                                   minutes))  # fmt: skip
        except (WarehouseUnavailable, ValueError) as exc:
            body["warehouse_error"] = str(exc)
        try:
            body["lag"] = await loop.run_in_executor(None, self._lag)
        except Exception as exc:  # the broker's problem is shown, not raised
            body["lag"], body["kafka_error"] = [], str(exc)
        body["runs"] = await loop.run_in_executor(None, runs_in_flight, self.settings)
        body["api_per_minute"] = self.api.per_minute(since=time.time() - minutes * 60)
        body["api_totals"] = self.api.totals()
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/api/figures", self.figures)
        app.router.add_static("/static", STATIC)

        async def start_sampling(app: web.Application) -> Any:
            task = asyncio.get_running_loop().create_task(self.sample_api())
            yield
            task.cancel()

        app.cleanup_ctx.append(start_sampling)
        return app


def serve(settings: Settings, bootstrap: str, host: str, port: int) -> None:
    import uvloop

    log.info("dashboard", url=f"http://{host}:{port}/")
    web.run_app(Dashboard(settings, bootstrap).app(), host=host, port=port, print=None,
                access_log=None, loop=uvloop.new_event_loop())  # fmt: skip
