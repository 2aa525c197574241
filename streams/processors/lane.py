"""The lane processors: urgent workflows in well under a second, even during bulk runs.

``streambill run lane priority`` serves the workflows declared urgent
(``STREAMBILL_URGENT_WORKFLOWS``, see ``streams/lanes.py``) in its own consumer group and
process, with the slots of each merchant account that the payments processor never
takes (``STREAMBILL_PRIORITY_RESERVE``): bulk traffic cannot take the last slots of an
account. ``streambill run lane standard`` runs the same code for the other workflows,
with no reserved capacity. Two workflows:

- **refund** (``billing.refunds``): gateway refund -> entitlement deactivation on
  ``billing.entitlements`` -> ``billing.refund-results``. Outcomes: ``refunded``; or
  ``rejected`` with a reason: ``unknown_invoice``, ``invoice_not_paid``,
  ``currency_mismatch``, ``amount_not_positive``, ``amount_exceeds_paid`` (more than
  what was paid minus what was refunded already), or the gateway's own refusal. A
  request repeating a refund id gets the first result again, never a second refund.
  Gateway calls carry the key ``streambill-refund:<refund_id>``.
- **cancellation** (``billing.cancellations``, a ``subscription.cancelled`` event): an
  immediate cancellation deactivates the entitlement at once; then the event is
  forwarded, unchanged, to ``billing.subscriptions`` where the rating processor issues
  the proration credit in its own time. Refused to the dead letters: not a
  cancellation, an unknown mode, an unknown subscription, another account's
  subscription, a subscription cancelled already by another event. A repeated event
  deactivates again (same entitlement id) but is not forwarded twice.

What it must know to judge a request it learns from the topics that share its key
(account_id) and so its partition: ``billing.payment-results`` (which invoices were
paid, through which charge), ``billing.invoices`` (an invoice's subscription), its own
``billing.refund-results`` (what was refunded already; the first result of every
refund id) and, for cancellations, ``billing.subscriptions``. A second consumer reads
these from the beginning into memory when a partition is assigned, before its requests
are served, and then in chunks of ``STATE_CHUNK`` between polls of the request
consumer, so that bulk history never queues ahead of a request; a request about an
invoice or subscription not (yet) known waits for that state to catch up before it is
refused. (A RocksDB store with a changelog, as the rating processor has, is the way to
bound memory for very large histories.)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.domain.events import InvalidEvent, parse_event
from streams.domain.payments import backoff
from streams.kafka import clients
from streams.kafka.topics import (
    CANCELLATIONS,
    ENTITLEMENTS,
    INVOICES,
    PAYMENT_RESULTS,
    REFUND_RESULTS,
    REFUNDS,
    SUBSCRIPTIONS,
    group_id,
)
from streams.lanes import WORKFLOWS, parse_urgent, workflows_of
from streams.metrics import (
    GATEWAY_SECONDS,
    LANE_REQUESTS,
    LANE_STAGE_SECONDS,
    RECORDS,
    REFUND_SECONDS,
    LagTracker,
)
from streams.payments.gateway import Gateway, RateLimited, RefundRequest, TransientError
from streams.processors.payments import Lane, OffsetTracker, make_gateway
from streams.processors.rating import published_ms, timestamp_problem
from streams.runtime.deadletter import produce_dead_letter
from streams.runtime.process import StopFlag

log = structlog.get_logger(__name__)
NAME = "lane"
ZERO = Decimal(0)
INVOICE_IDS = codec(INVOICES.schema)  # invoice_id, account_id, subscription_id lead
STATE_CHUNK = 500  # state records fetched at a time
# history applied per loop turn at most: between two turns requests and gateway answers
# wait, and a request takes several turns (consume, call, answer, publish)
STATE_BUDGET_S = 0.005
CATCH_UP_WAIT = 30.0  # seconds an unknown invoice waits for the state to catch up


class Paid(NamedTuple):
    charge_reference: str | None
    merchant_account: str
    amount: Decimal
    currency: str


class Subscription(NamedTuple):
    account_id: str
    cancelled_by: str | None = None  # event_id of its cancellation


@dataclass
class PartitionState:
    """What a partition's history says. It holds millions of paid invoices and
    subscriptions, kept as plain tuples: the cyclic garbage collector stops tracking a
    plain tuple of strings and decimals once it has seen it (not a NamedTuple or a
    dataclass), so the full collections that the state's growth triggers do not walk
    them; each such walk pauses the process, urgent requests included."""

    paid: dict[str, tuple] = field(default_factory=dict)  # invoice -> Paid's fields
    subscription_of: dict[str, str] = field(default_factory=dict)
    refunded: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # refund_id -> first
    in_flight: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    subscriptions: dict[str, tuple] = field(default_factory=dict)  # -> Subscription's
    ready: bool = False  # state topics read up to their end at assignment

    def paid_for(self, invoice_id: str) -> Paid | None:
        fields = self.paid.get(invoice_id)
        return None if fields is None else Paid._make(fields)

    def record_paid(self, invoice_id: str, paid: Paid) -> None:
        self.paid[invoice_id] = tuple(paid)

    def subscription(self, subscription_id: str) -> Subscription | None:
        fields = self.subscriptions.get(subscription_id)
        return None if fields is None else Subscription._make(fields)

    def record_subscription(self, subscription_id: str, sub: Subscription) -> None:
        self.subscriptions[subscription_id] = tuple(sub)


@dataclass
class Stages:
    """When one refund reached each stage (wall clock, s): for the stage histogram and a
    debug line per refund, so a slow one shows where its time went."""

    produced: float | None  # the request's Kafka timestamp
    consumed: float
    decided: float = 0.0  # its gateway call may start (state looked up)
    called: float = 0.0  # a reserved slot was taken: the (last) call starts
    answered: float = 0.0

    def observe(self, lane: str, refund_id: str) -> None:
        published = time.time()
        spans = {
            "queued": self.consumed - self.produced if self.produced else None,
            "decide": self.decided - self.consumed,
            "slot": self.called - self.decided if self.called else None,
            "gateway": self.answered - self.called if self.called else None,
            "publish": published - (self.answered or self.decided),
        }
        for stage, seconds in spans.items():
            if seconds is not None:
                LANE_STAGE_SECONDS.labels(lane, stage).observe(max(seconds, 0.0))
        ms = {f"{k}_ms": round(v * 1000, 1) for k, v in spans.items() if v is not None}
        log.debug("refund stages", refund_id=refund_id, **ms)


def refund_refusal(state: PartitionState, req: dict[str, Any]) -> str | None:
    """Why a refund request is rejected, from what the partition knows (None: it may go to
    the gateway). Pure."""
    invoice_id, amount = req["invoice_id"], req["amount"]
    paid = state.paid_for(invoice_id)
    if paid is None:
        return "invoice_not_paid" if invoice_id in state.subscription_of else "unknown_invoice"
    if req["currency"] != paid.currency:
        return "currency_mismatch"
    if amount <= ZERO:
        return "amount_not_positive"
    if amount > paid.amount - state.refunded[invoice_id]:
        return "amount_exceeds_paid"
    return None


def cancellation_problem(event: dict[str, Any], published: int | None) -> tuple[str, str] | None:
    """Why a decoded record of billing.cancellations is dead-lettered whatever the state
    knows: (reason, detail), or None. What is forwarded must be an event the rating
    processor accepts (the same validation), or the entitlement would be deactivated for a
    cancellation that is never billed. `published`: the record's Kafka timestamp (ms)."""
    if event["type"] != "subscription.cancelled":
        return "not_a_cancellation", f"type {event['type']!r}"
    if event["mode"] not in ("immediate", "end_of_period"):
        return "invalid_mode", f"mode {event['mode']!r}"
    try:
        parsed = parse_event(event)
    except InvalidEvent as exc:
        return "invalid_event", exc.reason
    problem = timestamp_problem(parsed.timestamp, published)
    if problem:
        return "invalid_event", f"{problem}: {parsed.timestamp.isoformat()}"
    return None


