"""The payments processor: due invoices -> gateway charges -> billing.payment-results.

Many charges are in flight at once (asyncio): each merchant account has its own lane,
an AIMD concurrency limit under the account's cap minus the slots reserved for the
priority lane, and a circuit breaker (``streams.payments.control``). Every attempt has a
deterministic idempotency key (``streams.domain.payments``), so sending it again after
a crash, a replay or a rebalance returns the first outcome instead of charging twice.

- Transient errors (unavailable, time-out, lost connection) are retried with the same
  key, with exponential backoff and jitter, for as long as it takes: the outcome of such
  a call is unknown, and only the same key can learn it without risking a second charge.
  The breaker stops a failing account's traffic and probes it until it recovers.
- 429s shrink the lane's limit and wait for the gateway's Retry-After.
- A decline (or a gateway refusal of the request) is an attempt's outcome: the result is
  published, and dunning schedules attempt n+1 by producing it to retry topic n (one
  topic per step, see ``streams.kafka.topics``). Records there wait, partition paused,
  until due: no consumer sleeps, nothing is skipped. After the last step the invoice is
  ``uncollectible``.

Offsets are committed per partition up to the first record whose outputs are not yet
acknowledged by Kafka; after a crash the rest is processed again, idempotently. A
payment run (``billing.payment-control``) makes everything due up to its instant due now.
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
from confluent_kafka import Consumer, KafkaException, TopicPartition

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
from streams.kafka import clients
from streams.kafka.topics import (
    INVOICES,
    PAYMENT_CONTROL,
    PAYMENT_REQUESTS,
    PAYMENT_RESULTS,
    PAYMENT_RETRIES,
    group_id,
)
from streams.metrics import (
    CIRCUIT_OPEN,
    COMMIT_FAILURES,
    GATEWAY_IN_FLIGHT,
    GATEWAY_LIMIT,
    GATEWAY_SECONDS,
    PAYMENTS,
    RECORDS,
    LagTracker,
)
from streams.payments.control import CLOSED, AimdLimit, CircuitBreaker
from streams.payments.gateway import (
    ChargeOutcome,
    ChargeRequest,
    Gateway,
    RateLimited,
    TransientError,
)
from streams.runtime.deadletter import produce_dead_letter
from streams.runtime.process import StopFlag, tune_gc

log = structlog.get_logger(__name__)
GROUP = "streambill-payments"
NAME = "payments"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TP = tuple[str, int]


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
    there is nothing to collect (a credit, zero, no payment method); raises DecodeError
    (reason invalid_invoice for one that decodes but cannot be charged)."""
    inv = codec(INVOICES.schema).decode(value)
    if not payable(inv["total"], inv["payment_method"]):
        return None
    request = {
        "payment_id": payment_id(inv["invoice_id"], 1),
        "idempotency_key": idempotency_key(inv["invoice_id"], 1),
        "invoice_id": inv["invoice_id"],
        "account_id": inv["account_id"],
        "attempt": 1,
        "amount": inv["total"],
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


class OffsetTracker:
    """Per partition: the records started, in offset order, and which are finished; the
    commit position is the first unfinished one."""

    def __init__(self) -> None:
        self.error: str | None = None  # a failed delivery: the processor must stop
        self.started: dict[TP, deque[int]] = {}
        self.finished: dict[TP, set[int]] = {}
        self.position: dict[TP, int] = {}
        self.dirty: set[TP] = set()

    def start(self, tp: TP, offset: int) -> None:
        self.started.setdefault(tp, deque()).append(offset)
        self.finished.setdefault(tp, set())

    def finish(self, tp: TP, offset: int) -> None:
        started, finished = self.started.get(tp), self.finished.get(tp)
        if started is None or finished is None:
            return  # the partition was revoked meanwhile: its new owner redoes the record
        finished.add(offset)
        last = None
        while started and started[0] in finished:
            last = started.popleft()
            finished.discard(last)
        if last is not None:
            self.position[tp] = started[0] if started else last + 1
            self.dirty.add(tp)

    def forget(self, tp: TP) -> None:
        self.started.pop(tp, None)
        self.finished.pop(tp, None)
        self.position.pop(tp, None)
        self.dirty.discard(tp)

    def commits(self) -> list[TopicPartition]:
        out = [TopicPartition(t, p, self.position[(t, p)]) for t, p in self.dirty]
        self.dirty.clear()
        return out

    def commit(self, consumer: Consumer, processor: str) -> None:
        """Commit the finished positions. A commit refused because the group moved on (a
        rebalance, or its coordinator lost with a broker) is not fatal: the positions are
        committed again next time, and a partition that changed hands is re-read by its
        new owner, where the idempotency keys make the repeat harmless."""
        offsets = self.commits()
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].fatal():
                raise
            self.dirty.update((tp.topic, tp.partition) for tp in offsets
                              if (tp.topic, tp.partition) in self.position)  # fmt: skip
            COMMIT_FAILURES.labels(processor).inc()
            log.warning("offset commit refused; committed again later", error=str(exc))

    def finisher(self, tp: TP, offset: int, outputs: int) -> Callable[[Any, Any], None]:
        """A delivery callback: the source record is finished once all its `outputs` are
        acknowledged by Kafka."""
        left = [outputs]

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                self.error = f"delivery failed: {err}"
                return
            left[0] -= 1
            if left[0] == 0:
                self.finish(tp, offset)

        return delivered


