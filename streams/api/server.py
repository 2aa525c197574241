"""``streambill api``: the HTTP ingestion API (aiohttp on uvloop).

Every write is answered only once Kafka has it (acks=all, idempotent producer): a 2xx
means durable. What the server cannot do it says at once: 401 without a valid key, 403
for another tenant's account, 413/415/400/422 for bad bodies, 429 + Retry-After over a
tenant's limits (decided in microseconds, before the body is read), 503 + Retry-After
when Kafka does not acknowledge within ``STREAMBILL_API_KAFKA_TIMEOUT`` or is known to
be down. No request waits longer than that deadline, so a client never times out.

Idempotency: a request with an ``Idempotency-Key`` header gets the stored answer of
its first success again (per worker, ``IDEMPOTENCY_CACHE`` keys); across workers and
restarts the event id derived from the key (or the client's own ``event_id`` /
``refund_id``) is the same, so downstream de-duplication makes a retry one event.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from streams import metrics
from streams.api import records
from streams.api.limits import Admission
from streams.api.openapi import openapi_document
from streams.api.tenants import Tenant, TenantDirectory, TenantError
from streams.codec import codec
from streams.config import Settings
from streams.domain.money import format_money, format_quantity
from streams.domain.timestamps import format_timestamp, from_micros
from streams.kafka import clients
from streams.kafka.topics import CANCELLATIONS, REFUNDS, SUBSCRIPTIONS, USAGE, TopicSpec

log = structlog.get_logger(__name__)

IDEMPOTENCY_CACHE = 100_000
ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_EVENT_NS = uuid.UUID("6f1f6c3e-5a52-4a1c-9d8e-2f0b7d3c9a41")

REQUESTS = Counter("streambill_api_requests_total", "API requests answered", ["route", "status"])
TENANT_ERRORS = Counter(
    "streambill_api_tenant_errors_total",
    "API requests of a tenant answered 4xx/5xx",
    ["tenant", "status"],
)
LATENCY = Histogram(
    "streambill_api_request_seconds",
    "API request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
IN_FLIGHT = Gauge("streambill_api_in_flight", "API requests in progress")
_in_flight = [0]  # read at scrape time: no gauge update per request
IN_FLIGHT.set_function(lambda: _in_flight[0])
EVENTS = Counter("streambill_api_events_total", "events accepted into Kafka", ["topic"])
_route_metrics: dict[tuple[str, int], tuple[Any, Any]] = {}
KAFKA_DOWN = Gauge("streambill_api_kafka_unavailable", "1 while Kafka is known to be down")


class KafkaUnavailable(RuntimeError):
    pass


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
    )


def error_response(err: ApiError) -> web.Response:
    headers = {}
    if "retry_after" in err.extra:
        headers["Retry-After"] = str(err.extra["retry_after"])
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="streambill"'
    body = {"error": err.code, "message": err.message, **err.extra}
    return json_response(err.status, body, headers)


# --- Kafka -----------------------------------------------------------------------------


class KafkaBridge:
    """An idempotent acks=all producer whose deliveries resolve asyncio futures. Delivery
    reports are polled on the event loop itself (every millisecond while writes are
    pending), so no thread hand-off is paid per request. A failed delivery marks Kafka
    down until the next success, so that requests meanwhile get their 503 at once."""

    def __init__(self, settings: Settings, bootstrap: str, timeout_s: float) -> None:
        self.producer = clients.producer(
            settings, bootstrap,
            **{"linger.ms": 10, "message.timeout.ms": int(timeout_s * 1000),
               "queue.buffering.max.messages": 200_000},
        )  # fmt: skip
        self.timeout_s = timeout_s
        self.down_since: float | None = None
        self.pending = 0
        self.wake = asyncio.Event()
        self.poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
            self.producer.poll(0)
            await asyncio.sleep(0.001)

    async def close(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.producer.flush, self.timeout_s)

    def _delivered(self, fut: asyncio.Future[tuple[int, int]], err: Any, msg: Any) -> None:
        self.pending -= 1
        if err is None:
            if self.down_since is not None:
                self.down_since = None
                KAFKA_DOWN.set(0)
            if not fut.done():
                fut.set_result((msg.partition(), msg.offset()))
        else:
            if self.down_since is None:
                self.down_since = time.monotonic()
                KAFKA_DOWN.set(1)
            if not fut.done():
                fut.set_exception(KafkaUnavailable(str(err)))

    async def send(self, topic: str, key: bytes, value: bytes) -> tuple[int, int]:
        """(partition, offset) once every in-sync replica has the record."""
        if self.down_since is not None and time.monotonic() - self.down_since < 1.0:
            # known down: a quick 503, but one request a second still probes Kafka
            raise KafkaUnavailable("Kafka did not acknowledge recent writes")
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        try:
            self.producer.produce(
                topic, key=key, value=value, on_delivery=partial(self._delivered, fut)
            )
        except BufferError:
            raise KafkaUnavailable("the producer queue is full") from None
        self.pending += 1
        self.wake.set()
        # librdkafka reports every message within message.timeout.ms, success or failure:
        # that bounds the wait without a timer per request
        return await fut


# --- the application -------------------------------------------------------------------


class IdempotencyCache:
    """(tenant, key) -> (body hash, status, body) of a first answer; bounded LRU."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[str, str], tuple[str, int, bytes]] = OrderedDict()

    def get(self, k: tuple[str, str]) -> tuple[str, int, bytes] | None:
        hit = self.entries.get(k)
        if hit is not None:
            self.entries.move_to_end(k)
        return hit

    def put(self, k: tuple[str, str], value: tuple[str, int, bytes]) -> None:
        self.entries[k] = value
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)