def cancellation_refusal(event: dict[str, Any], sub: Subscription | None) -> tuple[str, str] | None:
    """Why a valid cancellation is dead-lettered given its subscription as the partition
    knows it (None: unknown), or None. Pure."""
    if sub is None:
        return "unknown_subscription", event["subscription_id"]
    if sub.account_id != event["account_id"]:
        return "account_mismatch", f"{event['subscription_id']} belongs to another account"
    if sub.cancelled_by not in (None, event["event_id"]):
        return "already_cancelled", f"by {sub.cancelled_by}"
    return None


def entitlement_id(cause: str) -> str:
    """cause: ``refund:<refund_id>`` or ``cancellation:<event_id>``."""
    return f"{cause}:deactivate"


def lane_group(lane: str) -> str:
    return f"streambill-{lane}-lane"


class LaneProcessor:
    def __init__(
        self, settings: Settings, bootstrap: str, gateway: Gateway, lane: str = "priority"
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.gateway = gateway
        self.lane = lane
        self.workflows = workflows_of(lane, parse_urgent(settings.urgent_workflows))
        # the priority lane has the reserved slots; the standard lane competes with bulk
        # payments for the rest, and its AIMD limit backs off on their 429s
        cap = (settings.priority_reserve if lane == "priority"
               else settings.gateway_max_concurrency - settings.priority_reserve)  # fmt: skip
        self.name = f"lane-{lane}"
        self.lanes = {a: Lane(a, max(1, cap), self.name) for a in settings.merchant_accounts}
        group = lane_group(lane)
        # requests have a consumer of their own, served first; the state topics are read
        # by a second one in bounded chunks, so bulk history never delays a request
        self.consumer: Consumer = clients.consumer(
            settings, bootstrap, group_id(group), **clients.NO_DELAY,
            **{"partition.assignment.strategy": "range", "fetch.wait.max.ms": 5},
        )  # fmt: skip
        self.lag = LagTracker(self.consumer, self.name)
        self.state_consumer: Consumer = clients.consumer(
            settings, bootstrap, group_id(f"{group}-state"),
            **{"enable.partition.eof": True, "fetch.wait.max.ms": 20},
        )  # fmt: skip
        # latency first: no batching delay on the way out
        self.producer = clients.producer(
            settings, bootstrap, **{"linger.ms": 0, **clients.NO_DELAY}
        )
        self.names = {
            "refunds": REFUNDS.name,
            "cancellations": CANCELLATIONS.name,
            "results": PAYMENT_RESULTS.name,
            "invoices": INVOICES.name,
            "refund_results": REFUND_RESULTS.name,
            "subscriptions": SUBSCRIPTIONS.name,
        }
        self.request_topics = [WORKFLOWS[w].name for w in self.workflows]
        state_keys = ["results", "invoices", "refund_results"] if "refund" in self.workflows \
            else []  # fmt: skip
        if "cancellation" in self.workflows:
            state_keys.append("subscriptions")
        self.state_topics = [self.names[k] for k in state_keys]
        self.state: dict[int, PartitionState] = {}
        self.waiting: dict[int, list[Any]] = defaultdict(list)  # requests before `ready`
        self.pending_ends: set[tuple[str, int]] = set()
        self.tracker = OffsetTracker()
        self.history: deque[Any] = deque()  # state records fetched, not applied yet
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop = StopFlag()
        self.rng = random.Random()
        self._error: str | None = None

    # --- the loop -------------------------------------------------------------------

    def run(self) -> None:
        import uvloop

        uvloop.run(self.run_async())

    async def run_async(self) -> None:
        log.info("lane started", lane=self.lane, workflows=list(self.workflows))
        if not self.request_topics:  # every workflow is in the other lane: stand by
            while not self.stop:
                await asyncio.sleep(0.2)
            return
        self.consumer.subscribe(self.request_topics, on_assign=self._on_assign,
                                on_revoke=self._on_revoke)  # fmt: skip
        last_commit = 0.0
        try:
            while not self.stop:
                requests = self.consumer.consume(200, timeout=0)
                for msg in requests:
                    if msg.error() is None:
                        self._handle_request(msg)
                        RECORDS.labels(self.name, msg.topic()).inc()
                self.lag.maybe_update()
                history = self._apply_some_history()
                self.producer.poll(0)
                now = time.monotonic()
                if now - last_commit > 0.2:
                    self._commit()
                    last_commit = now
                if self._error or self.tracker.error:
                    raise RuntimeError(self._error or self.tracker.error)
                await asyncio.sleep(0 if requests or history else 0.001)
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=30)
            self.producer.flush(30)
            self._commit()
        finally:
            self.consumer.close()
            self.state_consumer.close()
            await self.gateway.close()

    def _apply_some_history(self) -> int:
        """Apply state records for at most STATE_BUDGET_S; returns how many."""
        if not self.history:
            self.history.extend(self.state_consumer.consume(STATE_CHUNK, timeout=0))
        deadline = time.perf_counter() + STATE_BUDGET_S
        applied = 0
        while self.history and time.perf_counter() < deadline:
            msg = self.history.popleft()
            applied += 1
            if msg.error() is None:
                self._apply_state(msg)
            elif msg.error().code() == KafkaError._PARTITION_EOF:
                self._at_end(msg.topic(), msg.partition())
        return applied

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Requests resume where committed; the same partitions of the state topics are
        read from their beginning, and a partition serves requests once each of them
        reported its end."""
        owned = sorted({tp.partition for tp in partitions})
        self.history.clear()  # read again from the beginning below
        self.state = {p: self.state.get(p) or PartitionState() for p in owned}
        self.pending_ends = {(t, p) for t in self.state_topics for p in owned}
        self.state_consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in self.state_topics for p in owned]
        )
        for p, state in self.state.items():
            state.ready = not self.state_topics
            if state.ready:
                for msg in self.waiting.pop(p, []):
                    self._request(msg)
        log.info("assigned", partitions=owned)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit()
        for tp in partitions:
            self.tracker.forget((tp.topic, tp.partition))
            self.state.pop(tp.partition, None)
            self.waiting.pop(tp.partition, None)
        self.state_consumer.assign([])
        self.history.clear()

    def _at_end(self, topic: str, partition: int) -> None:
        state = self.state.get(partition)
        if state is None:
            return
        self.pending_ends.discard((topic, partition))
        if not state.ready and not any(p == partition for _, p in self.pending_ends):
            state.ready = True
            for msg in self.waiting.pop(partition, []):
                self._request(msg)

    def _commit(self) -> None:
        self.tracker.commit(self.consumer, self.name)

    # --- records --------------------------------------------------------------------

    def _handle_request(self, msg: Any) -> None:
        p = msg.partition()
        self.tracker.start((msg.topic(), p), msg.offset())
        state = self.state.get(p)
        if state is not None and state.ready:
            self._request(msg)
        else:
            self.waiting[p].append(msg)

    def _apply_state(self, msg: Any) -> None:
        topic, p = msg.topic(), msg.partition()
        state = self.state.get(p)
        if state is None:
            return
        try:
            if topic == self.names["results"]:
                r = codec(PAYMENT_RESULTS.schema).decode(msg.value())
                if r["status"] == "succeeded":
                    state.record_paid(r["invoice_id"], Paid(
                        r["gateway_reference"], r["gateway_account"], r["amount"], r["currency"]
                    ))  # fmt: skip
            elif topic == self.names["invoices"]:
                # only two ids of a record with all its lines: read them, not the lines
                # (decoding whole invoices took most of the lane's CPU during a bill run)
                ids = INVOICE_IDS.leading_strings(msg.value(), 3)
                if ids is None:
                    inv = INVOICE_IDS.decode(msg.value())
                    ids = (inv["invoice_id"], inv["account_id"], inv["subscription_id"])
                state.subscription_of[ids[0]] = ids[2]
            elif topic == self.names["refund_results"]:
                r = codec(REFUND_RESULTS.schema).decode(msg.value())
                if r["refund_id"] not in state.results:
                    state.results[r["refund_id"]] = r
                    if r["status"] == "refunded":
                        state.refunded[r["invoice_id"]] += r["amount"]
            else:
                e = codec(SUBSCRIPTIONS.schema).decode(msg.value())
                sub_id = e["subscription_id"]
                sub = state.subscription(sub_id)
                if e["type"] == "subscription.created" and sub is None:
                    state.record_subscription(sub_id, Subscription(e["account_id"]))
                elif e["type"] == "subscription.cancelled" and sub and not sub.cancelled_by:
                    state.record_subscription(sub_id, sub._replace(cancelled_by=e["event_id"]))
        except DecodeError:
            pass  # not ours to dead-letter: the topic's own consumers do

    def _request(self, msg: Any) -> None:
        tp = (msg.topic(), msg.partition())
        refund = msg.topic() == self.names["refunds"]
        try:
            req = codec((REFUNDS if refund else CANCELLATIONS).schema).decode(msg.value())
        except DecodeError as exc:
            self._dead_letter(msg, exc.reason, exc.detail)
            return
        if refund:
            published = published_ms(msg)
            stages = Stages(published / 1000 if published else None, time.time())
            work = self._refund(req, tp, msg.offset(), stages)
        else:
            work = self._cancel(req, msg)
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._error = f"refund task failed: {task.exception()!r}"

    # --- one refund -------------------------------------------------------------------

    async def _refund(
        self, req: dict[str, Any], tp: tuple[str, int], offset: int, stages: Stages
    ) -> None:
        state = self.state[tp[1]]
        refund_id = req["refund_id"]
        first = state.results.get(refund_id)
        if first is None and refund_id in state.in_flight:
            first = await asyncio.shield(state.in_flight[refund_id])
        if first is not None:  # a duplicate: the first result again, nothing refunded
            self._publish(first, None, tp, offset)
            stages.decided = time.time()
            stages.observe(self.lane, refund_id)
            return
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        state.in_flight[refund_id] = done
        try:
            result, entitlement = await self._decide(state, req, tp[1], stages)
            state.results[refund_id] = result
            if result["status"] == "refunded":
                state.refunded[req["invoice_id"]] += result["amount"]
            done.set_result(result)
        finally:
            state.in_flight.pop(refund_id, None)
            if not done.done():
                done.cancel()
        self._publish(result, entitlement, tp, offset)
        stages.observe(self.lane, refund_id)

    def _dead_letter(self, msg: Any, reason: str, detail: str) -> None:
        workflow = "refund" if msg.topic() == self.names["refunds"] else "cancellation"
        LANE_REQUESTS.labels(self.lane, workflow, reason).inc()
        done = self.tracker.finisher((msg.topic(), msg.partition()), msg.offset(), 1)
        produce_dead_letter(self.producer, msg, reason, detail, NAME, on_delivery=done)

    def _caught_up(self, partition: int) -> bool:
        """Has the state consumer read partition p of every state topic up to the end it
        last heard of, and applied it? (Local figures, no broker round trip.)"""
        if any(msg.partition() == partition for msg in self.history):
            return False  # fetched, not applied yet
        for topic in self.state_topics:
            tp = TopicPartition(topic, partition)
            position = self.state_consumer.position([tp])[0].offset
            high = self.state_consumer.get_watermark_offsets(tp, cached=True)[1]
            if high > 0 and position < high:  # (an unknown position is negative)
                return False
        return True

    async def _decide(
        self, state: PartitionState, req: dict[str, Any], partition: int, stages: Stages
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        invoice_id, amount = req["invoice_id"], req["amount"]

        def rejected(reason: str) -> tuple[dict[str, Any], None]:
            return self._result(req, "rejected", reason, None), None

        if invoice_id not in state.paid:
            await self._wait_for_state(partition)
        refusal = refund_refusal(state, req)
        stages.decided = time.time()
        if refusal:
            return rejected(refusal)
        paid = state.paid_for(invoice_id)
        assert paid is not None  # refund_refusal refuses an invoice not paid
        # concurrent requests of the same invoice see this one's amount as taken already
        state.refunded[invoice_id] += amount
        try:
            outcome = await self._call(paid, req, stages)
        finally:
            state.refunded[invoice_id] -= amount
        if outcome.status != "refunded":
            return rejected(outcome.reason or "refused_by_gateway")
        result = self._result(req, "refunded", None, outcome.reference)
        subscription = state.subscription_of.get(invoice_id)
        entitlement = None
        if req["deactivate"] and subscription:
            entitlement = deactivation(
                req["account_id"], subscription, f"refund:{req['refund_id']}"
            )
        return result, entitlement

    async def _wait_for_state(self, partition: int) -> None:
        """Let the state catch up with what was published before a request (it may be
        queued behind bulk history) before refusing what it does not know."""
        deadline = time.monotonic() + CATCH_UP_WAIT
        while time.monotonic() < deadline and not self._caught_up(partition):
            await asyncio.sleep(0.01)

    # --- one cancellation -------------------------------------------------------------

    async def _cancel(self, event: dict[str, Any], msg: Any) -> None:
        state = self.state[msg.partition()]
        problem = cancellation_problem(event, published_ms(msg))
        if problem:
            return self._dead_letter(msg, *problem)
        sub_id = event["subscription_id"]
        if sub_id not in state.subscriptions:
            await self._wait_for_state(msg.partition())
        sub = state.subscription(sub_id)
        refusal = cancellation_refusal(event, sub)
        if refusal:
            return self._dead_letter(msg, *refusal)
        assert sub is not None  # an unknown subscription is refused
        forward = sub.cancelled_by is None  # a repeat is not forwarded twice
        LANE_REQUESTS.labels(self.lane, "cancellation", "accepted" if forward else "repeat").inc()
        state.record_subscription(sub_id, sub._replace(cancelled_by=event["event_id"]))
        immediate = event["mode"] == "immediate"
        done = self.tracker.finisher((msg.topic(), msg.partition()), msg.offset(),
                                     immediate + forward)  # fmt: skip
        if immediate:
            entitlement = deactivation(event["account_id"], sub_id,
                                       f"cancellation:{event['event_id']}")  # fmt: skip
            self.producer.produce(ENTITLEMENTS.name, key=msg.key(), on_delivery=done,
                                  value=codec(ENTITLEMENTS.schema).encode(entitlement))  # fmt: skip
        if forward:
            self.producer.produce(SUBSCRIPTIONS.name, key=msg.key(), value=msg.value(),
                                  on_delivery=done)  # fmt: skip
        if not (immediate or forward):
            self.tracker.finish((msg.topic(), msg.partition()), msg.offset())
        self.producer.poll(0)

    async def _call(self, paid: Paid, req: dict[str, Any], stages: Stages) -> Any:
        lane = self.lanes.get(paid.merchant_account) or Lane(paid.merchant_account, 1, self.name)
        self.lanes[paid.merchant_account] = lane
        request = RefundRequest(
            merchant_account=paid.merchant_account,
            idempotency_key=f"streambill-refund:{req['refund_id']}",
            charge_reference=paid.charge_reference or "",
            invoice_id=req["invoice_id"],
            amount=req["amount"],
            currency=req["currency"],
        )
        retries = 0
        while True:
            ticket = await lane.acquire()
            try:
                stages.called = time.time()
                outcome = await self.gateway.refund(request)
                stages.answered = time.time()
                GATEWAY_SECONDS.labels(self.name, "refund").observe(stages.answered - stages.called)
            except RateLimited as exc:
                lane.release("overload", ticket)  # one decrease per round of 429s
                await asyncio.sleep(min(exc.retry_after, 0.05) * self.rng.uniform(0.5, 1.5))
                continue
            except TransientError:
                lane.release("failure")
                retries += 1
                await asyncio.sleep(backoff(min(retries, 6), base=0.02, cap=2.0, rng=self.rng))
                continue
            lane.release("ok")
            return outcome

    @staticmethod
    def _result(
        req: dict[str, Any], status: str, reason: str | None, reference: str | None
    ) -> dict[str, Any]:
        return {
            "refund_id": req["refund_id"],
            "invoice_id": req["invoice_id"],
            "account_id": req["account_id"],
            "status": status,
            "amount": req["amount"],
            "currency": req["currency"],
            "reason": reason,
            "gateway_reference": reference,
            "refund_reason": req["reason"],
            "requested_at": req["requested_at"],
            "completed_at": datetime.now(UTC),
        }

    def _publish(
        self,
        result: dict[str, Any],
        entitlement: dict[str, Any] | None,
        tp: tuple[str, int],
        offset: int,
    ) -> None:
        done = self.tracker.finisher(tp, offset, 1 + (entitlement is not None))
        key = result["account_id"].encode()
        outcome = result["status"] if result["reason"] is None else result["reason"]
        LANE_REQUESTS.labels(self.lane, "refund", outcome).inc()
        REFUND_SECONDS.observe((datetime.now(UTC) - result["requested_at"]).total_seconds())
        if entitlement is not None:
            value = codec(ENTITLEMENTS.schema).encode(entitlement)
            self.producer.produce(ENTITLEMENTS.name, key=key, value=value, on_delivery=done)
        value = codec(REFUND_RESULTS.schema).encode(result)
        self.producer.produce(REFUND_RESULTS.name, key=key, value=value, on_delivery=done)
        self.producer.poll(0)


def deactivation(account_id: str, subscription_id: str, cause: str) -> dict[str, Any]:
    return {
        "entitlement_id": entitlement_id(cause),
        "account_id": account_id,
        "subscription_id": subscription_id,
        "action": "deactivate",
        "cause": cause,
        "timestamp": datetime.now(UTC),
    }


def run_lane(settings: Settings, bootstrap: str, lane: str) -> None:
    LaneProcessor(settings, bootstrap, make_gateway(settings), lane).run()
