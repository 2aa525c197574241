"""Duplicate checks that can fail, shared by the chaos suite, the benchmarks, the demo
and the integration tests.

On Kafka: every record of a topic read as downstream consumers read it (read_committed,
from the beginning to the high watermarks taken at the start), counted per id. A record
produced twice is two records: a set of ids would hide it.

In ClickHouse: ReplacingMergeTree collapses the copies of an id, so ``FINAL`` always
shows one row per sorting key and ``count() = uniqExact(id)`` cannot fail. The check looks
at the raw copies instead (without ``FINAL``): an id whose copies carry two different
contents is a duplicate that disagrees, whichever copy a merge keeps. The same content
landed twice (a batch re-landed after a crash) is what the engine is for, and passes.
Copies collapsed at insert (``optimize_on_insert``: two rows of one key in one insert)
or by a merge leave one row, so the check also compares each landed id's money column
with what was expected of it, when the caller knows, and always the ``FINAL`` count
with the expected count.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import TopicSpec, group_id
from streams.publish import partition_count
from streams.warehouse import query

# --- Kafka ------------------------------------------------------------------------------


def committed_values(
    settings: Settings, bootstrap: str, topic: TopicSpec, timeout: float = 60.0
) -> Iterator[bytes | None]:
    """The value of every committed record of `topic`, from the beginning to the high
    watermarks of when it was called. An open transaction below them is waited for
    (its records count once it commits; nothing of it, once it aborts), for at most
    `timeout` seconds without a record."""
    consumer = clients.consumer(
        settings, bootstrap, group_id(f"streambill-check-{uuid.uuid4().hex}"),
        **{"enable.partition.eof": True},
    )  # fmt: skip
    try:
        n = clients.retrying(lambda: partition_count(consumer, topic.name))
        ends = {
            p: clients.retrying(
                lambda p=p: consumer.get_watermark_offsets(
                    TopicPartition(topic.name, p), timeout=30
                )
            )[1]
            for p in range(n)
        }
        open_parts = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic.name, p, 0) for p in open_parts])
        deadline = time.monotonic() + timeout
        while open_parts:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{topic.name}: partitions {sorted(open_parts)} not read to their high "
                    f"watermarks, nothing new for {timeout:.0f} s"
                )
            batch = consumer.consume(10_000, timeout=0.5)
            if batch:
                deadline = time.monotonic() + timeout
            for msg in batch:
                p = msg.partition()
                if msg.error():
                    # the end for read_committed (the last stable offset); past the high
                    # watermark only once every transaction below it has ended
                    if msg.error().code() == KafkaError._PARTITION_EOF and msg.offset() >= ends[p]:
                        open_parts.discard(p)
                    continue
                if msg.offset() < ends[p]:
                    yield msg.value()
                if msg.offset() + 1 >= ends[p]:
                    open_parts.discard(p)
    finally:
        consumer.close()


@dataclass(frozen=True)
class TopicCopies:
    """The records of one topic per id, against the ids expected on it (if known)."""

    topic: str
    copies: Counter[str]  # id -> committed records carrying it
    expected: frozenset[str] | None = None
    undecodable: int = 0

    @property
    def records(self) -> int:
        return self.copies.total() + self.undecodable

    @property
    def repeated(self) -> dict[str, int]:
        """Ids on more than one record, with how many."""
        return {i: n for i, n in self.copies.items() if n > 1}

    @property
    def extra_copies(self) -> int:
        """Records beyond the first of their id."""
        return self.copies.total() - len(self.copies)

    @property
    def missing(self) -> set[str]:
        return set() if self.expected is None else set(self.expected - self.copies.keys())

    @property
    def unexpected(self) -> set[str]:
        return set() if self.expected is None else set(self.copies.keys() - self.expected)

    @property
    def ok(self) -> bool:
        return not (self.repeated or self.missing or self.unexpected or self.undecodable)

    def summary(self) -> str:
        if self.ok:
            return f"{self.topic}: {len(self.copies):,} ids, each on one record"
        return (
            f"{self.topic}: {len(self.repeated):,} ids on several records "
            f"({self.extra_copies:,} extra, e.g. {_first(self.repeated)}), "
            f"{len(self.missing):,} missing (e.g. {_first(self.missing)}), "
            f"{len(self.unexpected):,} unexpected (e.g. {_first(self.unexpected)}), "
            f"{self.undecodable:,} undecodable"
        )


def topic_copies(
    settings: Settings,
    bootstrap: str,
    topic: TopicSpec,
    id_field: str,
    expected: Collection[str] | None = None,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 60.0,
) -> TopicCopies:
    """Count the committed records of `topic` per `id_field` (those `keep` accepts, if
    given). With `expected`, ids not on the topic and ids not expected are reported too."""
    topic_codec = codec(topic.schema or "")
    fields = topic_codec.schema["fields"]
    leading = next((k for k, f in enumerate(fields) if f["type"] != "string"), len(fields))
    position = next(k for k, f in enumerate(fields) if f["name"] == id_field)
    fast = keep is None and position < leading  # read the id alone, not the whole record
    copies: Counter[str] = Counter()
    undecodable = 0
    for value in committed_values(settings, bootstrap, topic, timeout):
        ids = topic_codec.leading_strings(value, position + 1) if fast else None
        if ids is not None:
            copies[ids[position]] += 1
            continue
        try:
            record = topic_codec.decode(value)
        except DecodeError:
            undecodable += 1
            continue
        if keep is None or keep(record):
            copies[record[id_field]] += 1
    return TopicCopies(
        topic.name, copies, None if expected is None else frozenset(expected), undecodable
    )


# --- ClickHouse -------------------------------------------------------------------------


@dataclass(frozen=True)
class Landing:
    """A landing table's id, the columns its copies must agree on (what the record
    says; not the sink's bookkeeping: landing time, and for records a replay may publish
    again, times and latencies), and the money column compared with what was expected."""

    id_sql: str
    content: tuple[str, ...]
    amount: str | None = None


LANDINGS = {
    "invoices": Landing("invoice_id", ("account_id", "subscription_id", "plan_id", "currency",
                        "issued_at", "reason", "total", "recurring_total", "usage_total",
                        "line_count", "payment_method"), "total"),
    "invoice_lines": Landing("(invoice_id, line_no)", ("account_id", "subscription_id",
                             "currency", "issued_at", "charge_id", "kind", "period_start",
                             "period_end", "quantity", "amount"), "amount"),
    # a replayed attempt may publish its result again, later and with another latency
    "payment_attempts": Landing("payment_id", ("invoice_id", "account_id", "attempt", "status",
                                "amount", "currency"), "amount"),
    "refunds": Landing("refund_id", ("invoice_id", "account_id", "status", "amount",
                       "currency"), "amount"),
    "entitlements": Landing("entitlement_id", ("account_id", "subscription_id", "action",
                            "cause")),
    "dead_letters": Landing("dead_letter_id", ("source_topic", "source_partition",
                            "source_offset", "reason", "processor")),
    # raw events are one row per Kafka record
    "subscription_events": Landing("(_partition, _offset)", ("event_id", "type", "timestamp",
                                   "account_id", "subscription_id", "plan_id", "mode",
                                   "payment_method")),
    "usage_events": Landing("(_partition, _offset)", ("event_id", "timestamp", "account_id",
                            "subscription_id", "metric", "quantity")),
}  # fmt: skip

EXAMPLES = 20  # ids listed per finding


@dataclass(frozen=True)
class WarehouseCopies:
    """One landing table against what should have landed in it."""

    table: str
    final_rows: int  # rows under FINAL (one per sorting key)
    expected_rows: int
    raw_rows: int  # copies, before the engine collapses them
    conflicting: int  # ids whose raw copies carry more than one content
    conflicting_examples: dict[str, int] = field(default_factory=dict)  # id -> contents
    wrong_amounts: dict[str, tuple[Decimal | None, Decimal | None]] = field(
        default_factory=dict
    )  # id -> (landed, expected), for ids landed or expected with another amount

    @property
    def ok(self) -> bool:
        return (
            not self.conflicting
            and not self.wrong_amounts
            and self.final_rows == self.expected_rows
        )

    def summary(self) -> str:
        head = (
            f"{self.table}: {self.final_rows:,} rows (expected {self.expected_rows:,}; "
            f"{self.raw_rows:,} raw copies)"
        )
        if self.ok:
            return head + ", no id with two contents"
        return (
            f"{head}, {self.conflicting:,} ids with two or more contents "
            f"(e.g. {_first(self.conflicting_examples)}), {len(self.wrong_amounts):,} ids "
            f"with another amount than expected (e.g. {_first(self.wrong_amounts)})"
        )


def warehouse_copies(
    settings: Settings,
    table: str,
    expected: int | Mapping[str, Decimal],
    where: str = "1",
    open_here: bool = True,
) -> WarehouseCopies:
    """Check one landing table (rows matching `where`): no id with two contents among
    its raw copies, the FINAL count equal to the expected count, and, when `expected`
    maps ids to amounts, every id landed with its amount (nothing more, nothing less)."""
    landing = LANDINGS[table]

    def rows(sql: str) -> list[list[Any]]:
        return query(settings, sql, timeout=120, open_here=open_here)["rows"]

    raw_rows, conflicting, examples = rows(
        f"SELECT (SELECT count() FROM {table} WHERE {where}), count(), "
        f"groupArray({EXAMPLES})((id, contents)) FROM ("
        f"SELECT toString({landing.id_sql}) AS id, "
        f"uniqExact(tuple({', '.join(landing.content)})) AS contents "
        f"FROM {table} WHERE {where} GROUP BY id HAVING contents > 1)"
    )[0]
    final_rows = int(rows(f"SELECT count() FROM {table} FINAL WHERE {where}")[0][0])
    wrong: dict[str, tuple[Decimal | None, Decimal | None]] = {}
    if isinstance(expected, Mapping):
        if landing.amount is None:
            raise ValueError(f"{table} has no amount to compare")
        landed = {
            i: Decimal(a)
            for i, a in rows(
                f"SELECT toString({landing.id_sql}), toString({landing.amount}) "
                f"FROM {table} FINAL WHERE {where}"
            )
        }
        for i in landed.keys() | expected.keys():
            if landed.get(i) != expected.get(i):
                wrong[i] = (landed.get(i), expected.get(i))
    return WarehouseCopies(
        table=table,
        final_rows=final_rows,
        expected_rows=len(expected) if isinstance(expected, Mapping) else expected,
        raw_rows=int(raw_rows),
        conflicting=int(conflicting),
        conflicting_examples={str(i): int(n) for i, n in examples},
        wrong_amounts=wrong,
    )


def _first(items: Collection[Any]) -> str:
    shown = list(items)[:3]
    if isinstance(items, Mapping):
        return ", ".join(f"{k}: {items[k]}" for k in shown) or "-"
    return ", ".join(map(str, shown)) or "-"
