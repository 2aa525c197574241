"""The sink: lands Kafka topics into ClickHouse in batches, effectively once.

The warehouse is the source of truth for what has landed: after every table of a batch
has its rows, the batch's next offsets go into ``sink_offsets``, and on assignment the
sink resumes each partition there (from the beginning for an empty warehouse), whatever
the group's committed offsets say. A crash part-way through a batch re-lands at most
that batch; every landing table's key ends with the row's deterministic id or Kafka
coordinates, so ReplacingMergeTree collapses the re-landed rows into one. Kafka offsets
are still committed after each batch, for lag monitoring.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection
from decimal import Decimal, localcontext
from operator import itemgetter
from typing import Any

import orjson
import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from streams.catalog_history import SINCE_ALWAYS, PlanHistory, file_histories
from streams.catalog_store import history_of, read_histories
from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.domain.catalog import Catalog, Interval, plan_to_dict
from streams.kafka.topics import (
    ALERTS,
    CATALOG,
    CUSTOMERS,
    DEAD_LETTER,
    ENTITLEMENTS,
    INVOICES,
    PAYMENT_RESULTS,
    REFUND_RESULTS,
    SUBSCRIPTIONS,
    USAGE,
    TopicSpec,
    spec_for,
    spec_for_base,
)
from streams.metrics import (
    COMMIT_FAILURES,
    WAREHOUSE_RETRIES,
)
from streams.runtime.deadletter import produce_dead_letter
from streams.runtime.loop import StreamLoop
from streams.warehouse import WAREHOUSE_DOWN, QueryServer, open_warehouse
from streams.warehouse_bulk import BULK_TABLES, BulkLander

log = structlog.get_logger(__name__)
GROUP = "streambill-sink"  # namespaced by group_id()

Rows = dict[str, list[list[Any]]]
Mapper = Callable[[dict[str, Any], int, int, Rows], None]
ZERO = Decimal(0)
NANO = Decimal("1e-9")

COORDINATES = ["_partition", "_offset"]
COLUMNS: dict[str, list[str]] = {
    "invoices": [
        "invoice_id", "account_id", "subscription_id", "plan_id", "currency", "issued_at",
        "reason", "total", "recurring_total", "usage_total", "line_count", "payment_method",
        "finalized_at", "credit_applied", "amount_due", *COORDINATES,
    ],
    "invoice_lines": [
        "invoice_id", "line_no", "account_id", "subscription_id", "currency", "issued_at",
        "charge_id", "kind", "period_start", "period_end", "quantity", "amount",
    ],
    "subscription_events": [
        "event_id", "type", "timestamp", "account_id", "subscription_id", "plan_id", "mode",
        "payment_method", *COORDINATES,
    ],
    "usage_events": [
        "event_id", "timestamp", "account_id", "subscription_id", "metric", "quantity",
        *COORDINATES,
    ],
    "payment_attempts": [
        "payment_id", "invoice_id", "account_id", "attempt", "status", "amount", "currency",
        "gateway_account", "gateway_reference", "payment_method", "decline_code", "latency_ms",
        "completed_at", *COORDINATES,
    ],
    "customers": [
        "account_id", "timestamp", "name", "email", "address", "country", "tax_exempt",
        "grace_hours", "payment_method", *COORDINATES,
    ],
    "refunds": [
        "refund_id", "invoice_id", "account_id", "status", "amount", "currency", "reason",
        "gateway_reference", "refund_reason", "requested_at", "completed_at", *COORDINATES,
    ],
    "entitlements": [
        "entitlement_id", "account_id", "subscription_id", "action", "cause", "timestamp",
        *COORDINATES,
    ],
    "dead_letters": [
        "dead_letter_id", "source_topic", "source_partition", "source_offset", "reason", "detail",
        "processor", "failed_at", "key", "value", *COORDINATES,
    ],
    "alerts": [
        "alert_id", "rule", "state", "severity", "value", "threshold", "summary", "at",
        *COORDINATES,
    ],
    "plans": [
        "plan_id", "version", "published_at", "existing", "currency", "interval", "trial_days",
        "flat_amount", "mrr", "charges", "plan", "retired_at", "updated_at", *COORDINATES,
    ],
}  # fmt: skip
RECURRING_KINDS = frozenset({"flat", "proration_credit", "proration_charge"})
# What the landing tables' numeric columns hold (deploy/clickhouse): Decimal(38, 9) is a
# 128-bit integer of nano-units, UInt16 and UInt64 are unsigned. A record that decodes but
# carries a value beyond them (an enormous quantity, a negative attempt) would make the
# insert fail, and the sink stop on every restart: it is a dead letter instead.
_DECIMAL_MAX = Decimal(2**127 - 1).scaleb(-9)
_FITS = {
    "decimal": lambda v: v is None or -_DECIMAL_MAX <= v <= _DECIMAL_MAX,
    "UInt16": lambda v: 0 <= v <= 0xFFFF,
    "UInt32": lambda v: 0 <= v < 2**32,
    "UInt64": lambda v: 0 <= v < 2**64,
}
COLUMN_TYPES: dict[str, dict[str, str]] = {
    "invoices": {"total": "decimal", "recurring_total": "decimal", "usage_total": "decimal",
                 "line_count": "UInt16", "credit_applied": "decimal", "amount_due": "decimal"},
    "invoice_lines": {"line_no": "UInt16", "quantity": "decimal", "amount": "decimal"},
    "usage_events": {"quantity": "decimal"},
    "payment_attempts": {"attempt": "UInt16", "amount": "decimal"},
    "refunds": {"amount": "decimal"},
    "dead_letters": {"source_partition": "UInt16", "source_offset": "UInt64"},
    "alerts": {"value": "decimal", "threshold": "decimal"},
    "plans": {"version": "UInt32", "trial_days": "UInt32", "flat_amount": "decimal",
              "mrr": "decimal"},
}  # fmt: skip
_CHECKS = {
    table: [(COLUMNS[table].index(c), c, kind, _FITS[kind]) for c, kind in types.items()]
    for table, types in COLUMN_TYPES.items()
}


def out_of_range(table: str, row: list[Any]) -> str | None:
    """Why a mapped row cannot be inserted into `table`, if it cannot."""
    for i, column, kind, fits in _CHECKS.get(table, ()):
        if not fits(row[i]):
            shown = "Decimal(38, 9)" if kind == "decimal" else kind
            return f"{table}.{column}: {row[i]} does not fit {shown}"
    return None


def _invoice_rows(rec: dict[str, Any], partition: int, offset: int, rows: Rows) -> None:
    invoice_id, account, sub = rec["invoice_id"], rec["account_id"], rec["subscription_id"]
    currency, issued_at = rec["currency"], rec["issued_at"]
    recurring = usage = ZERO
    lines = rows["invoice_lines"]
    for no, line in enumerate(rec["lines"]):
        amount = line["amount"]
        if line["kind"] in RECURRING_KINDS:
            recurring += amount
        else:
            usage += amount
        lines.append([
            invoice_id, no, account, sub, currency, issued_at, line["charge_id"], line["kind"],
            line["period_start"], line["period_end"], line["quantity"], amount,
        ])  # fmt: skip
    # null in records written before these fields existed: what those records meant
    total, finalized, credit, due = (rec["total"], rec.get("finalized_at"),
                                     rec.get("credit_applied"), rec.get("amount_due"))  # fmt: skip
    rows["invoices"].append([
        invoice_id, account, sub, rec["plan_id"], currency, issued_at, rec["reason"],
        total, recurring, usage, len(rec["lines"]), rec["payment_method"],
        issued_at if finalized is None else finalized, ZERO if credit is None else credit,
        max(total, ZERO) if due is None else due, partition, offset,
    ])  # fmt: skip


def _plain(table: str) -> Mapper:
    """Rows whose columns are the record's fields of the same names, then coordinates."""
    fields = itemgetter(*[c for c in COLUMNS[table] if c not in COORDINATES])

    def mapper(rec: dict[str, Any], partition: int, offset: int, rows: Rows) -> None:
        rows[table].append([*fields(rec), partition, offset])

    return mapper


