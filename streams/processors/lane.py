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
refund id) and, for cancellations, ``billing.subscriptions``; the rules are
``streams.domain.refunds`` and ``streams.domain.cancellations``. A second consumer reads
these from the beginning into memory when a partition is assigned, before its requests
are served, and then in bounded chunks between polls of the request consumer
(``streams.runtime.history``), so that bulk history never queues ahead of a request; a
request about an invoice or subscription not (yet) known waits for that state to catch
up before it is refused. (A RocksDB store with a changelog, as the rating processor has,
is the way to bound memory for very large histories.)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from confluent_kafka import Consumer, TopicPartition

from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.domain.cancellations import (
    SubscriptionBook,
    cancellation_problem,
    cancellation_refusal,
    deactivation,
)
from streams.domain.payments import backoff
from streams.domain.refunds import (
    Paid,
    RefundLedger,
    refund_idempotency_key,
    refund_refusal,
    refund_result,
)
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
)
from streams.payments.gateway import (
    Gateway,
    RateLimited,
    RefundRequest,
    TransientError,
    make_gateway,
)
from streams.payments.throttle import AccountThrottle
from streams.runtime.deadletter import produce_dead_letter
from streams.runtime.history import History
from streams.runtime.loop import StreamLoop, published_ms
from streams.runtime.process import StopFlag
from streams.runtime.tasks import TaskLoop

log = structlog.get_logger(__name__)
NAME = "lane"
INVOICE_IDS = codec(INVOICES.schema)  # invoice_id, account_id, subscription_id lead
CATCH_UP_WAIT = 30.0  # seconds an unknown invoice waits for the state to catch up
STAGES_HEADER = "streambill-stages-ms"  # a refund result's header: its stages' times


@dataclass
class PartitionState:
    """What a partition's history says, and the refunds it is deciding now."""

    refunds: RefundLedger = field(default_factory=RefundLedger)
    subscriptions: SubscriptionBook = field(default_factory=SubscriptionBook)
    in_flight: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    ready: bool = False  # state topics read up to their end at assignment


@dataclass
class Stages:
    """When one refund reached each stage (wall clock, s): for the stage histogram and a
    header on its result (STAGES_HEADER), so a slow one shows where its time went."""

    produced: float | None  # the request's Kafka timestamp
    consumed: float
    decided: float = 0.0  # its gateway call may start (state looked up)
    called: float = 0.0  # a reserved slot was taken: the (last) call starts
    answered: float = 0.0

    def observe(self, lane: str) -> list[tuple[str, bytes]]:
        """The stages into the histogram; returns them (ms) as the result's header."""
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
        ms = {k: round(v * 1000, 1) for k, v in spans.items() if v is not None}
        return [(STAGES_HEADER, orjson.dumps(ms))]


def lane_group(lane: str) -> str:
    return f"streambill-{lane}-lane"


