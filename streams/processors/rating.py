"""The rating processor: subscription and usage events in, invoices out, exactly once.

A thin adapter around ``streams.domain.rating``. Each loop iteration is one Kafka
transaction holding the invoices, dead letters and state changelog records it produced
plus the input offsets it consumed, so a crash or a rebalance never loses or repeats an
invoice (downstream reads with isolation.level=read_committed).

Inputs are co-partitioned by account (``range`` assignment gives one worker the same
partition number of every input topic), and the state of partition p lives in
``<home>/state/rating/p<p>`` (RocksDB) backed by partition p of the changelog topic.

Event time is aligned across the two input topics: each partition's subscription and
usage records wait in small buffers and are applied in timestamp order (subscription
events first on ties), a record being released only when the other topic's buffer has
data or that topic is caught up (or has been silent for ``max_idle`` seconds), as Kafka
Streams does; records held back are looked at again every turn, new input or not. Without
it, usage read ahead of its subscription.created would be rejected, and usage after a plan
change could be rated under the old plan.

Periods close
- on an event of the subscription at or after the period end (event time);
- on a bill run (``billing.control``): "close every period ending <= until", executed
  once the worker has consumed its inputs up to the run's barrier offsets, in chunks of
  one transaction each, idempotently (a closed period is no longer due);
- with ``clock="wall"``, continuously: every period whose end has passed in real time.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.domain.catalog import Catalog
from streams.domain.events import Event, InvalidEvent, SubscriptionCreated, UsageRecord, parse_event
from streams.domain.invoice import Invoice
from streams.domain.rating import (
    STATUS_ENDED,
    SubscriptionState,
    UsageTally,
    apply_event,
    close_periods,
    next_period_end,
)
from streams.domain.timestamps import to_micros
from streams.kafka import clients
from streams.kafka.topics import (
    CONTROL,
    INVOICES,
    RATING_CHANGELOG,
    SUBSCRIPTIONS,
    USAGE,
    group_id,
)
from streams.metrics import BATCH_SECONDS, INVOICES_EMITTED, RECORDS, LagTracker
from streams.processors.rating_codec import InvoiceWriter, UsageReader, usage_event
from streams.runtime.deadletter import produce_dead_letter
from streams.runtime.process import StopFlag, poll_batch, transactional_id, tune_gc
from streams.runtime.state import PartitionStore, StateCache, due_key

log = structlog.get_logger(__name__)
GROUP = "streambill-rating"
MAX_BUFFERED = 5_000  # decoded records waiting for event-time order, per topic-partition
# Small fetches (librdkafka's default is 1 MiB a partition; clients.consumer raises it to
# 10 MiB): what librdkafka's threads allocate for fetched batches lands in one malloc
# arena they share, which large buffers fragmented. A 1M-subscription bench billrun peaked
# at 1,752 MB per worker with 10 MiB fetches, 1,074 MB with these, as fast.
FETCH_SIZES = {"max.partition.fetch.bytes": 262_144, "fetch.max.bytes": 1_310_720}
NAME = "rating"
# The timestamps the ingestion API refuses (streams/api/records.py) are refused here too,
# for records published to Kafka directly: an event from before 2000, or dated more than a
# day after it was published, would open or close decades of periods at once (thousands
# of invoices per subscription). A bill run's `until` has the same bound after its issue.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(days=1)
_EARLIEST_US = to_micros(EARLIEST)
_MAX_FUTURE_MS = MAX_FUTURE // timedelta(milliseconds=1)
MAX_FUTURE_TEXT = f"{MAX_FUTURE / timedelta(hours=1):g} hours"
# what this processor dead-letters, by reason: the codec's (empty_value, invalid_avro,
# unknown_schema); invalid_event (decoded, but not a valid event); rejected (a valid event
# the subscription's state refuses: unknown subscription, duplicate creation, late event,
# another account's subscription, ...); invalid_bill_run (a bill-run command it cannot run)
DEAD_LETTER_REASONS = frozenset({
    "empty_value", "invalid_avro", "unknown_schema", "invalid_event", "rejected",
    "invalid_bill_run",
})  # fmt: skip


def timestamp_problem(timestamp: datetime, published_ms: int | None) -> str | None:
    """Why an event's timestamp is refused, if it is: before EARLIEST, or more than
    MAX_FUTURE after the record was published (its Kafka timestamp, epoch ms; None when the
    record has none). Compared in whole milliseconds, as Kafka stamps records, so that what
    the API accepted (at most MAX_FUTURE after its clock, then published) passes here."""
    us = to_micros(timestamp)
    if us < _EARLIEST_US:
        return f"timestamp before {EARLIEST.date()}"
    if published_ms is not None and us // 1000 > published_ms + _MAX_FUTURE_MS:
        return f"timestamp more than {MAX_FUTURE_TEXT} after the record was published"
    return None


def decode_input(
    value: bytes | None, usage: bool, published_ms: int | None = None
) -> tuple[Event | None, str | None, tuple[str, str] | None]:
    """One record of billing.usage (usage=True) or billing.subscriptions, decoded and
    validated: (event, the record's account_id, None), or (None, None, (reason, detail))
    for the dead letters. Pure; never raises."""
    try:
        if usage:
            rec = codec(USAGE.schema).decode(value)
            rec["type"] = "usage"
        else:
            rec = codec(SUBSCRIPTIONS.schema).decode(value)
        event = parse_event(rec)
    except DecodeError as exc:
        return None, None, (exc.reason, exc.detail)
    except InvalidEvent as exc:
        return None, None, ("invalid_event", exc.reason)
    problem = timestamp_problem(event.timestamp, published_ms)
    if problem:
        return None, None, ("invalid_event", f"{problem}: {event.timestamp.isoformat()}")
    return event, rec["account_id"], None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """At most `arenas` glibc malloc arenas for this process (mallopt M_ARENA_MAX; the
    default is 8 per core), set before librdkafka's and RocksDB's threads allocate: in a
    1M-subscription bill run a worker held six 64 MiB thread arenas beside its main heap,
    each keeping what was freed in it. False where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, arenas) == 1  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


