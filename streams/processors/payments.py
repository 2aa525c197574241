"""The payments processor: due invoices -> gateway charges -> billing.payment-results.

Many charges are in flight at once (asyncio, ``streams.runtime.tasks``): each merchant
account has its own throttle (``streams.payments.throttle``), an AIMD concurrency limit
under the account's cap minus the slots reserved for the priority lane, and a circuit
breaker. Every attempt has a deterministic idempotency key (``streams.domain.payments``),
so sending it again after a crash, a replay or a rebalance returns the first outcome
instead of charging twice.

- Transient errors (unavailable, time-out, lost connection) are retried with the same
  key, with exponential backoff and jitter, for as long as it takes: the outcome of such
  a call is unknown, and only the same key can learn it without risking a second charge.
  The breaker stops a failing account's traffic and probes it until it recovers.
- 429s shrink the throttle's limit and wait for the gateway's Retry-After.
- A decline (or a gateway refusal of the request) is an attempt's outcome: the result is
  published, and dunning schedules attempt n+1 by producing it to retry topic n (one
  topic per step, see ``streams.kafka.topics``). Records there wait, partition paused,
  until due: no consumer sleeps, nothing is skipped. After the last step the invoice is
  ``uncollectible``.

Offsets are committed per partition up to the first record whose outputs are not yet
acknowledged by Kafka (``streams.runtime.offsets``); after a crash the rest is processed
again, idempotently. A payment run (``billing.payment-control``) makes everything due up
to its instant due now.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from confluent_kafka import Consumer, TopicPartition

from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.domain.money import UnknownCurrency, minor_units
from streams.domain.payments import (
    Final,
    Retry,
    after_attempt,
    backoff,
    idempotency_key,
    parse_schedule,
    payable,
    payment_id,
)
from streams.kafka.topics import (
    CUSTOMERS,
    INVOICES,
    PAYMENT_CONTROL,
    PAYMENT_REQUESTS,
    PAYMENT_RESULTS,
    PAYMENT_RETRIES,
)
from streams.metrics import GATEWAY_SECONDS, PAYMENTS, RECORDS
from streams.payments.gateway import (
    ChargeOutcome,
    ChargeRequest,
    Gateway,
    RateLimited,
    TransientError,
    make_gateway,
)
from streams.payments.throttle import AccountThrottle
from streams.runtime.deadletter import produce_dead_letter
from streams.runtime.loop import StreamLoop
from streams.runtime.offsets import TP
from streams.runtime.process import StopFlag, tune_gc
from streams.runtime.table import TopicTable
from streams.runtime.tasks import TaskLoop

log = structlog.get_logger(__name__)
GROUP = "streambill-payments"
NAME = "payments"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def request_problem(req: dict[str, Any]) -> str | None:
    """Why a payment request decoded from Kafka cannot be attempted, if it cannot: it
    becomes a dead letter instead of a gateway call that cannot succeed, or a crash (an
    attempt below 1 has no dunning step: after_attempt refuses it)."""
    if req["attempt"] < 1:
        return f"attempt {req['attempt']}: attempts count from 1"
    if not req["amount"] > 0:
        return f"amount {req['amount']} is not positive"
    for name in ("invoice_id", "account_id", "idempotency_key", "payment_method"):
        if not req[name]:
            return f"{name} is empty"
    try:
        minor_units(req["currency"])
    except UnknownCurrency as exc:
        return str(exc)
    return None


def decode_request(value: bytes | None, latest_due: datetime | None = None) -> dict[str, Any]:
    """A record of billing.payment-requests or a retry topic; raises DecodeError (reason
    invalid_request for one that decodes but cannot be attempted, or, with `latest_due`,
    one not due until after it: a retry topic is read in order, so such a record would
    hold up its partition for as long)."""
    request = codec(PAYMENT_REQUESTS.schema).decode(value)
    problem = request_problem(request)
    if problem:
        raise DecodeError("invalid_request", problem)
    if latest_due is not None and request["not_before"] > latest_due:
        due = f"{request['not_before']:%Y-%m-%d}"
        raise DecodeError("invalid_request", f"not due before {due}: beyond the dunning "
                          f"schedule (latest {latest_due:%Y-%m-%d})")  # fmt: skip
    return request


def request_for_invoice(
    value: bytes | None, merchant_accounts: tuple[str, ...], now: datetime
) -> dict[str, Any] | None:
    """A record of billing.invoices -> the request of its first attempt, or None when
    there is nothing to collect (a credit, zero, paid by credit, no payment method); raises
    DecodeError (reason invalid_invoice for one that decodes but cannot be charged). It
    collects the amount due: the total less the credit applied (a record written before
    amount_due existed: its total)."""
    inv = codec(INVOICES.schema).decode(value)
    due = inv["total"] if inv["amount_due"] is None else inv["amount_due"]
    if not payable(due, inv["payment_method"]):
        return None
    request = {
        "payment_id": payment_id(inv["invoice_id"], 1),
        "idempotency_key": idempotency_key(inv["invoice_id"], 1),
        "invoice_id": inv["invoice_id"],
        "account_id": inv["account_id"],
        "attempt": 1,
        "amount": due,
        "currency": inv["currency"],
        "payment_method": inv["payment_method"],
        "gateway_account": route(inv["account_id"], merchant_accounts),
        "not_before": inv["issued_at"],
        "requested_at": now,
    }
    problem = request_problem(request)
    if problem:
        raise DecodeError("invalid_invoice", problem)
    return request


def route(account_id: str, merchant_accounts: tuple[str, ...]) -> str:
    """A customer account's merchant account: stable (not hash(), which changes per
    process) and spread evenly, also within each partition. Not crc32: librdkafka's
    default partitioner is crc32 of the same key, so with 6 partitions and 4 accounts the
    even partitions held only accounts 0 and 2; a dispatcher reading mostly even
    partitions for a while left half its gateway slots idle (measured: in flight 480 of
    960 for seconds at a time, and a run's tail drained one account after the other)."""
    digest = hashlib.blake2b(account_id.encode(), digest_size=8).digest()
    return merchant_accounts[int.from_bytes(digest) % len(merchant_accounts)]


@dataclass
class Attempt:
    request: dict[str, Any]  # a payment_request record
    source: TP
    offset: int
    sent: bool = False  # a gateway call was made: it must get its result


class PaymentsProcessor:
    def __init__(
        self,
        settings: Settings,
        stream: StreamLoop,
        gateway: Gateway,
        customers: TopicTable[str | None],
        max_pending: int = 5_000,
    ) -> None:
        """stream: its consumer in the payments group and its producer (``make_payments``
        builds them); gateway: see ``streams.payments.gateway.make_gateway``; customers:
        each account's current payment method (``customer_payment_methods``), read up to
        its end; max_pending: attempts decoded and waiting for a slot at most, a second or
        two at the gateways' pace (more only holds memory and gives the collector more to
        walk: with 20,000 the loop stalled 100-200 ms in collections and its mean lag was
        7-15 ms (5,000: 2-5 ms), and every ms of lag is a slot left idle after its answer
        came)."""
        self.gateway = gateway
        self.customers = customers
        self.schedule = parse_schedule(settings.dunning)
        # a retry due later than this is refused (it would hold its partition up); roomy
        # enough for a schedule shortened while retries of the old one are waiting
        self.longest_wait = max(*self.schedule, timedelta(days=35)) + timedelta(days=1)
        if len(self.schedule) > len(PAYMENT_RETRIES):
            raise ValueError(f"at most {len(PAYMENT_RETRIES)} dunning steps are supported")
        self.accounts = settings.merchant_accounts
        cap = settings.gateway_max_concurrency - settings.priority_reserve
        if cap < 1:
            raise ValueError("the priority reserve leaves no slot for payments")
        self.throttles = {a: AccountThrottle(a, cap) for a in self.accounts}
        self.loop = TaskLoop(stream, batch=500, commit_every_s=0.5, idle_s=0.005,
                             max_tasks=max_pending, task_kind="payment")  # fmt: skip
        self.consumer = stream.consumer
        self.producer = stream.producer
        self.offsets = self.loop.offsets
        self.topics = {
            "invoices": INVOICES.name,
            "requests": PAYMENT_REQUESTS.name,
            "control": PAYMENT_CONTROL.name,
            "retries": [t.name for t in PAYMENT_RETRIES[: len(self.schedule)]],
        }
        self.results_topic = PAYMENT_RESULTS.name
        # metric children looked up once, not per payment (labels() takes a lock)
        self.records_metric = RECORDS.labels(NAME, "all")
        self.charge_seconds = GATEWAY_SECONDS.labels(NAME, "charge")
        self.payments_metric = {s: PAYMENTS.labels(s) for s in ("succeeded", "declined", "failed")}
        self.held: dict[TP, deque[Attempt]] = {}  # waiting until due, partition paused
        self.horizon = EPOCH  # a payment run's instant: due up to it means due now
        self.last_due_check = 0.0
        self.stopping = False  # set on SIGTERM: in-flight calls finish, the rest waits
        self.rng = random.Random()
        self.completed = 0

    @property
    def stop(self) -> StopFlag:
        return self.loop.stream.stop

    # --- the loop -------------------------------------------------------------------

    def run(self) -> int:
        # a young collection every few dozen payments promoted those in flight and full
        # ones walked them all: 12 % of the dispatcher's CPU at the default thresholds
        tune_gc(20_000, 10)
        import uvloop

        return uvloop.run(self.run_async())

    async def run_async(self) -> int:
        topics = [self.topics["invoices"], self.topics["requests"], self.topics["control"]]
        self.loop.subscribe(topics + self.topics["retries"], on_revoke=self._on_revoke)
        await self.loop.run(self._on_records, self._release_due_now_and_then,
                            on_stop=self._on_stop, close=self._close)  # fmt: skip
        return self.completed

    async def _close(self) -> None:
        self.customers.close()
        await self.gateway.close()

    def _on_records(self, msgs: list[Any]) -> None:
        for msg in msgs:
            self.handle(msg)
        self.records_metric.inc(len(msgs))

    def _release_due_now_and_then(self) -> int:
        now = time.monotonic()
        if now - self.last_due_check > 0.2:
            self._release_due()
            self.last_due_check = now
        return 0

    def _on_stop(self) -> None:
        """SIGTERM: no new work; charges already sent finish and their results are
        published, so no payment is left half-done; charges not sent yet are handed back
        uncommitted; then the final commit."""
        self.stopping = True
        if self.loop.tasks:
            log.info("stopping: finishing in-flight payments", in_flight=len(self.loop.tasks))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # (a retry partition paused for its held attempts was resumed by the loop)
        for tp in partitions:
            self.held.pop((tp.topic, tp.partition), None)

    # --- records --------------------------------------------------------------------

    def handle(self, msg: Any) -> Attempt | None:
        """A consumed record -> the attempt it starts or holds until due; None for one
        finished at once (nothing to collect, a payment run) or dead-lettered."""
        tp, offset = (msg.topic(), msg.partition()), msg.offset()
        self.offsets.start(tp, offset)
        topic = tp[0]
        try:
            if topic == self.topics["invoices"]:
                request = request_for_invoice(msg.value(), self.accounts, datetime.now(UTC))
                if request is None:  # nothing to collect (credit, zero, no method)
                    self.offsets.finish(tp, offset)
                    return None
                attempt = Attempt(request, tp, offset)
                self._spawn(attempt)
                return attempt
            if topic == self.topics["control"]:
                run = codec(PAYMENT_CONTROL.schema).decode(msg.value())
                self.horizon = max(self.horizon, run["until"])
                log.info("payment run", run_id=run["run_id"], until=run["until"].isoformat())
                self.offsets.finish(tp, offset)
                return None
            latest_due = datetime.now(UTC) + self.longest_wait
            attempt = Attempt(decode_request(msg.value(), latest_due), tp, offset)
            self._schedule(attempt)
            return attempt
        except DecodeError as exc:
            produce_dead_letter(self.producer, msg, exc.reason, exc.detail, NAME,
                                on_delivery=self.offsets.finisher(tp, offset, 1))  # fmt: skip
            return None

    def _schedule(self, attempt: Attempt) -> None:
        held = self.held.get(attempt.source)
        if held is None and self._due(attempt.request):
            self._spawn(attempt)
            return
        if held is None:
            held = self.held[attempt.source] = deque()
            # nothing after a record that is not due can be: stop fetching meanwhile
            self.consumer.pause([TopicPartition(*attempt.source)])
        held.append(attempt)

    def _due(self, request: dict[str, Any]) -> bool:
        return request["not_before"] <= max(datetime.now(UTC), self.horizon)

    def _release_due(self) -> None:
        for tp, held in list(self.held.items()):
            while held and self._due(held[0].request):
                self._spawn(held.popleft())
            if not held:
                del self.held[tp]
                self.consumer.resume([TopicPartition(*tp)])

    def _spawn(self, attempt: Attempt) -> None:
        self.loop.spawn(self._attempt(attempt))

    # --- one attempt ------------------------------------------------------------------

    async def _attempt(self, attempt: Attempt) -> None:
        req = attempt.request
        # the customer's payment method now, if the account has one: a dunning retry after
        # the customer gave a new card charges the new card. Fixed for the attempt (its
        # transient retries resend the same request under the same idempotency key).
        req["payment_method"] = self.customers.get(req["account_id"]) or req["payment_method"]
        throttle = self.throttles.get(req["gateway_account"])
        if throttle is None:  # a request routed to an account this dispatcher does not know
            throttle = self.throttles[route(req["account_id"], self.accounts)]
            req["gateway_account"] = throttle.name
        charge = ChargeRequest(
            merchant_account=throttle.name,
            idempotency_key=req["idempotency_key"],
            invoice_id=req["invoice_id"],
            account_id=req["account_id"],
            amount=req["amount"],
            currency=req["currency"],
            payment_method=req["payment_method"],
        )
        started = time.monotonic()
        transient = 0
        while True:
            ticket = await throttle.acquire()
            if self.stopping and not attempt.sent:
                # stopping: work never sent is handed back (its offset stays uncommitted
                # and the next owner charges it, with the same idempotency key)
                throttle.release("ok")
                return
            attempt.sent = True
            try:
                outcome = await self.gateway.charge(charge)
            except RateLimited as exc:
                throttle.release("overload", ticket)
                await asyncio.sleep(exc.retry_after * self.rng.uniform(0.5, 1.5))
                continue
            except TransientError:
                throttle.release("failure")
                transient += 1
                await asyncio.sleep(backoff(min(transient, 8), rng=self.rng))
                continue
            except ValueError as exc:  # the gateway refused the request itself
                throttle.release("ok")
                outcome = ChargeOutcome("declined", None, f"invalid_request: {exc}"[:200])
                status = "failed"
                break
            throttle.release("ok")
            status = outcome.status
            break
        seconds = time.monotonic() - started
        self.charge_seconds.observe(seconds)
        (self.payments_metric.get(status) or PAYMENTS.labels(status)).inc()
        self._complete(attempt, status, outcome, seconds * 1000)

    def _complete(
        self, attempt: Attempt, status: str, outcome: ChargeOutcome, latency_ms: float
    ) -> None:
        req = attempt.request
        now = datetime.now(UTC)
        results = [self._result(req, status, outcome, latency_ms, now)]
        follow_up: tuple[str, dict[str, Any]] | None = None
        step = after_attempt(status, req["attempt"], now, self.schedule)  # type: ignore[arg-type]
        if isinstance(step, Retry):
            follow_up = (
                PAYMENT_RETRIES[req["attempt"] - 1].name,
                {
                    **req,
                    "payment_id": payment_id(req["invoice_id"], step.attempt),
                    "idempotency_key": idempotency_key(req["invoice_id"], step.attempt),
                    "attempt": step.attempt,
                    "not_before": step.not_before,
                    "requested_at": now,
                },
            )
        elif isinstance(step, Final) and step.status == "uncollectible":
            verdict = ChargeOutcome("declined", None, outcome.decline_code)
            result = self._result(req, "uncollectible", verdict, 0.0, now)
            result["payment_id"] = f"{req['invoice_id']}:uncollectible"
            results.append(result)
        done = self.offsets.finisher(attempt.source, attempt.offset, len(results) + bool(follow_up))
        encode_result = codec(PAYMENT_RESULTS.schema).encode
        key = req["account_id"].encode()
        if follow_up:
            topic, request = follow_up
            self._produce(topic, key, codec(PAYMENT_REQUESTS.schema).encode(request), done)
        for result in results:
            self._produce(self.results_topic, key, encode_result(result), done)
        self.completed += 1

    @staticmethod
    def _result(
        req: dict[str, Any], status: str, outcome: ChargeOutcome, latency_ms: float, at: datetime
    ) -> dict[str, Any]:
        return {
            "payment_id": req["payment_id"],
            "invoice_id": req["invoice_id"],
            "account_id": req["account_id"],
            "attempt": req["attempt"],
            "status": status,
            "amount": Decimal(req["amount"]),
            "currency": req["currency"],
            "gateway_account": req["gateway_account"],
            "gateway_reference": outcome.reference,
            "payment_method": req["payment_method"] if status != "uncollectible" else None,
            "decline_code": outcome.decline_code if status != "succeeded" else None,
            "latency_ms": round(latency_ms, 3),
            "completed_at": at,
        }

    def _produce(self, topic: str, key: bytes, value: bytes, on_delivery: Callable) -> None:
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                return
            except BufferError:
                self.producer.poll(0.05)


def make_payments(settings: Settings, bootstrap: str) -> PaymentsProcessor:
    """The processor with its clients built from the settings (the CLI's)."""
    # (the producer's default 20 ms linger: results are batched, half the broker's CPU of 5 ms)
    customers = customer_payment_methods(settings, bootstrap, NAME)
    stream = StreamLoop.from_settings(NAME, settings, bootstrap, GROUP)
    return PaymentsProcessor(settings, stream, make_gateway(settings), customers)


def customer_payment_methods(settings: Settings, bootstrap: str, name: str) -> TopicTable:
    """account -> its customer's payment method (None: none given), billing.customers read
    up to its end before it is returned."""

    def payment_method(value: bytes) -> str | None:
        return codec(CUSTOMERS.schema).decode(value)["payment_method"]

    table = TopicTable(settings, bootstrap, CUSTOMERS.name, payment_method, name).start()
    table.catch_up()
    return table
