"""``streambill api``: the HTTP ingestion API (aiohttp on uvloop).

Every write is answered only once Kafka has it (acks=all, idempotent producer): a 2xx
means durable. What the server cannot do it says at once: 401 without a valid key, 403
for a write naming an account the key does not own (a read of another tenant's resource
is a 404, as if it did not exist: no answer tells one tenant about another),
413/415/400/422 for bad bodies, 422 for what the rating processor is certain to refuse
(``streams.api.known``), 429 + Retry-After over a
tenant's limits (decided in microseconds, before the body is read), 503 + Retry-After
when Kafka does not acknowledge within ``STREAMBILL_API_KAFKA_TIMEOUT`` or is known to
be down. No request waits longer than that deadline, so a client never times out.
Bodies carry fixed messages, never an exception's text (that goes to the log).

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
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import metrics
from streams.api import reads, records
from streams.api.known import SubscriptionBook
from streams.api.limits import Admission
from streams.api.openapi import openapi_document
from streams.api.tenants import Tenant, TenantDirectory, TenantError
from streams.codec import codec
from streams.config import Settings
from streams.documents import FORMATS as DOCUMENT_TYPES
from streams.documents import Issuer, invoice_document, render
from streams.domain.catalog import Catalog
from streams.domain.events import CustomerUpdated
from streams.domain.invoice import Invoice, invoice_to_dict
from streams.domain.money import format_money
from streams.domain.timestamps import (
    InvalidTimestamp,
    format_timestamp,
    from_micros,
    parse_timestamp,
    to_micros,
)
from streams.kafka import clients
from streams.kafka.topics import (
    CANCELLATIONS,
    CUSTOMERS,
    REFUNDS,
    SUBSCRIPTIONS,
    USAGE,
    TopicSpec,
)
from streams.metrics import (
    API_EVENTS,
    API_IN_FLIGHT,
    API_KAFKA_DOWN,
    API_LATENCY,
    API_REQUESTS,
    API_TENANT_ERRORS,
)
from streams.rating_records import input_record

# the topics whose events GET /v1/events/{event_id} finds, by their names
EVENT_TOPICS = {t.name: t for t in (USAGE, SUBSCRIPTIONS, CANCELLATIONS)}

log = structlog.get_logger(__name__)

IDEMPOTENCY_CACHE = 100_000
_EVENT_NS = uuid.UUID("6f1f6c3e-5a52-4a1c-9d8e-2f0b7d3c9a41")

_in_flight = [0]  # read at scrape time: no gauge update per request
API_IN_FLIGHT.set_function(lambda: _in_flight[0])
_route_metrics: dict[tuple[str, int], tuple[Any, Any]] = {}


class KafkaUnavailable(RuntimeError):
    pass


KAFKA_DOWN_MESSAGE = "Kafka did not acknowledge the write: nothing was written; retry later"
WAREHOUSE_DOWN_MESSAGE = "the warehouse does not answer; retry later"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def _sent_event_id(item: Any) -> dict[str, str]:
    """The event_id a client sent with an item, to echo in that item's answer."""
    event_id = item.get("event_id") if isinstance(item, dict) else None
    return {"event_id": event_id} if isinstance(event_id, str) else {}


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
        self.bootstrap = bootstrap
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
                API_KAFKA_DOWN.set(0)
            if not fut.done():
                fut.set_result((msg.partition(), msg.offset()))
        else:
            if self.down_since is None:
                self.down_since = time.monotonic()
                API_KAFKA_DOWN.set(1)
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


# --- the catalog (billing.catalog) ------------------------------------------------------