@functools.cache
def usage_reader() -> UsageReader:
    """decode_input's fast path for ordinary usage records (None: take decode_input)."""
    return UsageReader(USAGE.schema, _EARLIEST_US, _MAX_FUTURE_MS)


@functools.cache
def invoice_writer() -> InvoiceWriter:
    """An invoice's Avro value: the bytes codec(INVOICES.schema) writes for invoice_record."""
    encode = codec(INVOICES.schema).encode
    return InvoiceWriter(INVOICES.schema, lambda *args: encode(invoice_record(*args)))


def published_ms(msg: Any) -> int | None:
    """A consumed record's Kafka timestamp (epoch ms), None if it has none."""
    kind, ms = msg.timestamp()
    return ms if kind else None


def apply_input(
    state: SubscriptionState | None, event: Event, account_id: str | None, catalog: Catalog
) -> tuple[SubscriptionState | None, list[Invoice], list[str]]:
    """``apply_event`` plus what only a record from Kafka needs checking: the account it
    names must own the subscription (usage, a plan change or a cancellation under another
    account's key is refused, not billed to that other account). Returns the new state, the
    invoices, and the reasons of the rejections (one dead letter "rejected" each)."""
    if (
        state is not None
        and account_id is not None
        and account_id != state.account_id
        and not isinstance(event, SubscriptionCreated)
    ):
        sub = event.subscription_id
        return state, [], [f"subscription {sub!r} belongs to another account than {account_id!r}"]
    new_state, invoices, rejections = apply_event(state, event, catalog)
    return new_state, invoices, [r.reason for r in rejections]


def decode_bill_run(
    value: bytes | None, input_topics: tuple[str, ...], published_ms: int | None = None
) -> dict[str, Any]:
    """A bill-run command, decoded and checked; raises DecodeError (reason
    invalid_bill_run for a record that decodes but cannot be run: a barrier on a topic this
    processor does not consume would never be reached, and an `until` more than MAX_FUTURE
    after the run was published would invoice periods, up to years of them, in advance)."""
    rec = codec(CONTROL.schema).decode(value)
    unknown = sorted(set(rec["barrier"]) - set(input_topics))
    if unknown:
        raise DecodeError("invalid_bill_run", f"barrier on topics not rated: {unknown}")
    if any(offset < 0 for offset in rec["barrier"].values()):
        raise DecodeError("invalid_bill_run", f"negative barrier offset in {rec['barrier']}")
    until_ms = to_micros(rec["until"]) // 1000
    issued_ms = published_ms if published_ms is not None else to_micros(rec["issued_at"]) // 1000
    if until_ms > issued_ms + _MAX_FUTURE_MS:
        raise DecodeError("invalid_bill_run", f"until {rec['until'].isoformat()} is more than "
                          f"{MAX_FUTURE_TEXT} after the run was issued")  # fmt: skip
    return rec