class Lane:
    """One merchant account's flow control: AIMD concurrency limit + circuit breaker."""

    def __init__(self, name: str, cap: int, processor: str = "payments") -> None:
        self.name = name
        self.limit = AimdLimit(cap=cap, limit=min(cap, 32))
        self.breaker = CircuitBreaker()
        self.in_flight = 0
        self.sent = 0  # calls let through so far: the ticket of the last one
        self.round_end = 0  # 429s to calls let through up to this one are already counted
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.waking = 0  # waiters woken that have not taken their slot yet
        self._was_open = False
        # read when Prometheus scrapes: nothing is updated per call
        GATEWAY_IN_FLIGHT.labels(processor, name).set_function(lambda: self.in_flight)
        GATEWAY_LIMIT.labels(processor, name).set_function(lambda: self.limit.allowed)
        CIRCUIT_OPEN.labels(processor, name).set_function(
            lambda: float(self.breaker.state != CLOSED)
        )

    async def acquire(self) -> int:
        """Wait for a slot; returns the call's ticket, for ``release``."""
        while True:
            # (slots promised to woken waiters that have not run yet are not free)
            if self.in_flight + self.waking < self.limit.allowed:
                if self.breaker.allow(time.monotonic()):
                    self.in_flight += 1
                    self.sent += 1
                    return self.sent
                await asyncio.sleep(max(0.01, self.breaker.retry_in(time.monotonic())))
                continue
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter.done() and not waiter.cancelled():
                    self.waking -= 1

    def release(self, outcome: str, ticket: int | None = None) -> None:
        """outcome: ok (an answer), overload (429) or failure (transient). A 429 to a call
        let through before the last decrease (its ticket is at most ``round_end``) answers
        for the same excess and does not cut the limit again: one decrease per round, as
        TCP does, or the many 429s of one overshoot would cut it to the floor."""
        self.in_flight -= 1
        now = time.monotonic()
        if outcome == "ok":
            self.limit.on_success()
            self.breaker.on_success()
        elif outcome == "overload":
            if ticket is None or ticket > self.round_end:
                self.limit.on_overload()
                self.round_end = self.sent
            self.breaker.probing = False  # a 429 is an answer: the account is up
        else:
            opened = self.breaker.opened_count
            self.breaker.on_failure(now)
            if self.breaker.opened_count > opened:
                log.warning(
                    "circuit open: gateway account keeps failing, probing it",
                    merchant_account=self.name,
                    seconds=self.breaker.current_open,
                )
        if self.breaker.state == "closed" and self._was_open:
            log.info("circuit closed: gateway account recovered", merchant_account=self.name)
        self._was_open = self.breaker.state != "closed"
        # wake as many waiters as there are free slots (a success can free two: its own
        # and one more allowed)
        free = self.limit.allowed - self.in_flight - self.waking
        while free > 0 and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.waking += 1
                free -= 1


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
        bootstrap: str,
        gateway: Gateway,
        max_pending: int = 5_000,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
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
        self.lanes = {a: Lane(a, cap) for a in self.accounts}
        # attempts decoded and waiting for a slot: a second or two at the gateways' pace.
        # More only holds memory and gives the collector more to walk: with 20,000 the
        # loop stalled 100-200 ms in collections and its mean lag was 7-15 ms (5,000:
        # 2-5 ms), and every ms of lag is a slot left idle after its answer came.
        self.max_pending = max_pending
        self.consumer: Consumer = clients.consumer(settings, bootstrap, group_id(GROUP))
        self.lag = LagTracker(self.consumer, "payments")
        # (the default 20 ms linger: results are batched, half the broker's CPU of 5 ms)
        self.producer = clients.producer(settings, bootstrap)
        self.topics = {
            "invoices": INVOICES.name,
            "requests": PAYMENT_REQUESTS.name,
            "control": PAYMENT_CONTROL.name,
            "retries": [t.name for t in PAYMENT_RETRIES[: len(self.schedule)]],
        }
        self.retry_topics = {t.name: n for n, t in enumerate(PAYMENT_RETRIES, 1)}
        self.results_topic = PAYMENT_RESULTS.name
        # metric children looked up once, not per payment (labels() takes a lock)
        self.records_metric = RECORDS.labels("payments", "all")
        self.charge_seconds = GATEWAY_SECONDS.labels("payments", "charge")
        self.payments_metric = {s: PAYMENTS.labels(s) for s in ("succeeded", "declined", "failed")}
        self.tracker = OffsetTracker()
        self.held: dict[TP, deque[Attempt]] = {}  # waiting until due, partition paused
        self.horizon = EPOCH  # a payment run's instant: due up to it means due now
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop = StopFlag()
        self.stopping = False  # set on SIGTERM: in-flight calls finish, the rest waits
        self.rng = random.Random()
        self.completed = 0
        self._delivery_error: str | None = None

    # --- the loop -------------------------------------------------------------------

    def run(self) -> int:
        # a young collection every few dozen payments promoted those in flight and full
        # ones walked them all: 12 % of the dispatcher's CPU at the default thresholds
        tune_gc(20_000, 10)
        try:
            import uvloop

            return uvloop.run(self.run_async())
        except ImportError:  # pragma: no cover - uvloop is a dependency
            return asyncio.run(self.run_async())

    async def run_async(self) -> int:
        topics = [self.topics["invoices"], self.topics["requests"], self.topics["control"]]
        self.consumer.subscribe(topics + self.topics["retries"], on_revoke=self._on_revoke)
        last_commit = last_due_check = 0.0
        try:
            while not self.stop:
                busy = len(self.tasks) >= self.max_pending
                msgs = [] if busy else self.consumer.consume(500, timeout=0)
                for msg in msgs:
                    if msg.error() is None:
                        self._handle(msg)
                if msgs:
                    self.records_metric.inc(len(msgs))
                self.lag.maybe_update()
                now = time.monotonic()
                if now - last_due_check > 0.2:
                    self._release_due()
                    last_due_check = now
                self.producer.poll(0)
                if now - last_commit > 0.5:
                    self._commit()
                    last_commit = now
                if self._delivery_error or self.tracker.error:
                    raise RuntimeError(self._delivery_error or self.tracker.error)
                await asyncio.sleep(0 if msgs else 0.005)
            await self._drain()
        finally:
            self.consumer.close()
            await self.gateway.close()
        return self.completed

    async def _drain(self) -> None:
        """SIGTERM: no new work; charges already sent finish and their results are
        published, so no payment is left half-done; charges not sent yet are handed back
        uncommitted; then the final commit."""
        self.stopping = True
        if self.tasks:
            log.info("stopping: finishing in-flight payments", in_flight=len(self.tasks))
            await asyncio.wait(self.tasks, timeout=30)
        self.producer.flush(30)
        self._commit()

    def _commit(self) -> None:
        self.tracker.commit(self.consumer, "payments")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # A retry partition paused for its held attempts stays paused through revocation
        # and reassignment, while the attempts are forgotten below (the group's lost
        # session after a broker loss does both): resumed now, or it is never fetched again.
        consumer.resume(partitions)
        self._commit()
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.tracker.forget(key)
            self.held.pop(key, None)

    # --- records --------------------------------------------------------------------

    def _handle(self, msg: Any) -> None:
        tp, offset = (msg.topic(), msg.partition()), msg.offset()
        self.tracker.start(tp, offset)
        topic = tp[0]
        try:
            if topic == self.topics["invoices"]:
                self._invoice(msg, tp, offset)
            elif topic == self.topics["control"]:
                run = codec(PAYMENT_CONTROL.schema).decode(msg.value())
                self.horizon = max(self.horizon, run["until"])
                log.info("payment run", run_id=run["run_id"], until=run["until"].isoformat())
                self.tracker.finish(tp, offset)
            else:
                latest_due = datetime.now(UTC) + self.longest_wait
                self._schedule(Attempt(decode_request(msg.value(), latest_due), tp, offset))
        except DecodeError as exc:
            produce_dead_letter(self.producer, msg, exc.reason, exc.detail, NAME,
                                on_delivery=self.tracker.finisher(tp, offset, 1))  # fmt: skip

    def _invoice(self, msg: Any, tp: TP, offset: int) -> None:
        request = request_for_invoice(msg.value(), self.accounts, datetime.now(UTC))
        if request is None:
            self.tracker.finish(tp, offset)  # nothing to collect (credit, zero, no method)
            return
        self._spawn(Attempt(request, tp, offset))

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
        task = asyncio.get_running_loop().create_task(self._attempt(attempt))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._delivery_error = f"payment task failed: {task.exception()!r}"

    # --- one attempt ------------------------------------------------------------------

    async def _attempt(self, attempt: Attempt) -> None:
        req = attempt.request
        lane = self.lanes.get(req["gateway_account"])
        if lane is None:  # a request routed to an account this dispatcher does not know
            lane = self.lanes[route(req["account_id"], self.accounts)]
            req["gateway_account"] = lane.name
        charge = ChargeRequest(
            merchant_account=lane.name,
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
            ticket = await lane.acquire()
            if self.stopping and not attempt.sent:
                # stopping: work never sent is handed back (its offset stays uncommitted
                # and the next owner charges it, with the same idempotency key)
                lane.release("ok")
                return
            attempt.sent = True
            try:
                outcome = await self.gateway.charge(charge)
            except RateLimited as exc:
                lane.release("overload", ticket)
                await asyncio.sleep(exc.retry_after * self.rng.uniform(0.5, 1.5))
                continue
            except TransientError:
                lane.release("failure")
                transient += 1
                await asyncio.sleep(backoff(min(transient, 8), rng=self.rng))
                continue
            except ValueError as exc:  # the gateway refused the request itself
                lane.release("ok")
                outcome = ChargeOutcome("declined", None, f"invalid_request: {exc}"[:200])
                status = "failed"
                break
            lane.release("ok")
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
        done = self.tracker.finisher(attempt.source, attempt.offset, len(results) + bool(follow_up))
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


def make_gateway(settings: Settings) -> Gateway:
    if settings.gateway == "simulator":
        from streams.payments.http_gateway import SimulatorGateway

        return SimulatorGateway(settings.gateway_url, timeout_s=settings.gateway_timeout_s)
    if settings.gateway == "stripe":
        from streams.payments.stripe_gateway import stripe_gateway_from_env

        return stripe_gateway_from_env()
    raise ValueError(f"STREAMBILL_GATEWAY must be simulator or stripe, not {settings.gateway!r}")