class PlanCatalog:
    """billing.catalog for the API: read through a TopicTable (plan id -> its history) that
    its own thread keeps current, started in the background so that the API serves while
    Kafka is down (the plan routes answer 503 until the topic has been read to its end
    once); written through ``streams.catalog_store`` (validated against the histories,
    all or nothing, one transaction), one write at a time per worker."""

    def __init__(self, settings: Settings, bootstrap: str, timeout_s: float) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.timeout_s = timeout_s  # a write's whole budget (a transaction, its reads)
        self.table: Any = None  # TopicTable[PlanHistory], once read to its end
        self.starter: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    def start(self) -> None:
        self.starter = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        from streams.catalog_store import catalog_table

        loop = asyncio.get_running_loop()
        delay = 1.0
        while True:
            table = None
            try:
                table = await loop.run_in_executor(
                    None, catalog_table, self.settings, self.bootstrap, "api"
                )
                await loop.run_in_executor(None, table.catch_up, 30.0)
                self.table = table
                return
            except Exception as exc:  # Kafka not there (yet): try again
                log.warning("billing.catalog not read yet; retrying", error=str(exc)[:300])
                if table is not None:
                    await loop.run_in_executor(None, table.close)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _ready(self) -> Any:
        if self.table is None:
            raise ApiError(503, "catalog_unavailable", "the catalog is not read from Kafka "
                           "yet; retry later", retry_after=1)  # fmt: skip
        return self.table

    def histories(self) -> dict[str, Any]:
        """plan id -> PlanHistory, as this worker has read them."""
        return dict(self._ready().values)

    async def write(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call`` (catalog_store's publish_plans or retire_plan) through this worker's
        table, off the event loop. CatalogError: refused; KafkaUnavailable: not taken."""
        from streams.catalog_store import CatalogUnavailable

        table = self._ready()
        async with self.lock:
            try:
                return await asyncio.get_running_loop().run_in_executor(None, partial(
                    call, self.settings, self.bootstrap, *args, table=table,
                    timeout=self.timeout_s))  # fmt: skip
            except CatalogUnavailable as exc:
                raise KafkaUnavailable(str(exc)) from None

    async def close(self) -> None:
        if self.starter is not None:
            self.starter.cancel()
        if self.table is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.table.close)


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
        catalog: Catalog,
        workers: int = 1,
        plan_catalog: PlanCatalog | None = None,
    ) -> None:
        self.settings = settings
        self.plan_catalog = plan_catalog  # billing.catalog: GET/POST /v1/plans
        self.kafka = kafka
        self.tenants = tenants
        self.workers = max(1, workers)
        self.admission: dict[str, Admission] = {}
        self.idempotency = IdempotencyCache(IDEMPOTENCY_CACHE)
        self.in_progress: set[tuple[str, str]] = set()
        self.plans = tuple(sorted(catalog.plans))
        self.book = SubscriptionBook(catalog, sole_worker=self.workers == 1,
                                     published=self._published_plans)  # fmt: skip
        self.subscription_rules = records.subscription_rules(self.book.plan_refusal)
        self.last_refresh = 0.0
        self.started = time.time()

    def _published_plans(self) -> dict[str, Any]:
        """billing.catalog's plans as this worker has read them: each one's latest version,
        None for a retired one (nothing before the catalog is read)."""
        table = self.plan_catalog.table if self.plan_catalog is not None else None
        if table is None:
            return {}
        return {pid: None if h.retired_at is not None else h.latest
                for pid, h in list(table.values.items())}  # fmt: skip

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
                        "this API key's tenant is over its limits; retry later",
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
            log.warning("kafka unavailable", route=route_name, error=str(exc))
            response = error_response(ApiError(503, "kafka_unavailable", KAFKA_DOWN_MESSAGE,
                                               retry_after=1))  # fmt: skip
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
            metrics = (API_REQUESTS.labels(route_name, str(status)), API_LATENCY.labels(route_name))
            _route_metrics[(route_name, status)] = metrics
        metrics[0].inc()
        metrics[1].observe(time.perf_counter() - started)
        if tenant is not None and status >= 400:
            API_TENANT_ERRORS.labels(tenant.tenant_id, str(status)).inc()
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
        """A write naming an account the key does not own: 403, naming only what was sent."""
        if not tenant.owns(account_id):
            raise ApiError(
                403, "forbidden", f"account {account_id!r} is not one of this API key's accounts"
            )

    async def _send(self, topic: TopicSpec, record: dict[str, Any]) -> tuple[int, int]:
        value = codec(topic.schema).encode(record)
        where = await self.kafka.send(topic.name, record["account_id"].encode(), value)
        API_EVENTS.labels(topic.base).inc()
        return where

    async def _accept(
        self, tenant: Tenant, topic: TopicSpec, record: dict[str, Any], *id_fields: str
    ) -> web.Response:
        """One record of the tenant's own account, durable in Kafka: 202 with where."""
        self._own(tenant, record["account_id"])
        partition, offset = await self._send(topic, record)
        return json_response(202, {"status": "accepted", **{f: record[f] for f in id_fields},
                                   "topic": topic.name, "partition": partition,
                                   "offset": offset})  # fmt: skip

    @staticmethod
    def _event_id(tenant: Tenant, key: str | None, scope: str = "") -> str:
        """A new event's id: from the Idempotency-Key when there is one (the same key
        makes the same event, in any worker; ``scope`` keeps the ids of one key on two
        routes apart), else random."""
        if key:
            return str(uuid.uuid5(_EVENT_NS, f"{tenant.tenant_id}|{scope}{key}"))
        return str(uuid.uuid4())

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
                return self._event_id(tenant, key)

            record, errors = records.validate(
                "subscription_event",
                self.subscription_rules,
                body,
                now,
                defaults={"event_id": event_id, "timestamp": lambda: now},
            )
            if record is None:
                raise ApiError(422, "invalid", "the event is invalid", errors=errors)
            self._own(tenant, record["account_id"])
            problem = self.book.subscription_problem(record, tenant.owns)
            if problem:
                raise ApiError(422, "refused", "the event would be refused", errors=[problem])
            # a cancellation is a workflow: the lanes serve it (see streams/lanes.py)
            cancel = record["type"] == "subscription.cancelled"
            response = await self._accept(tenant, CANCELLATIONS if cancel else SUBSCRIPTIONS,
                                          record, "event_id")  # fmt: skip
            self.book.accepted(record)
            return response

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
            for i, (record, _) in enumerate(checked):  # what is certain to be refused later
                problem = None if record is None else self.book.usage_problem(record, tenant.owns)
                if problem:
                    checked[i] = (None, [problem])
            valid = [(i, r) for i, (r, _) in enumerate(checked) if r is not None]
            sent = await asyncio.gather(
                *(self._send(USAGE, r) for _, r in valid), return_exceptions=True
            )
            items: list[dict[str, Any]] = []
            outcome = dict(zip((i for i, _ in valid), sent, strict=True))
            for i, (record, errors) in enumerate(checked):
                if record is None:
                    items.append({"index": i, **_sent_event_id(events[i]), "status": "rejected",
                                  "errors": errors})  # fmt: skip
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

    async def post_credit(self, request: web.Request) -> web.Response:
        """Credit granted to an account (the rating contract's credit.granted): a record
        of billing.subscriptions keyed by the account, so that rating sees it in order
        with the account's other events."""
        tenant: Tenant = request["tenant"]
        key = request.headers.get("Idempotency-Key")

        async def work(body: Any) -> web.Response:
            now = datetime.now(UTC)
            event_id = self._event_id(tenant, key, "credit|")
            record, errors = records.validate(
                "subscription_event", records.CREDIT_RULES, body, now,
                server_fields=records.credit_server_fields(event_id, now),
                defaults={"credit_id": lambda: event_id},
            )  # fmt: skip
            if record is None:
                raise ApiError(422, "invalid", "the credit is invalid", errors=errors)
            return await self._accept(tenant, SUBSCRIPTIONS, record, "credit_id", "event_id")

        return await self._idempotent(request, work)

    async def put_customer(self, request: web.Request) -> web.Response:
        """The account's whole customer record, replaced (fields left out take their
        defaults: null, tax_exempt false, grace_hours 0): a record on billing.customers is
        always a whole customer, so a compacted topic keeps everything and two writers
        never merge halves of each other's records. Its country, tax status and grace
        hours go first to billing.subscriptions as a customer.updated event (the rating
        contract's), so that rating sees the change in order with the account's events."""
        tenant: Tenant = request["tenant"]
        account = request.match_info["account_id"]
        key = request.headers.get("Idempotency-Key")
        if not reads.ID_PATTERN.fullmatch(account):
            raise ApiError(422, "invalid", "the account id is invalid",
                           errors=["account_id: 1 to 128 letters, digits and ._:@-"])  # fmt: skip

        async def work(body: Any) -> web.Response:
            now = datetime.now(UTC)
            record, errors = records.validate(
                "customer", records.CUSTOMER_RULES, body, now,
                server_fields={"account_id": account, "timestamp": now},
            )  # fmt: skip
            if record is None:
                raise ApiError(422, "invalid", "the customer record is invalid", errors=errors)
            self._own(tenant, account)
            event_id = self._event_id(tenant, key, "customer|")
            updated = CustomerUpdated(now, account, record["country"], record["tax_exempt"],
                                      record["grace_hours"])  # fmt: skip
            topic, event = input_record(updated, account, event_id)
            await self._send(topic, event)  # first: a customer record is never ahead of it
            partition, offset = await self._send(CUSTOMERS, record)
            return json_response(202, {
                "status": "accepted", "account_id": account, "topic": CUSTOMERS.name,
                "partition": partition, "offset": offset, "event_id": event_id,
                "customer": reads.customer_json(record),
            })  # fmt: skip

        return await self._idempotent(request, work)

    # --- reads from the warehouse -------------------------------------------------------

    async def _warehouse(self, *sqls: str) -> list[list[list[Any]]]:
        """The rows of each query, from the sink's query endpoint (never chDB here: the
        sink owns it)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._run_queries, sqls)

    def _run_queries(self, sqls: tuple[str, ...]) -> list[list[list[Any]]]:
        from streams.warehouse import QueryError, WarehouseUnavailable, query

        try:
            return [query(self.settings, sql, timeout=10, open_here=False)["rows"]
                    for sql in sqls]  # fmt: skip
        except (WarehouseUnavailable, QueryError) as exc:
            # a refused query here is the warehouse's state (a migration not applied yet)
            log.warning("warehouse read failed", error=str(exc))
            raise ApiError(503, "warehouse_unavailable", WAREHOUSE_DOWN_MESSAGE,
                           retry_after=5) from None  # fmt: skip

    @staticmethod
    def _path_id(request: web.Request, name: str, what: str) -> str:
        value = request.match_info[name]
        if not reads.ID_PATTERN.fullmatch(value):
            raise ApiError(404, "not_found", f"no such {what}")
        return value

    async def get_invoice(self, request: web.Request) -> web.Response:
        """The invoice as JSON, or its document as HTML or PDF (a `.html` / `.pdf` suffix,
        or the Accept header)."""
        tenant: Tenant = request["tenant"]
        invoice_id, fmt = reads.document_format(
            request.match_info["invoice_id"], request.headers.get("Accept")
        )
        if not reads.ID_PATTERN.fullmatch(invoice_id):
            raise ApiError(404, "not_found", "no such invoice")
        invoice = await self._invoice(invoice_id)
        # another tenant's invoice is not found, as if it did not exist
        if invoice is None or not tenant.owns(invoice.account_id):
            raise ApiError(404, "not_found", "no such invoice")
        if fmt == "json":
            return json_response(200, invoice_to_dict(invoice))
        (rows,) = await self._warehouse(reads.customer_sql(invoice.account_id))
        customer = reads.customer_record(invoice.account_id, rows[0]) if rows else None
        document = invoice_document(invoice, customer, Issuer.from_settings(self.settings),
                                    dict(self.book.catalog.tax_rates))  # fmt: skip
        # (a PDF takes a few hundred ms of layout: off the event loop)
        body = await asyncio.get_running_loop().run_in_executor(None, render, document, fmt)
        return web.Response(status=200, body=body, headers={
            "Content-Type": DOCUMENT_TYPES[fmt],
            "Content-Disposition": f'inline; filename="{invoice_id}.{fmt}"',
        })  # fmt: skip

    async def _invoice(self, invoice_id: str) -> Invoice | None:
        head, lines = await self._warehouse(*reads.invoice_sql(invoice_id))
        return reads.invoice_from_rows(head[0], lines) if head else None

    async def list_invoices(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        q = request.query
        errors = [f"{k}: unknown parameter" for k in sorted(set(q) - INVOICE_QUERY)]
        account = q.get("account")
        if account is not None and not reads.ID_PATTERN.fullmatch(account):
            errors.append("account: an account id (letters, digits and ._:@-)")
        status = q.get("status")
        if status is not None and status not in reads.INVOICE_STATUSES:
            errors.append(f"status: one of {', '.join(reads.INVOICE_STATUSES)}")
        bounds = {k: _query_time(q.get(k), k, errors) for k in ("from", "to")}
        limit = reads.DEFAULT_PAGE
        if "limit" in q:
            text = q["limit"]
            limit = int(text) if text.isascii() and text.isdigit() else 0
            if not 1 <= limit <= reads.MAX_PAGE:
                errors.append(f"limit: an integer from 1 to {reads.MAX_PAGE}")
        after = None
        if "cursor" in q:
            after = reads.decode_cursor(q["cursor"])
            if after is None:
                errors.append("cursor: not a cursor of this API (use next_cursor as given)")
        if errors:
            raise ApiError(422, "invalid", "invalid query parameters", errors=errors)
        if account is not None and not tenant.owns(account):
            raise ApiError(404, "not_found", "no such account")
        (rows,) = await self._warehouse(
            reads.invoices_sql(
                tenant.account_prefix, account, status, bounds["from"], bounds["to"], after, limit
            )
        )
        page = [
            {"invoice_id": i, "account_id": a, "subscription_id": sub, "currency": c,
             "issued_at": _time(issued), "total": format_money(Decimal(total), c),
             "status": st}
            for i, a, sub, c, issued, total, st in rows[:limit]
        ]  # fmt: skip
        last = rows[limit - 1] if len(rows) > limit else None
        next_cursor = None if last is None else reads.encode_cursor(int(last[4]), last[0])
        return json_response(200, {"invoices": page, "next_cursor": next_cursor})

    async def get_subscription(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        sub_id = self._path_id(request, "subscription_id", "subscription")
        (rows,) = await self._warehouse(reads.subscription_sql(sub_id))
        if not rows or not tenant.owns(rows[0][1]) or not int(rows[0][3]):
            raise ApiError(404, "not_found", "no such subscription")
        sub, account, plan_id, created, status, cancelled, updated = rows[0]
        plan = self.book.catalog.plans.get(plan_id)
        return json_response(200, {
            "subscription_id": sub, "account_id": account, "plan_id": plan_id,
            "currency": plan.currency if plan else None,
            "interval": str(plan.interval) if plan else None,
            "status": status, "created_at": _time(created),
            "cancelled_at": None if cancelled is None else _time(cancelled),
            "updated_at": _time(updated),
        })  # fmt: skip

    async def get_customer(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        account = self._path_id(request, "account_id", "account")
        # another tenant's customer is not found, and costs no warehouse query
        if not tenant.owns(account):
            raise ApiError(404, "not_found", "no such customer")
        (rows,) = await self._warehouse(reads.customer_sql(account))
        if not rows:
            raise ApiError(404, "not_found", "no such customer")
        return json_response(200, reads.customer_json(reads.customer_record(account, rows[0])))

    async def get_refund(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        refund_id = self._path_id(request, "refund_id", "refund")
        (rows,) = await self._warehouse(reads.refund_sql(refund_id))
        if not rows or not tenant.owns(rows[0][2]):
            raise ApiError(404, "not_found", "no such refund (a pending one has no result yet)")
        (r_id, invoice_id, account, status, amount, currency, rejection, reason, reference,
         requested, completed) = rows[0]  # fmt: skip
        return json_response(200, {
            "refund_id": r_id, "invoice_id": invoice_id, "account_id": account,
            "status": status, "amount": format_money(Decimal(amount), currency),
            "currency": currency, "reason": reason, "rejection_reason": rejection,
            "gateway_reference": reference, "requested_at": _time(requested),
            "completed_at": _time(completed),
        })  # fmt: skip

    async def get_event(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        event_id = self._path_id(request, "event_id", "event")
        landed, dead = await self._warehouse(
            reads.landed_event_sql(event_id), reads.dead_letters_sql(event_id)
        )
        copies = {
            (USAGE.name if table == "usage_events" else SUBSCRIPTIONS.name, int(p), int(o)):
                reads.Copy(USAGE.name if table == "usage_events" else SUBSCRIPTIONS.name,
                           int(p), int(o), account, sub, int(ts),
                           "usage" if table == "usage_events" else "subscription")
            for table, account, sub, p, o, ts in landed
        }  # fmt: skip
        for topic, p, o, reason, detail, processor, value in dead:
            record = _decoded(topic, value)
            if record is None or record.get("event_id") != event_id:
                continue  # the id inside another field or another event's id
            where = (topic, int(p), int(o))
            copy = copies.get(where)
            if copy is None:  # refused before landing: a cancellation the lane refused
                copy = copies[where] = reads.Copy(
                    topic, int(p), int(o), record["account_id"], record["subscription_id"],
                    kind="usage" if topic == USAGE.name else "subscription",
                )  # fmt: skip
            copy.dead_letter = (reason, detail, processor)
        mine = [c for c in copies.values() if tenant.owns(c.account_id)]
        if not mine:
            raise ApiError(404, "not_found", "no such event in the warehouse (an event "
                           "accepted moments ago may not have landed yet)")  # fmt: skip
        dead_letters_landed = False
        if any(c.dead_letter is None for c in mine):
            rated, dead_letters_landed = await asyncio.get_running_loop().run_in_executor(
                None, self._rating_progress
            )
            for c in mine:
                c.rated = rated.get((c.topic, c.partition), -1) > c.offset
        status = reads.settle(mine, dead_letters_landed)
        answers = []
        for c in sorted(mine, key=lambda c: (c.topic, c.partition, c.offset)):
            answer: dict[str, Any] = {"topic": c.topic, "partition": c.partition,
                                      "offset": c.offset, "status": c.status}  # fmt: skip
            if c.dead_letter is not None:
                reason, detail, processor = c.dead_letter
                if reads.is_foreign_account(reason, detail):
                    reason = "account_mismatch"
                elif reads.is_unknown_subscription(reason, detail):
                    reason, detail = await self._foreign_or_unknown(tenant, c, reason, detail)
                answer |= {"reason": reason, "detail": detail, "processor": processor}
            answers.append(answer)
        return json_response(200, {"event_id": event_id, "status": status, "copies": answers})

    async def _foreign_or_unknown(
        self, tenant: Tenant, copy: reads.Copy, reason: str, detail: str
    ) -> tuple[str, str]:
        """A subscription "unknown" to the partition that an account of the same tenant
        owns was sent under another account. Another tenant's stays unknown: no answer
        tells one tenant about another's subscriptions."""
        (rows,) = await self._warehouse(reads.owner_sql(copy.subscription_id))
        owner = rows[0][0] if rows else None
        if owner is None or owner == copy.account_id or not tenant.owns(owner):
            return reason, detail
        return "account_mismatch", (f"subscription {copy.subscription_id!r} belongs to another "
                                    f"account than {copy.account_id!r}")  # fmt: skip

    def _rating_progress(self) -> tuple[dict[tuple[str, int], int], bool]:
        """The rating processor's committed offsets, and whether the sink has landed
        every dead letter committed up to now (read in this order: the rating processor
        writes an event's dead letter in the transaction that commits past it)."""
        from confluent_kafka import KafkaException

        from streams.kafka.lag import UnknownGroup, group_lags
        from streams.kafka.topics import DEAD_LETTER, group_id
        from streams.processors.rating import GROUP as RATING_GROUP
        from streams.processors.sink import GROUP as SINK_GROUP

        try:
            try:
                rating = group_lags(self.settings, self.kafka.bootstrap, 5.0,
                                    group_id(RATING_GROUP))  # fmt: skip
            except UnknownGroup:
                return {}, False
            committed = {(r.topic, r.partition): r.committed or 0 for r in rating}
            try:
                sink = group_lags(self.settings, self.kafka.bootstrap, 5.0, group_id(SINK_GROUP))
            except UnknownGroup:
                return committed, False
        except KafkaException as exc:
            raise KafkaUnavailable(str(exc)) from None
        dead = [r for r in sink if r.topic == DEAD_LETTER.name]
        return committed, bool(dead) and all(r.lag == 0 for r in dead)

    # --- plans (billing.catalog): global, published and retired with an operator's key ---

    def _plans(self, tenant: Tenant | None = None) -> PlanCatalog:
        """The catalog; with `tenant`, for a write: 403 unless it is an operator."""
        if tenant is not None and not tenant.admin:
            raise ApiError(403, "forbidden", "plans are published and retired with an "
                           'operator\'s key (a tenant with "admin": true)')  # fmt: skip
        if self.plan_catalog is None:
            raise ApiError(503, "catalog_unavailable", "this worker serves no catalog",
                           retry_after=5)  # fmt: skip
        return self.plan_catalog

    async def list_plans(self, request: web.Request) -> web.Response:
        """Each plan's latest version (with its number of versions and retirement), or
        with ?all_versions=true every version; any tenant may read them."""
        from streams.catalog_store import version_json, versions_by_plan

        q = request.query
        errors = [f"{k}: unknown parameter" for k in sorted(set(q) - {"all_versions"})]
        every = q.get("all_versions", "false")
        if every not in ("true", "false"):
            errors.append("all_versions: true or false")
        if errors:
            raise ApiError(422, "invalid", "invalid query parameters", errors=errors)
        rows = versions_by_plan(self._plans().histories(), every == "true")
        return json_response(200, {"plans": [version_json(h, v) for h, v in rows]})

    async def post_plan(self, request: web.Request) -> web.Response:
        """A plan's next version (its first: a new plan), in effect now: 201 with it, or
        200 with the latest version when that has the same definition and `existing`
        (nothing published); 422 with the reason when the plan is invalid or the rating
        contract refuses it (a retired plan, another currency or interval)."""
        from streams.catalog_store import UNCHANGED, publish_plans, version_json
        from streams.domain.catalog import CatalogError

        plans = self._plans(request["tenant"])

        async def work(body: Any) -> web.Response:
            plan, existing, errors = records.plan_body(body)
            if plan is None:
                raise ApiError(422, "invalid", "; ".join(errors), errors=errors)
            try:
                (result,) = await plans.write(publish_plans, [(plan, existing)],
                                              datetime.now(UTC))  # fmt: skip
            except CatalogError as exc:
                raise ApiError(422, "refused", str(exc), errors=[str(exc)]) from None
            shown = version_json(result.history, result.version)
            return json_response(200 if result.action == UNCHANGED else 201,
                                 {k: shown[k] for k in PUBLISHED_FIELDS})  # fmt: skip

        return await self._idempotent(request, work)

    async def retire_plan(self, request: web.Request) -> web.Response:
        """The plan retired now: no creation or plan change names it from then on; its
        subscriptions go on. 404 for a plan the catalog does not have, 409 if retired."""
        from streams.catalog_store import PlanAlreadyRetired, PlanNotFound, retire_plan
        from streams.domain.catalog import CatalogError

        plans = self._plans(request["tenant"])
        plan_id = self._path_id(request, "plan_id", "plan")
        try:
            history = await plans.write(retire_plan, plan_id, datetime.now(UTC))
        except PlanNotFound:
            raise ApiError(404, "not_found", "no such plan") from None
        except PlanAlreadyRetired as exc:
            raise ApiError(409, "already_retired", str(exc)) from None
        except CatalogError as exc:
            raise ApiError(422, "refused", str(exc), errors=[str(exc)]) from None
        return json_response(200, {"plan_id": plan_id,
                                   "retired_at": format_timestamp(history.retired_at)})  # fmt: skip

    async def health(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok", "uptime_s": round(time.time() - self.started)})

    async def ready(self, request: web.Request) -> web.Response:
        """Ready when Kafka answers (metadata within 1 s) and is not known to be down."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: self.kafka.producer.list_topics(timeout=1))
        except Exception as exc:  # any client error means: not ready
            log.warning("not ready: kafka metadata", error=str(exc))
            return json_response(
                503, {"status": "unavailable", "kafka": "no answer"}, {"Retry-After": "1"}
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
        app.router.add_post("/v1/credits", self.post_credit)
        app.router.add_get("/v1/invoices", self.list_invoices)
        app.router.add_get("/v1/invoices/{invoice_id}", self.get_invoice)
        app.router.add_get("/v1/subscriptions/{subscription_id}", self.get_subscription)
        app.router.add_get("/v1/refunds/{refund_id}", self.get_refund)
        app.router.add_put("/v1/customers/{account_id}", self.put_customer)
        app.router.add_get("/v1/customers/{account_id}", self.get_customer)
        app.router.add_get("/v1/events/{event_id}", self.get_event)
        app.router.add_get("/v1/plans", self.list_plans)
        app.router.add_post("/v1/plans", self.post_plan)
        app.router.add_post("/v1/plans/{plan_id}/retire", self.retire_plan)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/readyz", self.ready)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/metrics", self.metrics)
        return app


INVOICE_QUERY = frozenset({"account", "status", "from", "to", "limit", "cursor"})
# POST /v1/plans answers with these of the version (GET /v1/plans adds versions, retired_at)
PUBLISHED_FIELDS = ("plan_id", "version", "published_at", "existing", "plan")
# a catalog write is a Kafka transaction and the reads around it: its whole time budget
PLAN_WRITE_TIMEOUT_S = 10.0


def _time(micros: Any) -> str:
    return format_timestamp(from_micros(int(micros)))


def _query_time(text: str | None, name: str, errors: list[str]) -> int | None:
    """An RFC 3339 query parameter as epoch µs."""
    if text is None:
        return None
    try:
        if not records.RFC3339.fullmatch(text):
            raise InvalidTimestamp(text)
        return to_micros(parse_timestamp(text.upper()))
    except (InvalidTimestamp, OverflowError, ValueError):
        errors.append(f"{name}: an RFC 3339 timestamp with its offset, e.g. 2026-01-31T10:00:00Z")
        return None


def _decoded(topic: str, value_hex: str | None) -> dict[str, Any] | None:
    """A dead letter's original event, if it decodes as one of the event topics'."""
    spec = EVENT_TOPICS.get(topic)
    if spec is None or value_hex is None:
        return None
    try:
        return codec(spec.schema).decode(bytes.fromhex(value_hex))
    except Exception:  # not an event: an invalid one is not what was asked about
        return None


def tenants_path(settings: Settings) -> Path:
    return settings.api_tenants or settings.home / "api" / "tenants.json"


def serve(settings: Settings, bootstrap: str, host: str, port: int, workers: int = 1) -> None:
    """One worker process (``--workers`` starts several on the same port)."""
    import json

    import uvloop

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
        plans = PlanCatalog(settings, bootstrap,
                            max(settings.api_kafka_timeout_s, PLAN_WRITE_TIMEOUT_S))  # fmt: skip
        plans.start()
        api = Api(settings, kafka, tenants, catalog, workers, plan_catalog=plans)
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
        await plans.close()

    uvloop.run(main())