def _dead_letter_rows(rec: dict[str, Any], partition: int, offset: int, rows: Rows) -> None:
    # key and value: the original bytes, unaltered (ClickHouse strings are bytes)
    rows["dead_letters"].append([
        rec["dead_letter_id"], rec["source_topic"], rec["source_partition"], rec["source_offset"],
        rec["reason"], rec["detail"], rec["processor"], rec["failed_at"], rec["key"],
        rec["value"], partition, offset,
    ])  # fmt: skip


def plan_rows(history: PlanHistory, partition: int | None, offset: int | None) -> list[list[Any]]:
    """A plan's history as rows of ``plans``, one per version, each carrying the history's
    retirement and its last change (``updated_at``: the rows of a later record win)."""
    updated = max(history.versions[-1].published_at, history.retired_at or SINCE_ALWAYS)
    rows = []
    for v in history.versions:
        plan = v.plan
        with localcontext(prec=80):  # exact for any amounts a plan holds
            flat = sum((c.amount for c in plan.flat_charges), ZERO)
            mrr = flat if plan.interval == Interval.MONTH else (flat / 12).quantize(NANO)
        as_dict = plan_to_dict(plan)
        rows.append([
            history.plan_id, plan.version, v.published_at, v.existing, plan.currency,
            plan.interval.value, plan.trial_days, flat, mrr,
            orjson.dumps(as_dict["charges"]).decode(),
            orjson.dumps(as_dict, option=orjson.OPT_SORT_KEYS).decode(), history.retired_at,
            updated, partition, offset,
        ])  # fmt: skip
    return rows