class Api:
    def __init__(
        self,
        settings: Settings,
        kafka: KafkaBridge,
        tenants: TenantDirectory,
        plans: tuple[str, ...],
        workers: int = 1,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.tenants = tenants
        self.workers = max(1, workers)
        self.admission: dict[str, Admission] = {}
        self.idempotency = IdempotencyCache(IDEMPOTENCY_CACHE)
        self.in_progress: set[tuple[str, str]] = set()
        self.plans = plans
        self.subscription_rules = records.subscription_rules(set(plans).__contains__)
        self.last_refresh = 0.0
        self.started = time.time()

    # --- tenants and admission ---------------------------------------------------------

    def _refresh_tenants(self, now: float) -> None:
        if now - self.last_refresh < 1.0:
            return
        self.last_refresh = now
        try:
            if self.tenants.refresh():
                log.info("tenants reloaded", tenants=len(self.tenants.tenants))
        except (OSError, TenantError) as exc:
            log.error("tenants file unreadable; keeping the previous tenants", error=str(exc))
        for t in self.tenants.tenants.values():
            self._admission(t)

    def _admission(self, tenant: Tenant) -> Admission:
        """This worker's share of the tenant's limits."""
        conc = max(1, tenant.max_concurrency // self.workers)
        rate = tenant.rate_per_s / self.workers
        adm = self.admission.get(tenant.tenant_id)
        if adm is None:
            adm = self.admission[tenant.tenant_id] = Admission(conc, rate)
        elif (adm.max_concurrency, adm.rate_per_s) != (conc, rate):
            adm.reconfigure(conc, rate)
        return adm

    def authenticate(self, request: web.Request) -> Tenant:
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else ""
        key = key or request.headers.get("X-API-Key", "")
        tenant = self.tenants.authenticate(key) if key else None
        if tenant is None:
            raise ApiError(
                401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)"
            )
        return tenant

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.resource
        route_name = route.canonical if route is not None else "unmatched"
        tenant: Tenant | None = None
        admission: Admission | None = None
        _in_flight[0] += 1
        try:
            if request.path.startswith("/v1/"):
                self._refresh_tenants(time.monotonic())
                tenant = self.authenticate(request)
                admission = self._admission(tenant)
                retry_after = admission.admit(time.monotonic())
                if retry_after is not None:
                    admission = None
                    raise ApiError(
                        429,
                        "rate_limited",
                        f"tenant {tenant.tenant_id} is over its limits; retry later",
                        retry_after=retry_after,
                    )
                request["tenant"] = tenant
            response = await handler(request)
        except ApiError as err:
            response = error_response(err)
        except web.HTTPRequestEntityTooLarge as exc:
            response = error_response(ApiError(413, "body_too_large", exc.text or "too large"))
        except web.HTTPException as exc:  # routing: 404, 405
            code = re.sub(r"\W+", "_", exc.reason.lower())
            response = error_response(ApiError(exc.status, code, exc.reason))
            if "Allow" in exc.headers:  # a 405 names the methods that are allowed
                response.headers["Allow"] = exc.headers["Allow"]
        except KafkaUnavailable as exc:
            response = error_response(ApiError(503, "kafka_unavailable", str(exc), retry_after=1))
        except TimeoutError:
            response = error_response(
                ApiError(
                    503, "kafka_unavailable", "Kafka did not acknowledge in time", retry_after=1
                )
            )
        finally:
            _in_flight[0] -= 1
            if admission is not None:
                admission.release()
        status = response.status
        metrics = _route_metrics.get((route_name, status))
        if metrics is None:  # labelled children looked up once, not per request
            metrics = (REQUESTS.labels(route_name, str(status)), LATENCY.labels(route_name))
            _route_metrics[(route_name, status)] = metrics
        metrics[0].inc()
        metrics[1].observe(time.perf_counter() - started)
        if tenant is not None and status >= 400:
            TENANT_ERRORS.labels(tenant.tenant_id, str(status)).inc()
        return response

    # --- helpers -----------------------------------------------------------------------

    async def _body(self, request: web.Request) -> tuple[bytes, Any]:
        """(the raw body, its JSON)."""
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
        raw = await request.read()
        try:
            return raw, orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from None

    @staticmethod
    def _own(tenant: Tenant, account_id: str) -> None:
        if not tenant.owns(account_id):
            raise ApiError(
                403,
                "forbidden",
                f"account {account_id!r} is not one of tenant {tenant.tenant_id}'s accounts",
            )

    async def _send(self, topic: TopicSpec, record: dict[str, Any]) -> tuple[int, int]:
        value = codec(topic.schema).encode(record)
        where = await self.kafka.send(topic.name, record["account_id"].encode(), value)
        EVENTS.labels(topic.base).inc()
        return where

    async def _accept(
        self, tenant: Tenant, topic: TopicSpec, record: dict[str, Any], id_field: str
    ) -> web.Response:
        """One record of the tenant's own account, durable in Kafka: 202 with where."""
        self._own(tenant, record["account_id"])
        partition, offset = await self._send(topic, record)
        return json_response(202, {"status": "accepted", id_field: record[id_field],
                                   "topic": topic.name, "partition": partition,
                                   "offset": offset})  # fmt: skip

    async def _idempotent(
        self, request: web.Request, work: Callable[[Any], Awaitable[web.Response]]
    ) -> web.Response:
        """Replays the first answer to a repeated Idempotency-Key (same body), refuses a
        reused key with another body, and stores 2xx/4xx answers (never 429/5xx: those
        are worth retrying)."""
        tenant: Tenant = request["tenant"]
        raw, body = await self._body(request)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= 255:
            raise ApiError(422, "invalid", "Idempotency-Key: 1 to 255 characters")
        if not key:
            return await work(body)
        slot = (tenant.tenant_id, f"{request.path}|{key}")
        digest = hashlib.sha256(raw).hexdigest()  # the same retry sends the same bytes
        first = self.idempotency.get(slot)
        if first is not None:
            if first[0] != digest:
                raise ApiError(
                    422, "idempotency_key_reused", "this Idempotency-Key was used with another body"
                )
            return web.Response(
                status=first[1],
                body=first[2],
                content_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
        if slot in self.in_progress:
            raise ApiError(
                409,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is in progress",
                retry_after=1,
            )
        self.in_progress.add(slot)
        try:
            try:
                response = await work(body)
            except ApiError as err:
                if err.status >= 500 or err.status == 429:
                    raise
                response = error_response(err)
            assert isinstance(response.body, bytes)
            # a compact copy: orjson's bytes keep its ~4 KiB output buffer, which across
            # 100,000 cached answers was 400 MB
            body_copy = bytes(memoryview(response.body))
            self.idempotency.put(slot, (digest, response.status, body_copy))
            return response
        finally:
            self.in_progress.discard(slot)

    # --- routes ------------------------------------------------------------------------

    async def post_subscription(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        key = request.headers.get("Idempotency-Key")

        async def work(body: Any) -> web.Response:
            now = datetime.now(UTC)

            def event_id() -> str:
                if key:  # the same key makes the same event, in any worker
                    return str(uuid.uuid5(_EVENT_NS, f"{tenant.tenant_id}|{key}"))
                return str(uuid.uuid4())

            record, errors = records.validate(
                "subscription_event",
                self.subscription_rules,
                body,
                now,
                defaults={"event_id": event_id, "timestamp": lambda: now},
            )
            if record is None:
                raise ApiError(422, "invalid", "the event is invalid", errors=errors)
            # a cancellation is a workflow: the lanes serve it (see streams/lanes.py)
            cancel = record["type"] == "subscription.cancelled"
            return await self._accept(tenant, CANCELLATIONS if cancel else SUBSCRIPTIONS,
                                      record, "event_id")  # fmt: skip

        return await self._idempotent(request, work)

    async def post_usage(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]

        async def work(body: Any) -> web.Response:
            events = body.get("events") if isinstance(body, dict) else None
            if not isinstance(events, list) or set(body) != {"events"}:
                raise ApiError(422, "invalid", 'the body must be {"events": [...]}')
            if not 1 <= len(events) <= records.MAX_USAGE_BATCH:
                raise ApiError(422, "invalid", f"1 to {records.MAX_USAGE_BATCH} events per batch")
            now = datetime.now(UTC)
            checked = [records.validate("usage_event", records.USAGE_RULES, e, now) for e in events]
            for record, _ in checked:  # nothing is written when one account is not ours
                if record is not None:
                    self._own(tenant, record["account_id"])
            valid = [(i, r) for i, (r, _) in enumerate(checked) if r is not None]
            sent = await asyncio.gather(
                *(self._send(USAGE, r) for _, r in valid), return_exceptions=True
            )
            items: list[dict[str, Any]] = []
            outcome = dict(zip((i for i, _ in valid), sent, strict=True))
            for i, (record, errors) in enumerate(checked):
                if record is None:
                    items.append({"index": i, "status": "rejected", "errors": errors})
                elif isinstance(outcome[i], BaseException):
                    items.append(
                        {
                            "index": i,
                            "event_id": record["event_id"],
                            "status": "failed",
                            "errors": ["kafka_unavailable"],
                        }
                    )
                else:
                    items.append({"index": i, "event_id": record["event_id"], "status": "accepted"})
            accepted = sum(1 for it in items if it["status"] == "accepted")
            failed = sum(1 for it in items if it["status"] == "failed")
            body_out = {
                "accepted": accepted,
                "rejected": len(items) - accepted - failed,
                "failed": failed,
                "items": items,
            }
            if failed:  # retry the batch: accepted event ids de-duplicate downstream
                return json_response(
                    503,
                    {
                        "error": "kafka_unavailable",
                        "message": "some events were not written",
                        **body_out,
                    },
                    {"Retry-After": "1"},
                )
            if accepted == 0:
                return json_response(
                    422, {"error": "invalid", "message": "no event is valid", **body_out}
                )
            return json_response(202 if accepted == len(items) else 207, body_out)

        return await self._idempotent(request, work)

    async def post_refund(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]

        async def work(body: Any) -> web.Response:
            now = datetime.now(UTC)
            record, errors = records.validate(
                "refund_request",
                records.REFUND_RULES,
                body,
                now,
                server_fields={"requested_at": now},
            )
            if record is None:
                raise ApiError(422, "invalid", "the refund request is invalid", errors=errors)
            return await self._accept(tenant, REFUNDS, record, "refund_id")

        return await self._idempotent(request, work)

    async def get_invoice(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        invoice_id = request.match_info["invoice_id"]
        if not ID_PATTERN.fullmatch(invoice_id):
            raise ApiError(404, "not_found", "no such invoice")
        loop = asyncio.get_running_loop()
        invoice = await loop.run_in_executor(None, self._fetch_invoice, invoice_id)
        if invoice is None:
            raise ApiError(404, "not_found", "no such invoice")
        self._own(tenant, invoice["account_id"])
        return json_response(200, invoice)

    def _fetch_invoice(self, invoice_id: str) -> dict[str, Any] | None:
        from streams.warehouse import WarehouseUnavailable, query

        where = f"invoice_id = '{invoice_id}'"  # safe: ID_PATTERN has no quote or backslash
        try:
            head = query(
                self.settings,
                "SELECT invoice_id, account_id, subscription_id, "
                "currency, toUnixTimestamp64Micro(issued_at), toString(total) "
                f"FROM invoices FINAL WHERE {where}",
                open_here=False,
            )["rows"]
            if not head:
                return None
            lines = query(
                self.settings,
                "SELECT charge_id, kind, "
                "toUnixTimestamp64Micro(period_start), "
                "toUnixTimestamp64Micro(period_end), toString(quantity), "
                f"toString(amount) FROM invoice_lines FINAL WHERE {where} "
                "ORDER BY line_no",
                open_here=False,
            )["rows"]
        except WarehouseUnavailable as exc:
            raise ApiError(503, "warehouse_unavailable", str(exc), retry_after=5) from None
        inv_id, account, sub, currency, issued, total = head[0]
        return {
            "invoice_id": inv_id,
            "account_id": account,
            "subscription_id": sub,
            "currency": currency,
            "issued_at": format_timestamp(from_micros(int(issued))),
            "lines": [
                {
                    "charge_id": c,
                    "kind": k,
                    "period_start": format_timestamp(from_micros(int(ps))),
                    "period_end": format_timestamp(from_micros(int(pe))),
                    "quantity": format_quantity(Decimal(q)),
                    "amount": format_money(Decimal(a), currency),
                }
                for c, k, ps, pe, q, a in lines
            ],
            "total": format_money(Decimal(total), currency),
        }

    async def health(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok", "uptime_s": round(time.time() - self.started)})

    async def ready(self, request: web.Request) -> web.Response:
        """Ready when Kafka answers (metadata within 1 s) and is not known to be down."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: self.kafka.producer.list_topics(timeout=1))
        except Exception as exc:  # any client error means: not ready
            return json_response(
                503, {"status": "unavailable", "kafka": str(exc)}, {"Retry-After": "1"}
            )
        if self.kafka.down_since is not None:
            return json_response(
                503,
                {"status": "unavailable", "kafka": "recent writes failed"},
                {"Retry-After": "1"},
            )
        return json_response(200, {"status": "ready"})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(200, openapi_document(self.plans))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def app(self, max_body: int) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=max_body)
        app.router.add_post("/v1/subscriptions", self.post_subscription)
        app.router.add_post("/v1/usage", self.post_usage)
        app.router.add_post("/v1/refunds", self.post_refund)
        app.router.add_get("/v1/invoices/{invoice_id}", self.get_invoice)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/readyz", self.ready)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/metrics", self.metrics)
        return app


def tenants_path(settings: Settings) -> Path:
    return settings.api_tenants or settings.home / "api" / "tenants.json"


def serve(settings: Settings, bootstrap: str, host: str, port: int, workers: int = 1) -> None:
    """One worker process (``--workers`` starts several on the same port)."""
    import json

    import uvloop

    from streams.domain.catalog import Catalog

    catalog = Catalog.from_dict(json.loads(settings.catalog.read_text()))
    tenants = TenantDirectory(tenants_path(settings))
    if not tenants.tenants:
        log.warning(
            "no tenants: every /v1 request gets 401; add one with `streambill tenant add`",
            file=str(tenants.path),
        )

    async def main() -> None:
        kafka = KafkaBridge(settings, bootstrap, settings.api_kafka_timeout_s)
        kafka.start()
        api = Api(settings, kafka, tenants, tuple(sorted(catalog.plans)), workers)
        runner = web.AppRunner(api.app(settings.api_max_body), access_log=None, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=True, backlog=4096)
        await site.start()
        log.info("api listening", url=f"http://{host}:{port}", workers=workers)
        # each worker's own figures on a port of its own (the shared port would answer
        # from whichever worker the kernel picks): the dashboard sums them
        metrics.serve(settings, "api")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # graceful: stop accepting, let requests in flight get their Kafka answer
        await runner.cleanup()
        await kafka.close()

    uvloop.run(main())
