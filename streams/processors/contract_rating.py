"""The rating processor for the whole rating contract (version 2): subscription, account
and usage events in, invoices out, exactly once; chosen with STREAMBILL_RATING_CONTRACT=2.

A thin adapter around ``streams.domain.billing.ContractRun``, the very run `streambill
rate` makes, on the stream runtime: each loop turn is one Kafka transaction
(``streams.runtime.transaction``) holding the invoices, dead letters and state changelog
records it produced plus the input offsets it consumed.

Each partition p of the inputs (co-partitioned by account) has its own run, whose parts
live in the partition's state store and are loaded as they are touched
(``streams.contract_state``: subscriptions, accounts, the due index, the clock). The plan
versions come from ``billing.catalog`` (``streams.catalog_history``), read whole
by every worker: a partition applies each catalog event when its clock reaches the
instant it took effect, so every partition, worker and replay sees the same versions at
the same instants.

The contract's Time, in Kafka: a record arrives at its record timestamp. Records of the
two input topics are applied in order of arrival (``streams.runtime.alignment``,
subscription events first on ties); before each, everything due at or before its arrival
happens (catalog events first at one instant). A bill run to T (``billing.control``)
makes everything due <= T happen, in chunks of one transaction each; with
``clock="wall"`` it happens continuously as real time passes.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import Consumer, TopicPartition

from streams.catalog_history import catalog_events
from streams.catalog_store import catalog_table, publish_file
from streams.codec import DecodeError
from streams.config import Settings
from streams.contract_state import (
    Batch,
    PartitionRun,
    decode_state,
    due_us,
    encode_state,
)
from streams.domain.billing import ACTIVE, PlainUsage, Rejected
from streams.domain.catalog import Catalog
from streams.domain.events import SubscriptionCreated, UsageRecord
from streams.domain.timestamps import from_micros, to_micros
from streams.fast_codec import usage_event
from streams.kafka import clients
from streams.kafka.topics import (
    CONTROL,
    INVOICES,
    RATING_CHANGELOG,
    SUBSCRIPTIONS,
    USAGE,
    group_id,
)
from streams.metrics import INVOICES_EMITTED
from streams.rating_records import (
    arrival_us,
    decode_bill_run,
    decode_input,
    invoice_writer,
    usage_reader,
)
from streams.runtime.alignment import Alignment
from streams.runtime.deadletter import produce_dead_letter
from streams.runtime.jobs import Job, Jobs
from streams.runtime.loop import StreamLoop, published_ms
from streams.runtime.process import limit_malloc_arenas, transactional_id, tune_gc
from streams.runtime.state import PartitionStates
from streams.runtime.transaction import Offsets, Transactions

log = structlog.get_logger(__name__)
GROUP = "streambill-rating"  # the same group as version 1's: one rater at a time
NAME = "rating"
NEVER = 1 << 62  # µs: after anything that can fall due
FETCH_SIZES = {"max.partition.fetch.bytes": 262_144, "fetch.max.bytes": 1_310_720}


@dataclass(slots=True)
class Pending:
    """A decoded input record waiting for its turn in order of arrival."""

    timestamp: float  # its arrival in s (-inf for undecodable records: dead-lettered at once)
    msg: Any
    event: Any = None
    error: tuple[str, str] | None = None
    account_id: str | None = None  # the record's
    arrival_us: int = 0  # exact (``timestamp`` orders the inputs, in s)
    record: UsageRecord | None = None  # a usage record the fast reader took (event: None)


class ContractRatingProcessor:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        stream: StreamLoop,
        admin: Any,
        restorer: Callable[[], Consumer],
        plans: Any,
        clock: str = "event",
        batch_size: int | None = None,
        close_chunk: int = 2000,
        max_idle: float = 0.5,
        state_cache_entries: int | None = None,
    ) -> None:
        """stream: a consumer in the rating group (``range`` assignment) and a
        transactional producer; admin: for end offsets; restorer: a new consumer to
        restore state from the changelog with; plans: a started TopicTable of
        billing.catalog (plan id -> PlanHistory). ``make_contract_rating`` builds them."""
        self.catalog, self.plans, self.clock = catalog, plans, clock
        self.batch_size = batch_size or settings.rating_transaction_records
        self.usage_batch_size = max(self.batch_size, settings.rating_usage_transaction_records)
        self.close_chunk = close_chunk
        self.subscriptions_topic, self.usage_topic = SUBSCRIPTIONS.name, USAGE.name
        self.control_topic, self.invoices_topic = CONTROL.name, INVOICES.name
        self.invoice_writer, self.usage_reader = invoice_writer(), usage_reader()
        self.stream = stream
        self.consumer, self.producer, self.stop = stream.consumer, stream.producer, stream.stop
        self.transactions = Transactions(self.producer, self.consumer)
        self.alignment = Alignment(
            self.consumer, admin, self.subscriptions_topic, self.usage_topic, max_idle
        )
        self.states = PartitionStates(
            settings.state_dir / "rating", RATING_CHANGELOG.name,
            state_cache_entries or settings.rating_state_cache, restorer,
            decode_state, due_us, encode_state,
        )  # fmt: skip
        self.runs: dict[int, PartitionRun] = {}
        self.jobs = Jobs(self.consumer, self.control_topic, self.alignment)
        self.events: list = []  # the catalog's events in the order they take effect
        self.plans_read: dict[int, int] = {}  # the catalog's positions when events were made
        self.invoices_emitted = 0

    # --- partition lifecycle ---------------------------------------------------------

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.states.assign(sorted({tp.partition for tp in partitions}))
        for p in self.states.stores:
            self.runs.setdefault(p, PartitionRun(p, self.states, self.catalog))
        log.info("assigned", partitions=sorted(self.states.stores))

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = sorted({tp.partition for tp in partitions})
        for p in revoked:
            prun = self.runs.pop(p, None)
            if prun is not None:
                prun.due.end()  # before its store closes
            self.jobs.drop(p)
            self.alignment.revoke(p)
        self.states.revoke(revoked)
        log.info("revoked", partitions=revoked)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        tune_gc(50_000, 20)
        self.stream.subscribe(
            [self.subscriptions_topic, self.usage_topic, self.control_topic],
            on_assign=self.on_assign, on_revoke=self.on_revoke,
        )  # fmt: skip
        try:
            while not self.stop:
                self.turn()
        finally:
            self.close()
        return self.invoices_emitted

    def turn(self) -> None:
        timeout = 0.0 if self.jobs.busy() else 0.1
        msgs = self.stream.poll(self.batch_size, timeout)
        if msgs or self.jobs.running or self.clock == "wall" or self.alignment.waiting:
            started = time.perf_counter()
            msgs = self.transaction(msgs)
            if msgs:
                self.stream.processed(msgs, started)

    def close(self) -> None:
        self.stream.close()
        self.states.close()
        self.plans.close()

    def _refresh_catalog(self) -> None:
        """Every catalog record published before now is read (a publication acknowledged
        before an input record was published is applied before that record)."""
        self.plans.catch_up()
        read = self.plans.positions.copy()
        if read != self.plans_read:
            self.plans_read = read
            histories = list(self.plans.values.values())
            self.events = [(to_micros(at), at, event) for at, event in catalog_events(histories)]

    def transaction(self, msgs: list[Any]) -> list[Any]:
        """One Kafka transaction, from the polled records and, while they are all usage
        that the fast reader takes, from further polls of what is already fetched, up to
        usage_batch_size records touching at most as many subscriptions as the state cache
        holds (usage costs mostly per subscription touched: its state and changelog
        record). Returns every record it consumed."""
        self._refresh_catalog()
        batch = Batch()
        touched_jobs: set[int] = set()
        with self.transactions.open() as positions:
            for prun in self.runs.values():
                prun.begin(batch, self.states)
            subscriptions: set[str] = set()
            plain = self._read(msgs, batch, positions, touched_jobs, subscriptions)
            if plain and not self.jobs.running:
                read, limit = len(msgs), self.usage_batch_size
                while plain and read < limit and len(subscriptions) < self.states.cache_entries:
                    if self.stop:
                        break
                    more = self.stream.poll(min(self.batch_size, limit - read), 0)
                    if not more:
                        break
                    msgs = [*msgs, *more]
                    read += len(more)
                    plain = self._read(more, batch, positions, touched_jobs, subscriptions)
            self.alignment.drain(positions, lambda ready, p: self._apply_ready(ready, batch, p))
            self.alignment.backpressure()
            touched_jobs |= self.jobs.step(
                set(self.states.stores), lambda p, job: self._run_job(batch, p, job)
            )
            if self.clock == "wall":
                now = to_micros(datetime.now(UTC))
                for p in list(self.runs):
                    self._advance(batch, p, now, None)
            for prun in self.runs.values():
                prun.write_clock(batch)
            self.states.produce(self.producer, batch, self.transactions.on_delivery)
            self.jobs.commit_positions(positions, touched_jobs)
        for prun in self.runs.values():
            prun.due.end()
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
        plain = True
        for msg in msgs:
            topic, p = msg.topic(), msg.partition()
            if topic == self.control_topic:
                plain = False
                if p not in self.jobs.running:
                    if self._start_job(msg, batch):
                        touched_jobs.add(p)
                    else:
                        positions[(topic, p)] = msg.offset() + 1
                continue
            kind, published = msg.timestamp()
            published = published if kind else None
            usage = topic == usage_topic
            record = read(msg.value(), published) if usage else None
            if record is not None:  # the fast path: an ordinary usage record
                at = arrival_us(record[1], published)
                pending = Pending(at / 1e6, msg, None, None, record[2], at, record)
                subscriptions.add(record[3])
            else:
                plain = False
                event, account_id, error = decode_input(msg.value(), usage, published, contract=2)
                if event is None:
                    pending = Pending(float("-inf"), msg, None, error)
                else:
                    at = arrival_us(to_micros(event.timestamp), published)
                    pending = Pending(at / 1e6, msg, event, None, account_id, at)
            self.alignment.buffer(p)[topic].append(pending)
        return plain

    def _apply_ready(self, ready: list[Pending], batch: Batch, p: int) -> None:
        """Apply partition p's records in the given order. Plain usage (``PlainUsage``)
        is totalled per subscription and counted before anything else can touch its
        subscription: before the subscription's own next record, and before anything of it
        falls due (what a later record's arrival makes happen)."""
        prun = self.runs[p]
        tallies: dict[str, PlainUsage | None] = {}  # None: not plain (unknown, trialing...)
        due: list[tuple[int, str]] = []  # (next due µs, id) of the subscriptions in tallies
        plain_until = -1  # the latest arrival of a record tallied
        for pending in ready:
            if pending.error:
                self._dead_letter(batch, pending.msg, *pending.error)
                continue
            at, record = pending.arrival_us, pending.record
            if record is not None:
                tally = tallies.get(record[3], False)
                if tally is False:
                    tally, due_at = self._plain(prun, record[3])
                    tallies[record[3]] = tally
                    heapq.heappush(due, (due_at, record[3]))
                if tally is not None and tally.takes(record[1], at, record[2]):
                    tally.records.append(record)
                    plain_until = max(plain_until, at)
                    continue
                pending.event = usage_event(record)
            while due and due[0][0] <= at:  # falls due by this arrival: counted first
                self._settle(tallies, heapq.heappop(due)[1])
            self._settle(tallies, getattr(pending.event, "subscription_id", None))
            prun.reach(batch, self.events, at)
            try:
                self._owner_check(prun, pending)
                prun.run.apply(pending.event, from_micros(at))
            except Rejected as exc:
                self._dead_letter(batch, pending.msg, "rejected", exc.reason)
            self._emit(batch, prun)
        for tally in tallies.values():
            if tally is not None:
                tally.settle()
        if plain_until >= 0:
            prun.reach(batch, self.events, plain_until)
            self._emit(batch, prun)

    @staticmethod
    def _plain(prun: PartitionRun, sub_id: str) -> tuple[PlainUsage | None, int]:
        """A tally of the subscription's plain usage (None if it has none) and when
        something of it falls due next (µs; never, for an unknown one)."""
        sub = prun.subs.get(sub_id)
        if sub is not None and sub.status == ACTIVE:
            tally = PlainUsage(sub)
            return tally, tally.due_us
        nxt = sub.next_due() if sub is not None else None
        return None, to_micros(nxt[0]) if nxt is not None else NEVER

    @staticmethod
    def _settle(tallies: dict[str, PlainUsage | None], sub_id: str | None) -> None:
        """Count the subscription's tallied records, and forget what was known of it
        (settling early is always right; its state may change next)."""
        tally = tallies.pop(sub_id, None) if sub_id is not None else None
        if tally is not None:
            tally.settle()

    @staticmethod
    def _owner_check(prun: PartitionRun, pending: Pending) -> None:
        """A record names its account: an event for another account's subscription is
        refused (one tenant never bills another's)."""
        event = pending.event
        sub_id = getattr(event, "subscription_id", None)
        if sub_id is None or isinstance(event, SubscriptionCreated):
            return
        sub = prun.subs.get(sub_id)
        if sub is not None and pending.account_id and sub.account_id != pending.account_id:
            raise Rejected("the subscription belongs to another account")

    def _emit(self, batch: Batch, prun: PartitionRun) -> None:
        invoices = prun.run.invoices
        if not invoices:
            return
        encode, on_delivery = self.invoice_writer.encode, self.transactions.on_delivery
        for inv in invoices:
            sub = prun.subs.get(inv.subscription_id)
            self.producer.produce(
                self.invoices_topic,
                key=inv.account_id.encode(),
                value=encode(inv, sub.plan.plan_id, sub.payment_method),
                partition=prun.p,
                on_delivery=on_delivery,
            )
        batch.invoices += len(invoices)
        invoices.clear()

    def _dead_letter(self, batch: Batch, msg: Any, reason: str, detail: str) -> None:
        produce_dead_letter(self.producer, msg, reason, detail, NAME,
                            on_delivery=self.transactions.on_delivery)  # fmt: skip
        batch.dead_letters += 1

    # --- bill runs and the clock ----------------------------------------------------------

    def _start_job(self, msg: Any, batch: Batch) -> bool:
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
        self.jobs.start(p, Job(msg.offset(), rec["run_id"], rec["until"], accounts,
                               rec["barrier"]))  # fmt: skip
        return True

    def _run_job(self, batch: Batch, p: int, job: Job) -> tuple[bytes, bool]:
        return b"", self._advance(batch, p, to_micros(job.until), job.accounts)

    def _advance(
        self, batch: Batch, p: int, until_us: int, accounts: frozenset[str] | None
    ) -> bool:
        """Make up to close_chunk due items of partition p happen, up to until; True when
        none is left. A run for some accounts only makes theirs happen and leaves the
        partition's clock (and so the catalog it sees) where it was."""
        prun = self.runs[p]
        until = from_micros(until_us)
        if accounts is None:
            prun.catch_up_catalog(self.events, until_us)
            done = prun.run.advance(until, self.close_chunk)
            if done:
                prun.set_clock(batch, until_us)
        else:
            done = prun.run.advance(until, self.close_chunk,
                                    lambda sub: sub.account_id in accounts)  # fmt: skip
        self._emit(batch, prun)
        return done


def make_contract_rating(
    settings: Settings,
    bootstrap: str,
    catalog: Catalog,
    worker: int = 0,
    admin: Any = None,
    **options: Any,
) -> ContractRatingProcessor:
    """A version-2 rating worker with its Kafka clients. The catalog file's plans that
    billing.catalog does not have yet are published to it first (as version 1, in effect
    since always; never as a new version of a plan it has)."""
    limit_malloc_arenas()
    admin = admin if admin is not None else clients.admin(settings, bootstrap)
    publish_file(settings, bootstrap, catalog, datetime.now(UTC), add_only=True)
    plans = catalog_table(settings, bootstrap, NAME)
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

    return ContractRatingProcessor(settings, catalog, stream, admin, restorer, plans, **options)