def invoice_record(inv: Invoice, plan_id: str, payment_method: str | None) -> dict[str, Any]:
    return {
        "invoice_id": inv.invoice_id,
        "account_id": inv.account_id,
        "subscription_id": inv.subscription_id,
        "plan_id": plan_id,
        "currency": inv.currency,
        "issued_at": inv.issued_at,
        "reason": inv.reason,
        "lines": [
            {
                "charge_id": ln.charge_id,
                "kind": ln.kind,
                "period_start": ln.period_start,
                "period_end": ln.period_end,
                "quantity": ln.quantity,
                "amount": ln.amount,
            }
            for ln in inv.lines
        ],
        "total": inv.total,
        "payment_method": payment_method,
    }


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
class CloseJob:
    """A bill run in progress on one partition."""

    control_offset: int
    run_id: str
    until: datetime
    accounts: frozenset[str] | None
    barrier: dict[str, int]  # input topic -> offset this worker must have consumed first
    cursor: bytes = b""  # last due key handled: the scan resumes after it
    done: bool = False


@dataclass
class Batch:
    """The state changes of one transaction, per partition."""

    states: dict[int, dict[str, SubscriptionState | None]] = field(default_factory=dict)
    # the due-index key each subscription had before this transaction
    original_due: dict[int, dict[str, bytes | None]] = field(default_factory=dict)
    encoded: dict[int, dict[str, bytes | None]] = field(default_factory=dict)
    # subscriptions changed by UsageTally only: their due-index key is still the original
    tallied: dict[int, set[str]] = field(default_factory=dict)
    invoices: int = 0
    dead_letters: int = 0