class LaneProcessor:
    def __init__(
        self,
        settings: Settings,
        stream: StreamLoop,
        state_consumer: Consumer,
        gateway: Gateway,
        lane: str = "priority",
    ) -> None:
        """stream: the request consumer (in the lane's group) and the producer;
        state_consumer: reads the state topics, assigned by hand (``make_lane`` builds
        them)."""
        self.gateway = gateway
        self.lane = lane
        self.workflows = workflows_of(lane, parse_urgent(settings.urgent_workflows))
        # the priority lane has the reserved slots; the standard lane competes with bulk
        # payments for the rest, and its AIMD limit backs off on their 429s
        cap = (settings.priority_reserve if lane == "priority"
               else settings.gateway_max_concurrency - settings.priority_reserve)  # fmt: skip
        self.name = stream.name
        self.throttles = {
            a: AccountThrottle(a, max(1, cap), self.name) for a in settings.merchant_accounts
        }
        self.loop = TaskLoop(stream, batch=200, commit_every_s=0.2, idle_s=0.001,
                             task_kind="refund")  # fmt: skip
        self.offsets = self.loop.offsets
        self.producer = stream.producer
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
        self.history = History(state_consumer, [self.names[k] for k in state_keys],
                               self._apply_state, self._ready)  # fmt: skip
        self.state: dict[int, PartitionState] = {}
        self.waiting: dict[int, list[Any]] = defaultdict(list)  # requests before `ready`
        self.rng = random.Random()

    @property
    def stop(self) -> StopFlag:
        return self.loop.stream.stop

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
        self.loop.subscribe(self.request_topics, on_assign=self._on_assign,
                            on_revoke=self._on_revoke)  # fmt: skip
        await self.loop.run(self._on_requests, self.history.apply_some, close=self._close)

    def _on_requests(self, msgs: list[Any]) -> None:
        for msg in msgs:
            self._handle_request(msg)
            RECORDS.labels(self.name, msg.topic()).inc()

    async def _close(self) -> None:
        self.history.close()
        await self.gateway.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Requests resume where committed; the same partitions of the state topics are
        read from their beginning, and a partition serves requests once each of them
        reported its end."""
        owned = sorted({tp.partition for tp in partitions})
        self.state = {p: self.state.get(p) or PartitionState() for p in owned}
        self.history.assign(owned)
        for p, state in self.state.items():
            state.ready = False
            if not self.history.topics:
                self._ready(p)
        log.info("assigned", partitions=owned)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.state.pop(tp.partition, None)
            self.waiting.pop(tp.partition, None)
        self.history.revoke()

    def _ready(self, partition: int) -> None:
        state = self.state.get(partition)
        if state is None or state.ready:
            return
        state.ready = True
        for msg in self.waiting.pop(partition, []):
            self._request(msg)

    # --- records --------------------------------------------------------------------

    def _handle_request(self, msg: Any) -> None:
        p = msg.partition()
        self.offsets.start((msg.topic(), p), msg.offset())
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
                    state.refunds.record_paid(r["invoice_id"], Paid(
                        r["gateway_reference"], r["gateway_account"], r["amount"], r["currency"]
                    ))  # fmt: skip
            elif topic == self.names["invoices"]:
                # only two ids of a record with all its lines: read them, not the lines
                # (decoding whole invoices took most of the lane's CPU during a bill run)
                ids = INVOICE_IDS.leading_strings(msg.value(), 3)
                if ids is None:
                    inv = INVOICE_IDS.decode(msg.value())
                    ids = (inv["invoice_id"], inv["account_id"], inv["subscription_id"])
                state.refunds.subscription_of[ids[0]] = ids[2]
            elif topic == self.names["refund_results"]:
                state.refunds.record_result(codec(REFUND_RESULTS.schema).decode(msg.value()))
            else:
                state.subscriptions.apply(codec(SUBSCRIPTIONS.schema).decode(msg.value()))
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
        self.loop.spawn(work)

    # --- one refund -------------------------------------------------------------------

    async def _refund(
        self, req: dict[str, Any], tp: tuple[str, int], offset: int, stages: Stages
    ) -> None:
        state = self.state[tp[1]]
        refund_id = req["refund_id"]
        first = state.refunds.results.get(refund_id)
        if first is None and refund_id in state.in_flight:
            first = await asyncio.shield(state.in_flight[refund_id])
        if first is not None:  # a duplicate: the first result again, nothing refunded
            stages.decided = time.time()
            self._publish(first, None, tp, offset, stages)
            return
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        state.in_flight[refund_id] = done
        try:
            result, entitlement = await self._decide(state.refunds, req, tp[1], stages)
            state.refunds.record_result(result)
            done.set_result(result)
        finally:
            state.in_flight.pop(refund_id, None)
            if not done.done():
                done.cancel()
        self._publish(result, entitlement, tp, offset, stages)

    def _dead_letter(self, msg: Any, reason: str, detail: str) -> None:
        workflow = "refund" if msg.topic() == self.names["refunds"] else "cancellation"
        LANE_REQUESTS.labels(self.lane, workflow, reason).inc()
        done = self.offsets.finisher((msg.topic(), msg.partition()), msg.offset(), 1)
        produce_dead_letter(self.producer, msg, reason, detail, NAME, on_delivery=done)

    async def _decide(
        self, ledger: RefundLedger, req: dict[str, Any], partition: int, stages: Stages
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        invoice_id, amount = req["invoice_id"], req["amount"]

        def rejected(reason: str) -> tuple[dict[str, Any], None]:
            return refund_result(req, "rejected", reason, None, datetime.now(UTC)), None

        if invoice_id not in ledger.paid:
            await self.history.catch_up(partition, CATCH_UP_WAIT)
        refusal = refund_refusal(ledger, req)
        stages.decided = time.time()
        if refusal:
            return rejected(refusal)
        paid = ledger.paid_for(invoice_id)
        assert paid is not None  # refund_refusal refuses an invoice not paid
        # concurrent requests of the same invoice see this one's amount as taken already
        ledger.refunded[invoice_id] += amount
        try:
            outcome = await self._call(paid, req, stages)
        finally:
            ledger.refunded[invoice_id] -= amount
        if outcome.status != "refunded":
            return rejected(outcome.reason or "refused_by_gateway")
        result = refund_result(req, "refunded", None, outcome.reference, datetime.now(UTC))
        subscription = ledger.subscription_of.get(invoice_id)
        entitlement = None
        if req["deactivate"] and subscription:
            cause = f"refund:{req['refund_id']}"
            entitlement = deactivation(req["account_id"], subscription, cause, datetime.now(UTC))
        return result, entitlement

    # --- one cancellation -------------------------------------------------------------

    async def _cancel(self, event: dict[str, Any], msg: Any) -> None:
        state = self.state[msg.partition()]
        problem = cancellation_problem(event, published_ms(msg))
        if problem:
            return self._dead_letter(msg, *problem)
        sub_id = event["subscription_id"]
        if sub_id not in state.subscriptions.known:
            await self.history.catch_up(msg.partition(), CATCH_UP_WAIT)
        sub = state.subscriptions.get(sub_id)
        refusal = cancellation_refusal(event, sub)
        if refusal:
            return self._dead_letter(msg, *refusal)
        assert sub is not None  # an unknown subscription is refused
        forward = sub.cancelled_by is None  # a repeat is not forwarded twice
        LANE_REQUESTS.labels(self.lane, "cancellation", "accepted" if forward else "repeat").inc()
        state.subscriptions.apply(event)  # cancelled by this event from now on
        immediate = event["mode"] == "immediate"
        done = self.offsets.finisher((msg.topic(), msg.partition()), msg.offset(),
                                     immediate + forward)  # fmt: skip
        if immediate:
            cause = f"cancellation:{event['event_id']}"
            entitlement = deactivation(event["account_id"], sub_id, cause, datetime.now(UTC))
            self.producer.produce(ENTITLEMENTS.name, key=msg.key(), on_delivery=done,
                                  value=codec(ENTITLEMENTS.schema).encode(entitlement))  # fmt: skip
        if forward:
            self.producer.produce(SUBSCRIPTIONS.name, key=msg.key(), value=msg.value(),
                                  on_delivery=done)  # fmt: skip
        if not (immediate or forward):
            self.offsets.finish((msg.topic(), msg.partition()), msg.offset())
        self.producer.poll(0)

    async def _call(self, paid: Paid, req: dict[str, Any], stages: Stages) -> Any:
        throttle = self.throttles.get(paid.merchant_account)
        if throttle is None:  # an account not configured (any more): one call at a time
            throttle = AccountThrottle(paid.merchant_account, 1, self.name)
            self.throttles[paid.merchant_account] = throttle
        request = RefundRequest(
            merchant_account=paid.merchant_account,
            idempotency_key=refund_idempotency_key(req["refund_id"]),
            charge_reference=paid.charge_reference or "",
            invoice_id=req["invoice_id"],
            amount=req["amount"],
            currency=req["currency"],
        )
        retries = 0
        while True:
            ticket = await throttle.acquire()
            try:
                stages.called = time.time()
                outcome = await self.gateway.refund(request)
                stages.answered = time.time()
                GATEWAY_SECONDS.labels(self.name, "refund").observe(stages.answered - stages.called)
            except RateLimited as exc:
                throttle.release("overload", ticket)  # one decrease per round of 429s
                await asyncio.sleep(min(exc.retry_after, 0.05) * self.rng.uniform(0.5, 1.5))
                continue
            except TransientError:
                throttle.release("failure")
                retries += 1
                await asyncio.sleep(backoff(min(retries, 6), base=0.02, cap=2.0, rng=self.rng))
                continue
            throttle.release("ok")
            return outcome

    def _publish(
        self,
        result: dict[str, Any],
        entitlement: dict[str, Any] | None,
        tp: tuple[str, int],
        offset: int,
        stages: Stages,
    ) -> None:
        done = self.offsets.finisher(tp, offset, 1 + (entitlement is not None))
        key = result["account_id"].encode()
        outcome = result["status"] if result["reason"] is None else result["reason"]
        LANE_REQUESTS.labels(self.lane, "refund", outcome).inc()
        REFUND_SECONDS.observe((datetime.now(UTC) - result["requested_at"]).total_seconds())
        if entitlement is not None:
            value = codec(ENTITLEMENTS.schema).encode(entitlement)
            self.producer.produce(ENTITLEMENTS.name, key=key, value=value, on_delivery=done)
        value = codec(REFUND_RESULTS.schema).encode(result)
        headers = stages.observe(self.lane)
        self.producer.produce(REFUND_RESULTS.name, key=key, value=value, headers=headers,
                              on_delivery=done)  # fmt: skip
        self.producer.poll(0)


def make_lane(settings: Settings, bootstrap: str, lane: str) -> LaneProcessor:
    """The lane with its clients built from the settings (the CLI's)."""
    group = lane_group(lane)
    # requests have a consumer of their own, served first; the state topics are read by
    # a second one in bounded chunks, so bulk history never delays a request. Latency
    # first: no batching delay on the way out.
    stream = StreamLoop.from_settings(
        f"lane-{lane}", settings, bootstrap, group,
        consumer_config={**clients.NO_DELAY, "partition.assignment.strategy": "range",
                         "fetch.wait.max.ms": 5},
        producer_config={"linger.ms": 0, **clients.NO_DELAY},
    )  # fmt: skip
    state_consumer = clients.consumer(
        settings, bootstrap, group_id(f"{group}-state"),
        **{"enable.partition.eof": True, "fetch.wait.max.ms": 20},
    )  # fmt: skip
    return LaneProcessor(settings, stream, state_consumer, make_gateway(settings), lane)
