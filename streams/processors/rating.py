"""The rating processor: subscription and usage events in, invoices out, exactly once.

A thin adapter around ``streams.domain.rating``, on the stream runtime: each loop turn is
one Kafka transaction (``streams.runtime.transaction``) holding the invoices, dead
letters and state changelog records it produced plus the input offsets it consumed, so
a crash or a rebalance never loses or repeats an invoice (downstream reads with
isolation.level=read_committed).

Inputs are co-partitioned by account (``range`` assignment gives one worker the same
partition number of every input topic), and the state of partition p lives in
``<home>/state/rating/p<p>`` (RocksDB) backed by partition p of the changelog topic
(``streams.runtime.state``). Subscription and usage records are applied in event-time
order across the two topics, subscription events first on ties
(``streams.runtime.alignment``): without it, usage read ahead of its subscription.created
would be rejected, and usage after a plan change could be rated under the old plan.

Periods close
- on an event of the subscription at or after the period end (event time);
- on a bill run (``billing.control``): "close every period ending <= until", executed
  once the worker has consumed its inputs up to the run's barrier offsets, in chunks of
  one transaction each, idempotently (a closed period is no longer due);
- with ``clock="wall"``, continuously: every period whose end has passed in real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import Consumer, TopicPartition

from streams.codec import DecodeError
from streams.config import Settings
from streams.domain.catalog import Catalog, CatalogError
from streams.domain.events import (
    UsageRecord,
)
from streams.domain.invoice import Invoice
from streams.domain.rating import (
    STATUS_ENDED,
    SubscriptionState,
    UsageTally,
    apply_input,
    close_periods,
    next_period_end,
    plan_missing,
)
from streams.domain.timestamps import to_micros
from streams.fast_codec import usage_event
from streams.kafka import clients
from streams.kafka.topics import CONTROL, INVOICES, RATING_CHANGELOG, SUBSCRIPTIONS, USAGE, group_id
from streams.metrics import INVOICES_EMITTED
from streams.rating_records import decode_bill_run, decode_input, invoice_writer, usage_reader
from streams.runtime.alignment import Alignment
from streams.runtime.deadletter import produce_dead_letter
from streams.runtime.jobs import Job, Jobs
from streams.runtime.loop import StreamLoop, published_ms
from streams.runtime.process import limit_malloc_arenas, transactional_id, tune_gc
from streams.runtime.state import PartitionStates, StateChanges
from streams.runtime.transaction import Offsets, Transactions

log = structlog.get_logger(__name__)
GROUP = "streambill-rating"
NAME = "rating"
# Small fetches (librdkafka's default is 1 MiB a partition; clients.consumer raises it to
# 10 MiB): what librdkafka's threads allocate for fetched batches lands in one malloc
# arena they share, which large buffers fragmented. A 1M-subscription bench billrun peaked
# at 1,752 MB per worker with 10 MiB fetches, 1,074 MB with these, as fast.
FETCH_SIZES = {"max.partition.fetch.bytes": 262_144, "fetch.max.bytes": 1_310_720}


def period_end_us(state: SubscriptionState) -> int | None:
    """When the state's open period ends (µs): its key in the due index."""
    end = next_period_end(state)
    return to_micros(end) if end else None


@dataclass(slots=True)
class Pending:
    """A decoded input record waiting for its turn in event-time order."""

    timestamp: float  # -inf for undecodable records: dead-lettered at once
    msg: Any
    event: Any = None
    error: tuple[str, str] | None = None
    account_id: str | None = None  # the record's
    # a usage record the fast reader took; its event is made only if the general path
    # needs it (_apply_ready)
    record: UsageRecord | None = None


@dataclass
class Batch(StateChanges):
    """What one transaction changed and produced. Subscriptions changed by UsageTally only
    are ``due_unchanged``: usage added up leaves the period, and so the due key, as it was."""

    invoices: int = 0
    dead_letters: int = 0