class RatingProcessor:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        catalog: Catalog,
        worker: int = 0,
        clock: str = "event",
        batch_size: int | None = None,  # default: settings.rating_transaction_records
        close_chunk: int = 2000,
        max_idle: float = 0.5,
        state_cache_entries: int | None = None,  # default: settings.rating_state_cache
    ) -> None:
        limit_malloc_arenas()  # before the Kafka clients' and RocksDB's threads exist
        self.settings = settings
        self.catalog = catalog
        self.clock = clock
        # records consumed per transaction at most: one poll (librdkafka hands over what it
        # has fetched ahead, waiting at most 0.1 s for more). A subscription touched several
        # times in a transaction gets one state record in the changelog, and the commit's
        # fixed cost is shared by more records; under load a transaction takes under a second.
        self.batch_size = batch_size or settings.rating_transaction_records
        self.usage_batch_size = max(self.batch_size, settings.rating_usage_transaction_records)
        self.close_chunk = close_chunk
        self.max_idle = max_idle
        # partition -> topic -> records in offset order, not yet applied
        self.buffers: dict[int, dict[str, deque[Pending]]] = {}
        # partition -> since when (monotonic) its records wait for the other topic: only
        # while some do
        self.blocked_since: dict[int, float] = {}
        # topic-partitions paused because their buffer is full (backpressure)
        self.throttled: set[tuple[str, int]] = set()
        self.bootstrap = bootstrap
        # the namespace is fixed for a worker's life: resolve topic names once (hot path)
        self.subscriptions_topic, self.usage_topic = SUBSCRIPTIONS.name, USAGE.name
        self.control_topic, self.invoices_topic = CONTROL.name, INVOICES.name
        self.changelog_topic = RATING_CHANGELOG.name
        self.usage_reader, self.invoice_writer = usage_reader(), invoice_writer()
        self.admin = clients.admin(settings, bootstrap)
        self.consumer: Consumer = clients.consumer(
            settings, bootstrap, group_id(GROUP),
            **{"partition.assignment.strategy": "range", **FETCH_SIZES},
        )  # fmt: skip
        self.lag = LagTracker(self.consumer, "rating")
        self.producer = clients.producer(
            settings,
            bootstrap,
            **{
                "transactional.id": transactional_id("rating", worker),
                "transaction.timeout.ms": 120_000,
                "linger.ms": 5,
            },
        )
        self.producer.init_transactions()
        self.state_root = settings.state_dir / "rating"
        self.stores: dict[int, PartitionStore] = {}
        # partition -> committed states, decoded (see StateCache); the partitions share
        # state_cache_entries, about 3 KB a state with a busy period's event ids
        self.caches: dict[int, StateCache] = {}
        self.state_cache_entries = state_cache_entries or settings.rating_state_cache
        if self.batch_size < 1 or self.state_cache_entries < 1:
            raise ValueError("the rating transaction size and state cache must be at least 1")
        self.jobs: dict[int, CloseJob] = {}
        self.jobs_running: set[int] = set()  # partitions whose bill run closed periods last turn
        self.changelog_next: dict[int, int] = {}
        self.stop = StopFlag()
        self.invoices_emitted = 0
        self._delivery_error: Exception | None = None

    # --- partition lifecycle ---------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        new = sorted({tp.partition for tp in partitions} - set(self.stores))
        for p, store in self._restore(new).items():
            self.stores[p] = store
            self.caches[p] = StateCache(0)
        self._size_caches()
        log.info("assigned", partitions=sorted(self.stores))

    def _size_caches(self) -> None:
        for cache in self.caches.values():
            cache.capacity = max(1, self.state_cache_entries // len(self.caches))
            cache.trim()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The consumer keeps a partition paused through its revocation and reassignment,
        # while what this worker paused it for (backpressure, a bill run on the control
        # partition) is forgotten below: resumed now, or once reassigned it is never
        # fetched again (a bill run would never restart, held-back records never go).
        consumer.resume(partitions)
        for p in sorted({tp.partition for tp in partitions}):
            store = self.stores.pop(p, None)
            if store:
                store.close()
            self.caches.pop(p, None)
            self.jobs.pop(p, None)
            # unapplied records are fetched again from the committed offsets
            self.buffers.pop(p, None)
            self.blocked_since.pop(p, None)
            self.throttled = {(t, q) for t, q in self.throttled if q != p}
        self._size_caches()
        log.info("revoked", partitions=sorted({tp.partition for tp in partitions}))

    def _restore(self, partitions: list[int]) -> dict[int, PartitionStore]:
        """Bring the RocksDB of each partition up to the end of its changelog partition:
        all of them through one consumer, each done at its end-of-partition event (a store
        already up to date still has the last transaction's commit marker ahead of it, so
        the event is what says so, promptly: polls wait 0.1 s at most)."""
        stores = {p: PartitionStore(Path(self.state_root) / f"p{p}") for p in partitions}
        if not stores:
            return stores
        restorer = clients.consumer(
            self.settings,
            self.bootstrap,
            group_id(f"{GROUP}-restore"),
            **{"enable.partition.eof": True},
        )
        try:
            todo = []
            for p, store in stores.items():
                changelog = TopicPartition(RATING_CHANGELOG.name, p)
                low, high = clients.retrying(
                    lambda changelog=changelog: restorer.get_watermark_offsets(changelog, 30)
                )
                start = max(store.checkpoint, low)
                if start < high:
                    todo.append(TopicPartition(RATING_CHANGELOG.name, p, start))
            if not todo:
                return stores
            restorer.assign(todo)
            restoring = {tp.partition for tp in todo}
            restored: Counter[int] = Counter()
            while restoring:
                # partition -> (states, due-index moves, next changelog offset)
                chunk: dict[int, tuple[dict[str, bytes | None], list, int]] = {}
                for msg in restorer.consume(10_000, timeout=0.1):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            restoring.discard(msg.partition())  # caught up
                        elif err.fatal():
                            raise KafkaException(err)
                        continue  # transient: librdkafka retries
                    p, sub = msg.partition(), msg.key().decode()
                    states, moves, _ = chunk.get(p) or ({}, [], 0)
                    old = stores[p].get(sub) if sub not in states else states[sub]
                    states[sub] = msg.value()
                    moves.append((self._due_key_of(sub, old), self._due_key_of(sub, msg.value())))
                    chunk[p] = (states, moves, msg.offset() + 1)
                    restored[p] += 1
                for p, (states, moves, next_offset) in chunk.items():
                    stores[p].write(states, moves, next_offset)
            log.info("state restored", partitions=[tp.partition for tp in todo],
                     records=sum(restored.values()))  # fmt: skip
            return stores
        except BaseException:
            for store in stores.values():
                store.close()
            raise
        finally:
            restorer.close()

    @staticmethod
    def _due_key_of(sub: str, raw: bytes | SubscriptionState | None) -> bytes | None:
        if raw is None:
            return None
        state = SubscriptionState.from_bytes(raw) if isinstance(raw, bytes) else raw
        end = next_period_end(state)
        return due_key(to_micros(end), sub) if end else None

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
        self.consumer.subscribe(
            [SUBSCRIPTIONS.name, USAGE.name, CONTROL.name],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
        )

    def turn(self) -> None:
        """One turn of the loop: a poll and, if there is work, one transaction."""
        # a bill run closing periods has work without input: no waiting for records
        timeout = 0.0 if self.jobs_running & set(self.jobs) else 0.1
        msgs = poll_batch(self.consumer, self.batch_size, timeout)
        # records held back for event-time order (blocked_since) are looked at again
        # without new input: it may have ended, and what they wait for is then the other
        # topic found caught up, or max_idle passed while the broker cannot say
        if msgs or self.jobs or self.clock == "wall" or self.blocked_since:
            started = time.perf_counter()
            msgs = self._transaction(msgs)
            if msgs:
                BATCH_SECONDS.labels("rating").observe(time.perf_counter() - started)
                for topic, n in Counter(m.topic() for m in msgs).items():
                    RECORDS.labels("rating", topic).inc(n)
        self.lag.maybe_update()

    def close(self) -> None:
        self.consumer.close()
        for store in self.stores.values():
            store.close()

    def _transaction(self, msgs: list[Any]) -> list[Any]:
        """One Kafka transaction, from the polled records and, while they are all usage
        that the fast reader takes, from further polls of what is already fetched, up to
        usage_batch_size records and at most as many subscriptions as the state cache
        holds: usage costs mostly per subscription touched (its state, changelog record
        and RocksDB entry), so more of it per transaction is cheaper per event. Returns
        every record it consumed."""
        batch = Batch()
        positions: dict[tuple[str, int], int] = {}
        touched_jobs: set[int] = set()
        self.producer.begin_transaction()
        try:
            subscriptions: set[str] = set()
            plain = self._read(msgs, batch, positions, touched_jobs, subscriptions)
            if plain and not self.jobs:  # a bill run's transactions stay one poll
                msgs = list(msgs)
                limit, states = self.usage_batch_size, self.state_cache_entries
                while plain and len(msgs) < limit and len(subscriptions) < states:
                    if self.stop:
                        break
                    more = poll_batch(self.consumer, min(self.batch_size, limit - len(msgs)), 0)
                    if not more:
                        break
                    msgs += more
                    plain = self._read(more, batch, positions, touched_jobs, subscriptions)
            self._drain_all(batch, positions)
            self._backpressure()
            self.jobs_running = self._run_jobs(batch)
            touched_jobs |= self.jobs_running
            if self.clock == "wall":
                now = datetime.now(UTC)
                for p in list(self.stores):
                    self._close_due(batch, p, now, None, b"")
            self._flush_states(batch)
            # a bill run's record stays uncommitted until the run is complete (a run started
            # after an invalid record of the batch decides the partition's control offset)
            for p, job in self.jobs.items():
                if p in touched_jobs:
                    positions[(self.control_topic, p)] = job.control_offset + job.done
            offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
            if offsets:
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata()
                )
            self.producer.flush()
            if self._delivery_error:
                raise self._delivery_error
            self.producer.commit_transaction()
        except BaseException:
            self.producer.abort_transaction()
            raise
        # committed: the local cache may now follow the changelog
        self._apply_to_stores(batch)
        self._finish_jobs()
        self.invoices_emitted += batch.invoices
        INVOICES_EMITTED.inc(batch.invoices)
        return msgs

    def _read(
        self,
        msgs: list[Any],
        batch: Batch,
        positions: dict[tuple[str, int], int],
        touched_jobs: set[int],
        subscriptions: set[str],
    ) -> bool:
        """Decode polled records into their partitions' buffers (bill-run commands start
        their run). True if every one was usage that the fast reader took; the
        subscriptions those name are added to `subscriptions`."""
        read, buffers, usage_topic = self.usage_reader.read, self.buffers, self.usage_topic
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
                if p not in self.jobs:  # one run at a time: the partition is paused meanwhile
                    if self._start_job(msg, batch):
                        touched_jobs.add(p)
                    else:  # dead-lettered: done with it
                        positions[(topic, p)] = msg.offset() + 1
                continue
            plain = False
            self._buffer(msg)
        return plain

    # --- events -------------------------------------------------------------------------

    def _state(self, batch: Batch, p: int, sub: str) -> SubscriptionState | None:
        """The subscription's state as this transaction sees it. Its first touch takes the
        committed version out of the cache (or reads it from RocksDB): the domain updates
        it in place, and only a commit puts it back (_apply_to_stores)."""
        dirty = batch.states.get(p)
        if dirty is None:
            dirty = batch.states[p] = {}
            batch.original_due[p] = {}
        elif sub in dirty:
            return dirty[sub]
        cached = self.caches[p].take(sub)
        if cached is not None:
            state, due = cached
        else:
            raw = self.stores[p].get(sub)
            state = SubscriptionState.from_bytes(raw) if raw is not None else None
            due = self._due_key_of(sub, state)
        batch.original_due[p][sub] = due
        return state

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
        topics = self.buffers.get(p)
        if topics is None:
            topics = self.buffers[p] = {
                self.subscriptions_topic: deque(),
                self.usage_topic: deque(),
            }
        topics[topic].append(pending)

    def _backpressure(self) -> None:
        """After draining: a topic-partition with MAX_BUFFERED records still waiting (the
        other topic lags behind in event time) is paused, so that waiting records cannot
        grow without bound, and resumed once it is down to half of that. Decided after the
        drain, not while buffering a batch: pausing drops what the consumer has fetched
        ahead, and a large batch of one topic usually drains at once."""
        for p, topics in self.buffers.items():
            for topic, waiting in topics.items():
                if (topic, p) in self.throttled:
                    if len(waiting) < MAX_BUFFERED // 2:
                        self.consumer.resume([TopicPartition(topic, p)])
                        self.throttled.discard((topic, p))
                elif len(waiting) >= MAX_BUFFERED:
                    self.consumer.pause([TopicPartition(topic, p)])
                    self.throttled.add((topic, p))

    def _positions(self, topics: list[str], p: int) -> dict[str, int]:
        """Next offset to be delivered per topic of partition p. A partition that has
        delivered nothing since it was assigned has no position yet: the committed
        offset (where its consumption resumed) stands in for it."""
        tps = [TopicPartition(t, p) for t in topics]
        positions = {tp.topic: tp.offset for tp in self.consumer.position(tps)}
        unknown = [TopicPartition(t, p) for t, o in positions.items() if o < 0]
        if unknown:
            for tp in self.consumer.committed(unknown, timeout=5.0):
                if tp.error is not None:  # not "offset 0": the broker could not say
                    raise KafkaException(tp.error)
                positions[tp.topic] = max(tp.offset, 0)
        return positions

    def _caught_up(self, keys: set[tuple[str, int]]) -> dict[tuple[str, int], bool | None]:
        """Has each (topic, partition) delivered everything committed so far? None when the
        broker cannot tell. A fresh look (one request for all of them), not the cached high
        watermark: that can predate records already published, which would let a later
        event overtake them. Read-committed, so the bound is the last stable offset."""
        tps = [TopicPartition(t, p) for t, p in sorted(keys)]
        try:
            futures = self.admin.list_offsets(
                {tp: OffsetSpec.latest() for tp in tps},
                isolation_level=IsolationLevel.READ_COMMITTED,
                request_timeout=5.0,
            )
            ends = {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
            # a time-out under load means "cannot say", never a stopped worker
            return {(t, p): self._positions([t], p)[t] >= ends[(t, p)] for t, p in keys}
        except KafkaException:
            return dict.fromkeys(keys)

    def _drain_all(self, batch: Batch, positions: dict[tuple[str, int], int]) -> None:
        """Drain every partition; the broker looks that draining needs are made together."""
        caught: dict[tuple[str, int], bool | None] = {}
        todo = list(self.buffers)
        while todo:
            needs = {}
            for p in todo:
                need = self._drain(p, batch, positions, caught)
                if need is not None:
                    needs[need] = p
            if not needs:
                return
            caught.update(self._caught_up(set(needs)))
            todo = list(needs.values())

    def _drain(
        self,
        p: int,
        batch: Batch,
        positions: dict[tuple[str, int], int],
        caught: dict[tuple[str, int], bool | None],
    ) -> tuple[str, int] | None:
        """Apply partition p's buffered records in event-time order, as far as is safe.

        While one topic's buffer is empty, the other's records wait unless that topic is
        caught up (nothing of it left to fetch), as Kafka Streams does (KIP-695): a record
        never overtakes an earlier one that is published but not yet fetched. Only when the
        broker cannot say (errors) do records flow after max_idle seconds. Returns the
        (topic, p) whose caught-up state must be looked up before it can go on, if any."""
        ready: list[Pending] = []
        need = self._order(p, positions, caught, ready)
        if ready:
            self._apply_ready(ready, batch, p)
        return need

    def _order(
        self,
        p: int,
        positions: dict[tuple[str, int], int],
        caught: dict[tuple[str, int], bool | None],
        ready: list[Pending],
    ) -> tuple[str, int] | None:
        """_drain's choice: moves partition p's records that may go now, in the order they
        are to be applied, from its buffers to `ready`."""
        subs = self.buffers[p][self.subscriptions_topic]
        usage = self.buffers[p][self.usage_topic]
        while subs or usage:
            if subs and usage:
                self.blocked_since.pop(p, None)
            else:
                empty = (self.subscriptions_topic if not subs else self.usage_topic, p)
                if empty not in caught:
                    return empty
                if not caught[empty]:
                    since = self.blocked_since.setdefault(p, time.monotonic())
                    if caught[empty] is False or time.monotonic() - since < self.max_idle:
                        return None  # the silent topic may still hold earlier events
                # the other topic has nothing before them: all of this one's go, in order
                waiting = subs or usage
                ready.extend(waiting)
                positions[(waiting[-1].msg.topic(), p)] = waiting[-1].msg.offset() + 1
                waiting.clear()
                self.blocked_since.pop(p, None)
                return None
            if not usage or (subs and subs[0].timestamp <= usage[0].timestamp):
                pending = subs.popleft()
            else:
                pending = usage.popleft()
            msg = pending.msg
            positions[(msg.topic(), p)] = msg.offset() + 1
            ready.append(pending)
        return None

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
        state = self._state(batch, p, sub)
        batch.states[p][sub] = state  # touched: its state goes to the changelog
        if state is None or state.status == STATUS_ENDED:
            return None
        if first_touch:
            batch.tallied.setdefault(p, set()).add(sub)
        return UsageTally(state, self.catalog.plan(state.plan_id))

    def _apply(self, pending: Pending, batch: Batch, tallies: dict[str, UsageTally | None]) -> None:
        msg, event = pending.msg, pending.event
        if pending.error:
            self._dead_letter(batch, msg, *pending.error)
            return
        p = msg.partition()
        tally = tallies.pop(event.subscription_id, None)
        if tally is not None:
            tally.settle()  # its usage came first
        state = self._state(batch, p, event.subscription_id)
        new_state, invoices, rejections = apply_input(
            state, event, pending.account_id, self.catalog
        )
        batch.states[p][event.subscription_id] = new_state
        batch.tallied.get(p, set()).discard(event.subscription_id)
        self._emit(batch, p, new_state, invoices)
        for reason in rejections:
            self._dead_letter(batch, msg, "rejected", reason)

    def _emit(
        self, batch: Batch, p: int, state: SubscriptionState | None, invoices: list[Invoice]
    ) -> None:
        if not invoices:
            return
        encode = self.invoice_writer.encode
        for inv in invoices:
            plan_id = state.plan_id if state is not None else ""
            method = state.payment_method if state is not None else None
            self.producer.produce(
                self.invoices_topic,
                key=inv.account_id.encode(),
                value=encode(inv, plan_id, method),
                partition=p,
                on_delivery=self._on_delivery,
            )
        batch.invoices += len(invoices)

    def _dead_letter(self, batch: Batch, msg: Any, reason: str, detail: str) -> None:
        produce_dead_letter(self.producer, msg, reason, detail, NAME, on_delivery=self._on_delivery)
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
        self.jobs[p] = CloseJob(
            control_offset=msg.offset(),
            run_id=rec["run_id"],
            until=rec["until"],
            accounts=frozenset(rec["accounts"]) if rec["accounts"] is not None else None,
            barrier=rec["barrier"],
        )
        self.consumer.pause([TopicPartition(CONTROL.name, p)])
        log.info("bill run started on partition", run_id=rec["run_id"], partition=p,
                 until=rec["until"].isoformat(), barrier=rec["barrier"])  # fmt: skip
        return True

    def _barrier_reached(self, p: int, barrier: dict[str, int]) -> bool:
        """Has partition p applied every input record published before the run?"""
        if not barrier:
            return True
        try:
            positions = self._positions(list(barrier), p)
        except KafkaException:
            return False
        if any(positions[t] < end for t, end in barrier.items()):
            log.debug("bill run waits for its barrier", partition=p, barrier=barrier,
                      positions=positions)  # fmt: skip
            return False
        # ... fetched, and applied: nothing before the barrier still waits in a buffer
        buffers = self.buffers.get(p, {})
        return not any(
            buffers.get(t) and buffers[t][0].msg.offset() < end for t, end in barrier.items()
        )

    def _run_jobs(self, batch: Batch) -> set[int]:
        ran = set()
        for p, job in self.jobs.items():
            if p in self.stores and self._barrier_reached(p, job.barrier):
                job.cursor, job.done = self._close_due(
                    batch, p, job.until, job.accounts, job.cursor
                )
                ran.add(p)
        return ran

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
        for handled, (key, sub) in enumerate(self.stores[p].due_after(cursor, to_micros(until))):
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
        state = self._state(batch, p, sub)
        if state is None:
            return
        end = next_period_end(state)
        due = end is not None and end <= until
        if not due or (accounts is not None and state.account_id not in accounts):
            if sub not in batch.states[p]:  # untouched: the committed version, as it was
                self.caches[p].put(sub, state, batch.original_due[p][sub])
            return
        new_state, invoices = close_periods(state, until, self.catalog)
        batch.states[p][sub] = new_state
        batch.tallied.get(p, set()).discard(sub)
        self._emit(batch, p, new_state, invoices)

    def _finish_jobs(self) -> None:
        for p, job in list(self.jobs.items()):
            if job.done:
                del self.jobs[p]
                control = TopicPartition(CONTROL.name, p, job.control_offset + 1)
                self.consumer.seek(control)
                self.consumer.resume([control])
                log.info("bill run done on partition", run_id=job.run_id, partition=p)

    # --- state --------------------------------------------------------------------------

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._delivery_error = RuntimeError(f"delivery failed: {err}")
        elif msg.topic() == self.changelog_topic:
            p = msg.partition()
            self.changelog_next[p] = max(self.changelog_next.get(p, 0), msg.offset() + 1)

    def _flush_states(self, batch: Batch) -> None:
        # Only a partition's last record reports its delivery: it has the highest offset
        # (one producer, in order), which is all the checkpoint needs. Any record that
        # fails makes commit_transaction fail, so none goes unnoticed.
        produce, topic = self.producer.produce, self.changelog_topic
        for p, states in batch.states.items():
            encoded = batch.encoded.setdefault(p, {})
            last = len(states) - 1
            for n, (sub, state) in enumerate(states.items()):
                value = encoded[sub] = state.to_bytes() if state is not None else None
                if n < last:
                    produce(topic, key=sub.encode(), value=value, partition=p)
                else:
                    produce(topic, key=sub.encode(), value=value, partition=p,
                            on_delivery=self._on_delivery)  # fmt: skip

    def _apply_to_stores(self, batch: Batch) -> None:
        for p, states in batch.states.items():
            store = self.stores.get(p)
            if store is None:
                continue
            cache = self.caches[p]
            original_due = batch.original_due.get(p, {})
            tallied = batch.tallied.get(p, set())
            moves = []
            for sub, state in states.items():
                # usage added up (tallied) leaves the period, and so the due key, as it was
                due = original_due[sub] if sub in tallied else self._due_key_of(sub, state)
                moves.append((original_due.get(sub), due))
                if state is not None:
                    cache.put(sub, state, due)
            store.write(batch.encoded[p], moves, self.changelog_next.get(p))
            cache.trim()