def _catalog_rows(rec: dict[str, Any], partition: int, offset: int, rows: Rows) -> None:
    # a history the contract refuses: DecodeError, a dead letter
    rows["plans"].extend(plan_rows(history_of(rec), partition, offset))


# topic base name -> row mapper: one row per record in the topic's main table
LANDERS: dict[str, Mapper] = {
    SUBSCRIPTIONS.base: _plain("subscription_events"),
    USAGE.base: _plain("usage_events"),
    INVOICES.base: _invoice_rows,
    PAYMENT_RESULTS.base: _plain("payment_attempts"),
    REFUND_RESULTS.base: _plain("refunds"),
    ENTITLEMENTS.base: _plain("entitlements"),
    DEAD_LETTER.base: _dead_letter_rows,
    ALERTS.base: _plain("alerts"),
    CUSTOMERS.base: _plain("customers"),
}
# topic base name -> row mapper of a topic whose record is a whole history: billing.catalog,
# a plan's every version (a row each in ``plans``), checked against the rating contract
# (a history it refuses is a dead letter, invalid_event)
HISTORY_LANDERS: dict[str, Mapper] = {CATALOG.base: _catalog_rows}
MAPPERS: dict[str, Mapper] = {**LANDERS, **HISTORY_LANDERS}  # every landed topic


def load_catalog(client: Any, catalog: Catalog, skip: Collection[str] = ()) -> int:
    """The catalog file's plans, but those in `skip` (billing.catalog's), into ``plans``
    as their version 1, in effect since always (what the rating processor prices with);
    the rows of a billing.catalog record of the plan landed later replace them. Returns
    the plans written."""
    histories = file_histories(catalog)
    rows = [row for pid, history in sorted(histories.items()) if pid not in skip
            for row in plan_rows(history, None, None)]  # fmt: skip
    if rows:
        client.insert("plans", rows, column_names=COLUMNS["plans"])
    return len(rows)