class RatingProcessor:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        stream: StreamLoop,
        admin: Any,
        restorer: Callable[[], Consumer],
        clock: str = "event",
        batch_size: int | None = None,  # default: settings.rating_transaction_records
        close_chunk: int = 2000,
        max_idle: float = 0.5,
        state_cache_entries: int | None = None,  # default: settings.rating_state_cache
        usage_tally: type[UsageTally] | None = UsageTally,
    ) -> None:
        """stream: a consumer in the rating group (``range`` assignment) and a
        transactional producer; admin: for end offsets; restorer: a new consumer to
        restore state from the changelog with (``make_rating`` builds them all).
        usage_tally: how plain usage is added up (None: every record through
        apply_input, the general path the fast one is held against)."""
        if not catalog.uses_only_v1():
            # trials, percentage, latest, unique_count and tax are rated offline only (yet):
            # refused here rather than rated as something else
            raise CatalogError(
                "the streaming rater takes a version-1 catalog only (no trial_days, "
                "percentage, latest, unique_count or tax_rates) until it rates contract v2"
            )
        self.catalog = catalog
        self.usage_tally = usage_tally
        self.clock = clock
        # records consumed per transaction at most: one poll (librdkafka hands over what it
        # has fetched ahead, waiting at most 0.1 s for more). A subscription touched several
        # times in a transaction gets one state record in the changelog, and the commit's
        # fixed cost is shared by more records; under load a transaction takes under a second.
        self.batch_size = batch_size or settings.rating_transaction_records
        self.usage_batch_size = max(self.batch_size, settings.rating_usage_transaction_records)
        if self.batch_size < 1:
            raise ValueError("the rating transaction size must be at least 1")
        self.close_chunk = close_chunk
        # the namespace is fixed for a worker's life: resolve topic names once (hot path)
        self.subscriptions_topic, self.usage_topic = SUBSCRIPTIONS.name, USAGE.name
        self.control_topic, self.invoices_topic = CONTROL.name, INVOICES.name
        self.usage_reader, self.invoice_writer = usage_reader(), invoice_writer()
        self.stream = stream
        self.consumer, self.producer, self.stop = stream.consumer, stream.producer, stream.stop
        self.transactions = Transactions(self.producer, self.consumer)
        self.alignment = Alignment(
            self.consumer, admin, self.subscriptions_topic, self.usage_topic, max_idle
        )
        # committed states, decoded, about 3 KB each with a busy period's event ids
        self.states = PartitionStates(
            settings.state_dir / "rating", RATING_CHANGELOG.name,
            state_cache_entries or settings.rating_state_cache, restorer,
            SubscriptionState.from_bytes, period_end_us,
        )  # fmt: skip
        self.jobs = Jobs(self.consumer, self.control_topic, self.alignment)  # bill runs
        self.invoices_emitted = 0
        self.blocked: set[str] = set()  # subscriptions whose plan the catalog lacks (logged)

    # --- partition lifecycle ---------------------------------------------------------

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.states.assign(sorted({tp.partition for tp in partitions}))
        log.info("assigned", partitions=sorted(self.states.stores))

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # (the stream has resumed them: a bill run's paused control partition, backpressure)
        revoked = sorted({tp.partition for tp in partitions})
        self.states.revoke(revoked)
        for p in revoked:
            self.jobs.drop(p)
            self.alignment.revoke(p)
        log.info("revoked", partitions=revoked)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        # tens of thousands of records per transaction (two or three tracked objects each)
        # and many decoded states: at the default thresholds a transaction ran hundreds of
        # young collections, and full ones walked the cached states
        tune_gc(50_000, 20)
        self.subscribe()
        try:
            while not self.stop:
                self.turn()
        finally:
            self.close()
        return self.invoices_emitted

    def subscribe(self) -> None:
        self.stream.subscribe(
            [self.subscriptions_topic, self.usage_topic, self.control_topic],
            on_assign=self.on_assign,
            on_revoke=self.on_revoke,
        )

    def turn(self) -> None:
        """One turn of the loop: a poll and, if there is work, one transaction."""
        # a bill run closing periods has work without input: no waiting for records
        timeout = 0.0 if self.jobs.busy() else 0.1
        msgs = self.stream.poll(self.batch_size, timeout)
        # records held back for event-time order are looked at again without new input:
        # it may have ended, and what they wait for is then the other topic found caught
        # up, or max_idle passed while the broker cannot say
        if msgs or self.jobs.running or self.clock == "wall" or self.alignment.waiting:
            started = time.perf_counter()
            msgs = self.transaction(msgs)
            if msgs:
                self.stream.processed(msgs, started)

    def close(self) -> None:
        self.stream.close()
        self.states.close()

    def transaction(self, msgs: list[Any]) -> list[Any]:
        """One Kafka transaction, from the polled records and, while they are all usage
        that the fast reader takes, from further polls of what is already fetched, up to
        usage_batch_size records and at most as many subscriptions as the state cache
        holds: usage costs mostly per subscription touched (its state, changelog record
        and RocksDB entry), so more of it per transaction is cheaper per event. Returns
        every record it consumed."""
        batch = Batch()
        touched_jobs: set[int] = set()
        with self.transactions.open() as positions:
            subscriptions: set[str] = set()
            plain = self._read(msgs, batch, positions, touched_jobs, subscriptions)
            if plain and not self.jobs.running:  # a bill run's transactions stay one poll
                msgs = list(msgs)
                limit, states = self.usage_batch_size, self.states.cache_entries
                while plain and len(msgs) < limit and len(subscriptions) < states:
                    if self.stop:
                        break
                    more = self.stream.poll(min(self.batch_size, limit - len(msgs)), 0)
                    if not more:
                        break
                    msgs += more
                    plain = self._read(more, batch, positions, touched_jobs, subscriptions)
            self.alignment.drain(positions, lambda ready, p: self._apply_ready(ready, batch, p))
            self.alignment.backpressure()
            touched_jobs |= self.jobs.step(
                set(self.states.stores),
                lambda p, job: self._close_due(batch, p, job.until, job.accounts, job.cursor),
            )
            if self.clock == "wall":
                now = datetime.now(UTC)
                for p in list(self.states.stores):
                    self._close_due(batch, p, now, None, b"")
            self.states.produce(self.producer, batch, self.transactions.on_delivery)
            self.jobs.commit_positions(positions, touched_jobs)
        # committed: the local state may now follow the changelog
        self.states.apply(batch)
        self.jobs.finish()
        self.invoices_emitted += batch.invoices
        INVOICES_EMITTED.inc(batch.invoices)
        return msgs

    # --- records -----------------------------------------------------------------------

    def _read(
        self,
        msgs: list[Any],
        batch: Batch,
        positions: Offsets,
        touched_jobs: set[int],
        subscriptions: set[str],
    ) -> bool:
        """Decode polled records into their partitions' buffers (bill-run commands start
        their run). True if every one was usage that the fast reader took; the
        subscriptions those name are added to `subscriptions`."""
        read, usage_topic = self.usage_reader.read, self.usage_topic
        buffers = self.alignment.buffers
        plain = True
        add = subscriptions.add
        for msg in msgs:
            topic = msg.topic()
            if topic == usage_topic:  # the hot path: _buffer's, inlined
                kind, published = msg.timestamp()
                record = read(msg.value(), published if kind else None)
                topics = buffers.get(msg.partition())
                if record is not None and topics is not None:
                    # what event.timestamp.timestamp() gives: µs / 10^6, rounded once
                    us = record[1] / 1_000_000
                    topics[topic].append(Pending(us, msg, None, None, record[2], record))
                    add(record[3])
                    continue
            elif topic == self.control_topic:
                plain = False
                p = msg.partition()
                if p not in self.jobs.running:  # one at a time: the partition is paused meanwhile
                    if self._start_job(msg, batch):
                        touched_jobs.add(p)
                    else:  # dead-lettered: done with it
                        positions[(topic, p)] = msg.offset() + 1
                continue
            plain = False
            self._buffer(msg)
        return plain

    def _buffer(self, msg: Any) -> None:
        topic, value, p = msg.topic(), msg.value(), msg.partition()
        kind, published = msg.timestamp()
        if not kind:
            published = None
        usage = topic == self.usage_topic
        record = self.usage_reader.read(value, published) if usage else None
        if record is not None:
            # what event.timestamp.timestamp() gives: µs / 10^6, rounded once
            pending = Pending(record[1] / 1_000_000, msg, None, None, record[2], record)
        else:
            event, account_id, error = decode_input(value, usage, published)
            timestamp = event.timestamp.timestamp() if event is not None else float("-inf")
            pending = Pending(timestamp, msg, event, error, account_id)
        self.alignment.buffer(p)[topic].append(pending)

    def _apply_ready(self, ready: list[Pending], batch: Batch, p: int) -> None:
        """Apply partition p's records in the given order. Plain usage (see UsageTally: an
        ordinary record inside its subscription's open segment, of the subscription's
        account) is totalled per subscription and added to its state once; any other record
        of a subscription first settles that subscription's tally, then goes through
        apply_input one by one, as does plain usage that comes after it. Plain usage makes
        neither an invoice nor a dead letter, so every output keeps its order."""
        tallies: dict[str, UsageTally | None] = {}  # None: not plain (ended, unknown, ...)
        apply = self._apply
        for pending in ready:
            record = pending.record
            if record is not None:
                sub = record[3]
                tally = tallies.get(sub, False)
                if tally is False:
                    tally = tallies[sub] = self._tally(batch, p, sub)
                if (
                    tally is not None
                    and tally.start_us <= record[1] < tally.end_us
                    and record[2] == tally.state.account_id
                ):
                    tally.records.append(record)
                    continue
                pending.event = usage_event(record)
            apply(pending, batch, tallies)
        for tally in tallies.values():
            if tally is not None:
                tally.settle()

    def _tally(self, batch: Batch, p: int, sub: str) -> UsageTally | None:
        """A tally for the subscription's plain usage; None if it has none (no state, or
        ended): its usage then takes the general path."""
        states = batch.states.get(p)
        first_touch = states is None or sub not in states
        state = self.states.get(batch, p, sub)
        batch.states[p][sub] = state  # touched: its state goes to the changelog
        if state is None or state.status == STATUS_ENDED or self.usage_tally is None:
            return None
        if plan_missing(state, self.catalog):
            return None  # the general path refuses its events
        if first_touch:
            batch.due_unchanged.setdefault(p, set()).add(sub)
        return self.usage_tally(state, self.catalog.plan(state.plan_id))

    def _apply(self, pending: Pending, batch: Batch, tallies: dict[str, UsageTally | None]) -> None:
        msg, event = pending.msg, pending.event
        if pending.error:
            self._dead_letter(batch, msg, *pending.error)
            return
        p = msg.partition()
        tally = tallies.pop(event.subscription_id, None)
        if tally is not None:
            tally.settle()  # its usage came first
        state = self.states.get(batch, p, event.subscription_id)
        new_state, invoices, rejections = apply_input(
            state, event, pending.account_id, self.catalog
        )
        batch.states[p][event.subscription_id] = new_state
        batch.due_unchanged.get(p, set()).discard(event.subscription_id)
        self._emit(batch, p, new_state, invoices)
        for reason in rejections:
            self._dead_letter(batch, msg, "rejected", reason)

    def _emit(
        self, batch: Batch, p: int, state: SubscriptionState | None, invoices: list[Invoice]
    ) -> None:
        if not invoices:
            return
        encode, on_delivery = self.invoice_writer.encode, self.transactions.on_delivery
        for inv in invoices:
            plan_id = state.plan_id if state is not None else ""
            method = state.payment_method if state is not None else None
            self.producer.produce(
                self.invoices_topic,
                key=inv.account_id.encode(),
                value=encode(inv, plan_id, method),
                partition=p,
                on_delivery=on_delivery,
            )
        batch.invoices += len(invoices)

    def _dead_letter(self, batch: Batch, msg: Any, reason: str, detail: str) -> None:
        produce_dead_letter(self.producer, msg, reason, detail, NAME,
                            on_delivery=self.transactions.on_delivery)  # fmt: skip
        batch.dead_letters += 1

    # --- bill runs and the clock ----------------------------------------------------------

    def _start_job(self, msg: Any, batch: Batch) -> bool:
        """Start the bill run of a control record; False if it was dead-lettered."""
        p = msg.partition()
        try:
            rec = decode_bill_run(
                msg.value(), (self.subscriptions_topic, self.usage_topic), published_ms(msg)
            )
        except DecodeError as exc:
            log.error("bad control record dead-lettered", error=str(exc), offset=msg.offset())
            self._dead_letter(batch, msg, exc.reason, exc.detail)
            return False
        accounts = frozenset(rec["accounts"]) if rec["accounts"] is not None else None
        job = Job(msg.offset(), rec["run_id"], rec["until"], accounts, rec["barrier"])
        self.jobs.start(p, job)
        return True

    def _close_due(
        self,
        batch: Batch,
        p: int,
        until: datetime,
        accounts: frozenset[str] | None,
        cursor: bytes,
    ) -> tuple[bytes, bool]:
        """Close up to close_chunk due subscriptions of partition p after the cursor.
        Returns the new cursor and whether nothing due is left."""
        due = self.states.stores[p].due_after(cursor, to_micros(until))
        for handled, (key, sub) in enumerate(due):
            if handled >= self.close_chunk:
                return cursor, False
            cursor = key
            self._close_one(batch, p, sub, until, accounts)
        # subscriptions changed in this transaction are not in the due index yet
        for sub in list(batch.states.get(p, {})):
            self._close_one(batch, p, sub, until, accounts)
        return cursor, True

    def _close_one(
        self, batch: Batch, p: int, sub: str, until: datetime, accounts: frozenset[str] | None
    ) -> None:
        state = self.states.get(batch, p, sub)
        if state is None:
            return
        end = next_period_end(state)
        due = end is not None and end <= until
        if not due or (accounts is not None and state.account_id not in accounts):
            if sub not in batch.states[p]:  # untouched: the committed version, as it was
                self.states.put_back(batch, p, sub, state)
            return
        if plan_missing(state, self.catalog):
            if sub not in self.blocked:  # once per subscription: a clock retries it often
                self.blocked.add(sub)
                log.error("period cannot close: the plan is not in the catalog",
                          subscription_id=sub, plan_id=state.plan_id, partition=p)  # fmt: skip
            if sub not in batch.states[p]:
                self.states.put_back(batch, p, sub, state)
            return
        new_state, invoices = close_periods(state, until, self.catalog)
        batch.states[p][sub] = new_state
        batch.due_unchanged.get(p, set()).discard(sub)
        self._emit(batch, p, new_state, invoices)


def make_rating(
    settings: Settings,
    bootstrap: str,
    catalog: Catalog,
    worker: int = 0,
    admin: Any = None,
    **options: Any,
) -> RatingProcessor:
    """A rating worker with its Kafka clients (admin: the cluster's unless given;
    ``options``: RatingProcessor's)."""
    limit_malloc_arenas()  # before the Kafka clients' and RocksDB's threads exist
    # `is None`, not `or`: a Kafka client has a length (its queue), so an idle one is falsy
    admin = admin if admin is not None else clients.admin(settings, bootstrap)
    stream = StreamLoop.from_settings(
        NAME, settings, bootstrap, GROUP,
        consumer_config={"partition.assignment.strategy": "range", **FETCH_SIZES},
        producer_config={
            "transactional.id": transactional_id(NAME, worker),
            "transaction.timeout.ms": 120_000,
            "linger.ms": 5,
        },
    )  # fmt: skip

    def restorer() -> Consumer:
        return clients.consumer(settings, bootstrap, group_id(f"{GROUP}-restore"),
                                **{"enable.partition.eof": True})  # fmt: skip

    return RatingProcessor(settings, catalog, stream, admin, restorer, **options)
