"""The sink: lands Kafka topics into ClickHouse in batches, effectively once.

The warehouse is the source of truth for what has landed: each topic's landing table
records the Kafka partition and offset of every row, and on assignment the sink resumes
each partition right after the highest offset ClickHouse holds (from the beginning for
an empty warehouse), whatever the group's committed offsets say. A batch is inserted
with the offset-bearing table last, so a crash part-way through re-lands at most that
batch, whose rows carry deterministic ids that ReplacingMergeTree collapses. Kafka
offsets are still committed after each insert, for lag monitoring.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import DEAD_LETTER, INVOICES, group_id, spec_for, spec_for_base
from streams.processors.deadletter import produce_dead_letter
from streams.processors.runtime import StopFlag, poll_batch
from streams.warehouse import QueryServer, open_warehouse

log = structlog.get_logger(__name__)
GROUP = "streambill-sink"  # namespaced by group_id()

Rows = dict[str, list[list[Any]]]

COLUMNS: dict[str, list[str]] = {
    "invoices": [
        "invoice_id", "account_id", "subscription_id", "plan_id", "currency", "issued_at",
        "reason", "total", "line_count", "payment_method", "_partition", "_offset",
    ],
    "invoice_lines": [
        "invoice_id", "line_no", "account_id", "subscription_id", "currency", "issued_at",
        "charge_id", "kind", "period_start", "period_end", "quantity", "amount",
    ],
    "dead_letters": [
        "dead_letter_id", "source_topic", "source_partition", "source_offset", "reason", "detail",
        "processor", "failed_at", "key", "value", "_partition", "_offset",
    ],
}  # fmt: skip


def _invoice_rows(rec: dict[str, Any], partition: int, offset: int, rows: Rows) -> None:
    rows["invoices"].append([
        rec["invoice_id"], rec["account_id"], rec["subscription_id"], rec["plan_id"],
        rec["currency"], rec["issued_at"], rec["reason"], rec["total"], len(rec["lines"]),
        rec["payment_method"], partition, offset,
    ])  # fmt: skip
    lines = rows["invoice_lines"]
    for no, line in enumerate(rec["lines"]):
        lines.append([
            rec["invoice_id"], no, rec["account_id"], rec["subscription_id"], rec["currency"],
            rec["issued_at"], line["charge_id"], line["kind"], line["period_start"],
            line["period_end"], line["quantity"], line["amount"],
        ])  # fmt: skip


def _dead_letter_rows(rec: dict[str, Any], partition: int, offset: int, rows: Rows) -> None:
    rows["dead_letters"].append([
        rec["dead_letter_id"], rec["source_topic"], rec["source_partition"], rec["source_offset"],
        rec["reason"], rec["detail"], rec["processor"], rec["failed_at"], rec["key"],
        rec["value"], partition, offset,
    ])  # fmt: skip


# topic -> (the table recording its partition/offset, the row mapper)
LANDERS: dict[str, tuple[str, Callable[[dict[str, Any], int, int, Rows], None]]] = {
    INVOICES.base: ("invoices", _invoice_rows),
    DEAD_LETTER.base: ("dead_letters", _dead_letter_rows),
}
OFFSET_TABLES = {table for table, _ in LANDERS.values()}
# insertion order: dependent rows first, the offset-bearing rows last
TABLE_ORDER = sorted(COLUMNS, key=lambda t: t in OFFSET_TABLES)


class Sink:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        topics: list[str] | None = None,
        max_rows: int = 100_000,
        max_seconds: float = 1.0,
        serve_queries: bool = True,
    ) -> None:
        self.settings = settings
        self.topics = topics or [spec_for_base(b).name for b in LANDERS]
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.client = open_warehouse(settings)
        self.consumer = clients.consumer(
            settings, bootstrap, group_id(GROUP), **{"partition.assignment.strategy": "range"}
        )
        self.producer = clients.producer(settings, bootstrap)  # dead letters only
        self.server = (
            QueryServer(self.client, settings)
            if serve_queries and settings.warehouse_dsn.startswith("chdb://")
            else None
        )
        self.stop = StopFlag()
        self.landed = 0

    def run(self) -> int:
        """Land until stopped (SIGTERM/SIGINT): the batch in hand lands and commits first."""
        if self.server:
            self.server.start()
        self.consumer.subscribe(self.topics, on_assign=self._resume_from_warehouse)
        try:
            while not self.stop:
                batch = self._collect()
                if batch:
                    self._land(batch)
        finally:
            self.consumer.close()  # leaves the group at once: no wait for session time-out
            if self.server:
                self.server.stop()
        return self.landed

    def _resume_from_warehouse(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        landed: dict[tuple[str, int], int] = {}
        for topic in {tp.topic for tp in partitions}:
            table = LANDERS[spec_for(topic).base][0]
            result = self.client.query(
                f"SELECT _partition, max(_offset) FROM {table} GROUP BY _partition"
            )
            for p, offset in result.result_rows:
                landed[(topic, int(p))] = int(offset) + 1
        for tp in partitions:
            tp.offset = landed.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)
        log.info("resuming from the warehouse", positions=len(landed), partitions=len(partitions))

    def _collect(self) -> list[Any]:
        batch: list[Any] = []
        deadline = time.monotonic() + self.max_seconds
        while len(batch) < self.max_rows and not self.stop:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            batch.extend(
                poll_batch(self.consumer, min(10_000, self.max_rows - len(batch)), min(left, 0.2))
            )
        return batch

    def _land(self, batch: list[Any]) -> None:
        rows: Rows = {table: [] for table in COLUMNS}
        offsets: dict[tuple[str, int], int] = {}
        bad = 0
        for msg in batch:
            topic = msg.topic()
            offsets[(topic, msg.partition())] = msg.offset() + 1
            try:
                rec = codec(spec_for(topic).schema).decode(msg.value())
            except DecodeError as exc:
                if topic == DEAD_LETTER.name:  # never loop dead letters back into themselves
                    log.error("undecodable dead letter", offset=msg.offset(), error=str(exc))
                else:
                    produce_dead_letter(self.producer, msg, exc.reason, exc.detail, "sink")
                bad += 1
                continue
            LANDERS[spec_for(topic).base][1](rec, msg.partition(), msg.offset(), rows)
        for table in TABLE_ORDER:
            if rows[table]:
                self.client.insert(table, rows[table], column_names=COLUMNS[table])
        if bad:
            self.producer.flush()
        # ClickHouse has the rows: now the offsets may move
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
        )
        self.landed += len(batch)
        log.info("batch landed", messages=len(batch), dead_letters=bad,
                 rows={t: len(r) for t, r in rows.items() if r})  # fmt: skip