class Sink:
    def __init__(
        self,
        settings: Settings,
        client: Any,
        stream: StreamLoop,
        topics: list[str] | None = None,
        max_rows: int = 100_000,
        max_seconds: float = 1.0,
        serve_queries: bool = True,
        min_seconds: float = 0.25,
        catalog: tuple[Catalog, dict[str, Any]] | None = None,
        catalog_plans: Collection[str] = (),
    ) -> None:
        """client: the warehouse (migrated); stream: the consumer in the sink's group and a
        producer for dead letters (``make_sink`` builds them); topics: base names
        (default: every landed topic); catalog: the catalog file, parsed and raw: its plans
        but those billing.catalog has (`catalog_plans`) go into ``plans`` now."""
        self.settings = settings
        unknown = set(topics or ()) - set(MAPPERS)
        if unknown:
            raise ValueError(f"no landing table for {sorted(unknown)}; known: {sorted(MAPPERS)}")
        self.topics = [spec_for_base(b).name for b in (topics or MAPPERS)]
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.min_seconds = min(min_seconds, max_seconds)
        self.client = client
        embedded = settings.warehouse_dsn.startswith("chdb://")
        self.bulk = (
            BulkLander(self.client, settings.state_dir / "sink", COLUMNS) if embedded else None
        )
        if catalog is not None:
            load_catalog(self.client, catalog[0], catalog_plans)
        self.stream = stream
        self.consumer = stream.consumer
        self.producer = stream.producer
        self.stop = stream.stop
        self.server = QueryServer(self.client, settings) if serve_queries and embedded else None
        self.landed = 0

    def run(self) -> int:
        """Land until stopped (SIGTERM/SIGINT): the batch in hand lands and commits first."""
        if self.server:
            self.server.start()
        # (a partition revoked during a warehouse outage is resumed by the stream)
        self.stream.subscribe(self.topics, on_assign=self._resume_from_warehouse)
        try:
            while not self.stop:
                batch = self._collect()
                if batch:
                    started = time.perf_counter()
                    self._land_when_warehouse_answers(batch)
                    self.stream.processed(batch, started)
        finally:
            self.stream.close()
            if self.server:
                self.server.stop()
        return self.landed

    def _land_when_warehouse_answers(self, batch: list[Any]) -> None:
        """Land the batch, waiting out a warehouse outage: nothing is committed meanwhile,
        and the consumer stays in its group (paused, still polling)."""
        delay = 0.5
        while True:
            try:
                self._land(batch)
                return
            except WAREHOUSE_DOWN as exc:
                if self.stop:
                    raise  # nothing committed: the batch is read again after a restart
                WAREHOUSE_RETRIES.labels("sink").inc()
                log.warning("warehouse unavailable, the batch waits", messages=len(batch),
                            retry_in_s=delay, error=str(exc)[:300])  # fmt: skip
                self._idle(delay)
                delay = min(delay * 2, 10.0)

    def _idle(self, seconds: float) -> None:
        assigned = self.consumer.assignment()
        self.consumer.pause(assigned)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop:
            msg = self.consumer.poll(0.1)  # for group membership and rebalances
            if msg is not None and not msg.error():  # a partition assigned meanwhile
                tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
                self.consumer.pause([tp])
                self.consumer.seek(tp)  # read again once the warehouse is back
        self.consumer.resume(self.consumer.assignment())

    def _resume_from_warehouse(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        try:
            result = self.client.query(
                "SELECT topic, partition, max(next_offset) FROM sink_offsets "
                "GROUP BY topic, partition"
            )
        except WAREHOUSE_DOWN as exc:
            # the group's committed offsets never pass what has landed: resume there
            log.warning("warehouse unavailable on assignment, resuming from the group's "
                        "committed offsets", error=str(exc)[:300])  # fmt: skip
            consumer.assign(partitions)
            return
        landed = {(topic, int(p)): int(o) for topic, p, o in result.result_rows}
        for tp in partitions:
            tp.offset = landed.get((spec_for(tp.topic).base, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)
        log.info("resuming from the warehouse", partitions=len(partitions),
                 resumed=sum(tp.offset >= 0 for tp in partitions))  # fmt: skip

    def _collect(self) -> list[Any]:
        """A batch: up to max_rows messages or max_seconds; once caught up (a poll comes
        back short), no longer than min_seconds after its first message, so that a
        trickle still lands in batches worth an insert."""
        batch: list[Any] = []
        deadline = time.monotonic() + self.max_seconds
        first = 0.0
        while len(batch) < self.max_rows and not self.stop:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            asked = min(10_000, self.max_rows - len(batch))
            got = self.stream.poll(asked, min(left, 0.1))
            if got and not batch:
                first = time.monotonic()
            batch.extend(got)
            if batch and len(got) < asked and time.monotonic() - first >= self.min_seconds:
                break
        return batch

    def _land(self, batch: list[Any]) -> None:
        rows: Rows = {table: [] for table in COLUMNS}
        offsets: dict[tuple[str, int], int] = {}
        by_topic: dict[str, list[Any]] = {}
        for msg in batch:
            by_topic.setdefault(msg.topic(), []).append(msg)
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
        bad = bulk = 0
        landed: Counter[str] = Counter()  # table -> rows
        for topic, msgs in by_topic.items():
            spec = spec_for(topic)
            if self.bulk and spec.schema in BULK_TABLES:
                fast, msgs = self.bulk.split(spec.schema, msgs)
                if fast:
                    try:
                        self.bulk.land(spec.schema, fast)
                        bulk += len(fast)
                        # one row per record (an invoice's lines come through a view)
                        landed[BULK_TABLES[spec.schema].removesuffix("_avro")] += len(fast)
                    except WAREHOUSE_DOWN:
                        raise
                    except Exception as exc:  # a record ClickHouse will not read: Python's turn
                        log.warning("bulk landing refused, decoding in Python", topic=topic,
                                    messages=len(fast), error=str(exc)[:300])  # fmt: skip
                        msgs = fast + msgs
            bad += self._map_in_python(spec, msgs, rows)
        for table, table_rows in rows.items():
            if table_rows:
                self.client.insert(table, table_rows, column_names=COLUMNS[table])
        if bad:
            self.producer.flush()  # the dead letters are durable before the offsets move
        # every table has the batch: record it as landed, then commit the group's offsets
        self.client.insert(
            "sink_offsets",
            [[spec_for(t).base, p, o] for (t, p), o in offsets.items()],
            column_names=["topic", "partition", "next_offset"],
        )
        try:  # for lag monitoring only: the warehouse's sink_offsets decide where to resume
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            if exc.args[0].fatal():
                raise
            COMMIT_FAILURES.labels("sink").inc()
            log.warning("offset commit refused (the batch has landed)", error=str(exc))
        self.landed += len(batch)
        landed.update({t: len(r) for t, r in rows.items() if r})
        log.info("batch landed", messages=len(batch), in_bulk=bulk, dead_letters=bad,
                 rows=dict(landed))  # fmt: skip

    def _map_in_python(self, spec: TopicSpec, msgs: list[Any], rows: Rows) -> int:
        """Decode and map into `rows`; dead-letter what does not decode or does not fit the
        tables (out_of_range). Returns how many were not mapped."""
        bad = 0
        decode, mapper = codec(spec.schema).decode, MAPPERS[spec.base]
        checked = [(table, rows[table]) for table in _CHECKS]
        for msg in msgs:
            try:
                rec = decode(msg.value())
                before = [len(table_rows) for _, table_rows in checked]
                mapper(rec, msg.partition(), msg.offset(), rows)
                for (table, table_rows), n in zip(checked, before, strict=True):
                    for row in table_rows[n:]:
                        problem = out_of_range(table, row)
                        if problem:
                            for (_, undo), m in zip(checked, before, strict=True):
                                del undo[m:]  # none of its rows: all of them, or a dead letter
                            raise DecodeError("out_of_range", problem)
            except DecodeError as exc:
                if spec is DEAD_LETTER:  # never loop dead letters back into themselves
                    log.error("unlandable dead letter", offset=msg.offset(), error=str(exc))
                else:
                    produce_dead_letter(self.producer, msg, exc.reason, exc.detail, "sink")
                bad += 1
        return bad


def make_sink(settings: Settings, bootstrap: str, client: Any = None, **options: Any) -> Sink:
    """A sink with its clients built from the settings (the CLI's); `client`: a
    warehouse client of the caller's instead of ``open_warehouse(settings)``. With a
    `catalog` option, billing.catalog is read first: the file's plans it has are landed
    from it, not from the file."""
    if options.get("catalog") is not None and "catalog_plans" not in options:
        options["catalog_plans"] = set(read_histories(settings, bootstrap))
    stream = StreamLoop.from_settings("sink", settings, bootstrap, GROUP, consumer_config={
        "partition.assignment.strategy": "range",
        # keep fetching while a batch lands: up to about one more batch ahead
        "queued.max.messages.kbytes": 65_536,
        # a trickle of records must not make every fetch (of every partition of every
        # topic) return at once: the broker waits for 64 KiB or 200 ms
        "fetch.min.bytes": 65_536,
        "fetch.wait.max.ms": 200,
    })  # fmt: skip
    return Sink(settings, open_warehouse(settings) if client is None else client, stream,
                **options)  # fmt: skip
