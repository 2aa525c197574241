"""`streambill replay`: the rating contract's events through the real pipeline.

The same input as `streambill rate` (catalog JSON, events JSONL, --until) is published to
the input topics of a fresh namespace, each record stamped with its event's arrival
instant; the rating processor rates it with the event clock and a bill run to `until`;
the sink lands the invoices in a fresh embedded warehouse; the invoices are read back
from there and written in `rate`'s output format and order. So any set of contract cases
can be run through Kafka, RocksDB and ClickHouse and compared with `rate`, line for line.

Every event `rate` dead-letters is dead-lettered by the processor too: a line that is
not a valid event is published as its raw bytes (the processor cannot decode it), a
valid one that the subscription's state refuses is published as a record (the processor
rejects it).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, TopicPartition
from rich.console import Console

from streams.catalog_history import file_histories, publish, retire, to_record
from streams.codec import codec
from streams.config import Settings
from streams.domain.catalog import Catalog, CatalogError
from streams.domain.events import (
    InvalidEvent,
    PlanPublished,
    PlanRetired,
    SubscriptionCreated,
    Usage,
    parse_event,
    parse_v1_event,
)
from streams.domain.invoice import Invoice, InvoiceLine
from streams.domain.money import round_money
from streams.domain.timestamps import (
    InvalidTimestamp,
    from_micros,
    parse_timestamp,
    require_utc,
    to_micros,
)
from streams.domain.validation import MAX_FUTURE, MAX_FUTURE_TEXT
from streams.invoice_record import period_read
from streams.kafka import clients
from streams.kafka.topics import (
    CATALOG,
    DEAD_LETTER,
    INVOICES,
    SUBSCRIPTIONS,
    USAGE,
    TopicSpec,
    group_id,
)
from streams.offline import load_catalog
from streams.publish import bill_run_done, issue_bill_run, partition_count, produce_values
from streams.rating_records import input_record
from streams.stack import (
    ProcessExited,
    ProcessorProcess,
    isolated_namespace,
    wait_for_warehouse_endpoint,
    wait_while_running,
)
from streams.ui import progress_bar
from streams.warehouse import query

# A replay is a test bed: few partitions are quick to create, and the invoices do not
# depend on their number (every event of an account goes to the account's partition).
PARTITIONS = 4
# the embedded warehouse whatever CLICKHOUSE_DSN says: a replay starts from nothing
EMBEDDED_WAREHOUSE = {"CLICKHOUSE_DSN": ""}

# (topic, key, value, record timestamp in epoch ms; None: unknown, the producer's clock)
InputRecord = tuple[TopicSpec, bytes, bytes, int | None]


class ReplayError(RuntimeError):
    """The pipeline did not produce a complete, consistent result."""


@dataclass
class ReplayInput:
    records: list[InputRecord]
    # lines published as their raw bytes: not valid events, or not expressible in the
    # topic's schema (a quantity with more than 9 decimals)
    raw: int
    deferred: int  # events arriving after `until`: not published, as `rate` does not rate them
    # contract v2: billing.catalog's records (the plans' histories: the catalog file's and
    # the plan events'), and the plan events the catalog refused, as the API would
    catalog: list[InputRecord] = field(default_factory=list)
    catalog_refused: int = 0


@dataclass
class ReplayResult:
    invoices: list[Invoice]  # as landed, sorted by (issued_at, invoice_id)
    published: int
    raw: int
    deferred: int
    # the rating processor's dead letters by reason (what `rate` dead-letters), and the
    # sink's (it lands the records it cannot decode, the raw lines, as dead letters too)
    dead_letters: Counter[str] = field(default_factory=Counter)
    sink_dead_letters: int = 0
    seconds: float = 0.0
    catalog_refused: int = 0  # plan events refused before publication (contract v2)


def arrival(raw: dict[str, Any], event: Any) -> datetime:
    """When an event arrives (the rating contract's Time): a usage event's `received_at`
    if it has a valid one, else its timestamp."""
    if isinstance(event, Usage) and isinstance(raw.get("received_at"), str):
        with suppress(InvalidTimestamp):
            return parse_timestamp(raw["received_at"])
    return event.timestamp


def input_records(
    lines: Iterable[str], until: datetime, catalog: Catalog | None = None, contract: int = 1
) -> ReplayInput:
    """The input topics' records for the contract's JSONL events, in order of arrival
    (ties in input order), as upstream systems would have published them. Each record is
    keyed by the account that created its subscription, so that all of a subscription's
    events are on one partition (an unknown subscription's key is its own id); an account
    event by its account. With contract 2 the plan events go into billing.catalog's
    records instead (the catalog file's plans as version 1 of each), as the catalog API
    would have published them: one refused there is counted, not published."""
    until = require_utc(until)
    parse = parse_event if contract == 2 else parse_v1_event
    parsed: list[tuple[datetime, int, dict[str, Any], Any]] = []
    raw_lines: list[tuple[str, int, str]] = []  # (type, line number, text)
    raw_text: dict[int, str] = {}  # line number -> text of the valid events
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        raw = None
        try:
            raw = orjson.loads(text)
            event = parse(raw)
        except (orjson.JSONDecodeError, InvalidEvent):
            kind = raw.get("type") if isinstance(raw, dict) else None
            raw_lines.append((kind if isinstance(kind, str) else "", n, text))
            continue
        parsed.append((arrival(raw, event), n, raw, event))
        raw_text[n] = text

    owners: dict[str, str] = {}
    for _, _, _, event in parsed:
        if isinstance(event, SubscriptionCreated):
            owners.setdefault(event.subscription_id, event.account_id)
    parsed.sort(key=lambda p: p[0])  # stable: ties keep their input order

    records: list[InputRecord] = []
    for kind, n, text in raw_lines:  # dead letters whatever their place: first
        topic = USAGE if kind == "usage" else SUBSCRIPTIONS
        records.append((topic, f"line-{n}".encode(), text.encode(), None))
    deferred = unencodable = refused = 0
    histories = file_histories(catalog) if catalog is not None and contract == 2 else {}
    for at, n, raw, event in parsed:
        if at > until:
            deferred += 1
            continue
        if isinstance(event, PlanPublished | PlanRetired):
            try:
                if isinstance(event, PlanPublished):
                    pid = event.plan.plan_id
                    histories[pid] = publish(histories.get(pid), event.plan, at, event.existing)
                else:
                    histories[event.plan_id] = retire(
                        histories.get(event.plan_id), event.plan_id, at
                    )
            except CatalogError:
                refused += 1
            continue
        sub = getattr(event, "subscription_id", None)
        owner = event.account_id if sub is None else owners.get(sub, sub)
        topic, rec = input_record(event, owner, raw.get("event_id") or f"line-{n}")
        try:
            value = codec(topic.schema).encode(rec)
        except ValueError:  # e.g. a quantity with more decimals than the schema's scale
            value, unencodable = raw_text[n].encode(), unencodable + 1
        records.append((topic, owner.encode(), value, to_micros(at) // 1000))
    encode = codec(CATALOG.schema).encode
    catalog_records: list[InputRecord] = [
        (CATALOG, pid.encode(), encode(to_record(h)), None) for pid, h in sorted(histories.items())
    ]
    return ReplayInput(records, len(raw_lines) + unencodable, deferred, catalog_records, refused)


def check_until(until: datetime) -> datetime:
    """`until` in UTC; ValueError if the processor would refuse a bill run to it."""
    until = require_utc(until)
    if until > datetime.now(UTC) + MAX_FUTURE:
        raise ValueError(f"more than {MAX_FUTURE_TEXT} ahead: the bill run would be refused")
    return until


def replay(
    catalog_path: Path,
    lines: Iterable[str],
    until: datetime,
    bootstrap: str,
    console: Console | None = None,
    parent: Path | None = None,
    timeout: float = 600.0,
    rating_env: dict[str, str] | None = None,
    contract: int = 1,
) -> ReplayResult:
    """Run the events through a fresh pipeline on the cluster at `bootstrap`: its own
    topics, rating state and embedded warehouse under `parent` (the temporary directory
    by default), all deleted afterwards. `rating_env`: more environment for the rating
    processor (e.g. small transactions and state cache); contract: the version of the
    rating contract the rating processor implements (STREAMBILL_RATING_CONTRACT)."""
    started = time.monotonic()
    until = check_until(until)
    catalog = load_catalog(catalog_path)  # a CatalogError here, not a processor dying at start
    data = input_records(lines, until, catalog, contract)
    rating_env = {**(rating_env or {}), "STREAMBILL_RATING_CONTRACT": str(contract)}
    console = console or Console(stderr=True, quiet=True)
    parent = parent or Path(tempfile.gettempdir())
    with isolated_namespace(parent, bootstrap, PARTITIONS, "streambill-replay-") as settings:
        embedded = dataclasses.replace(settings, clickhouse_dsn=None)
        result = _run(embedded, bootstrap, catalog_path, data, until, console, timeout,
                      rating_env)  # fmt: skip
    result.seconds = time.monotonic() - started
    return result


def _run(
    settings: Settings,
    bootstrap: str,
    catalog_path: Path,
    data: ReplayInput,
    until: datetime,
    console: Console,
    timeout: float,
    rating_env: dict[str, str],
) -> ReplayResult:
    catalog = str(catalog_path)
    sink = ProcessorProcess(settings, bootstrap, "sink", "--catalog", catalog,
                            env=EMBEDDED_WAREHOUSE).start()  # fmt: skip
    procs = [sink]
    try:
        with progress_bar(console) as progress:
            task = progress.add_task("publish events",
                                     total=len(data.catalog) + len(data.records))  # fmt: skip
            producer = clients.producer(settings, bootstrap)
            published = produce_values(
                producer,
                ((topic.name, key, value, ms)
                 for topic, key, value, ms in (*data.catalog, *data.records)),
                progress=lambda n: progress.advance(task, n),
            )  # fmt: skip
            # started once every input is on its topics: the processor's event-time order
            # of the two input topics then never depends on how fast they were published
            procs.append(
                ProcessorProcess(settings, bootstrap, "rating", "--catalog", catalog, "--clock",
                                 "event", env={**EMBEDDED_WAREHOUSE, **rating_env}).start()
            )  # fmt: skip
            wait_for_warehouse_endpoint(settings, sink)
            deadline = time.monotonic() + timeout
            offsets = issue_bill_run(settings, bootstrap, until)
            task = progress.add_task(f"bill run until {until:%Y-%m-%d}", total=len(offsets))

            def bill_run_finished() -> bool:
                done = bill_run_done(settings, bootstrap, offsets)
                progress.update(task, completed=done)
                return done == len(offsets)

            _wait(bill_run_finished, procs, deadline, "the bill run")
            # the sink has landed the inputs (its own dead letters follow from them) and
            # the invoices, then every dead letter
            for topics in ((SUBSCRIPTIONS, USAGE, INVOICES), (DEAD_LETTER,)):
                ends = data_ends(settings, bootstrap, topics)
                what = "dead letters landed" if DEAD_LETTER in topics else "inputs, invoices landed"
                task = progress.add_task(what, total=sum(ends.values()))
                _wait(lambda ends=ends, task=task: _landed(settings, ends, progress, task),
                      procs, deadline, "the sink")  # fmt: skip
        invoices = landed_invoices(settings)
        dead = query(settings, "SELECT processor, reason, count() FROM dead_letters FINAL "
                     "GROUP BY processor, reason")["rows"]  # fmt: skip
    finally:
        for proc in reversed(procs):
            proc.stop()
    return ReplayResult(
        invoices=invoices,
        published=published,
        raw=data.raw,
        deferred=data.deferred,
        dead_letters=Counter({r: int(c) for p, r, c in dead if p == "rating"}),
        sink_dead_letters=sum(int(c) for p, _, c in dead if p == "sink"),
        catalog_refused=data.catalog_refused,
    )


def _wait(
    done: Callable[[], bool], procs: list[ProcessorProcess], deadline: float, what: str
) -> None:
    try:
        wait_while_running(done, procs, deadline - time.monotonic(), what)
    except (ProcessExited, TimeoutError) as exc:
        raise ReplayError(str(exc)) from exc


def data_ends(
    settings: Settings, bootstrap: str, topics: Iterable[TopicSpec]
) -> dict[tuple[str, int], int]:
    """(topic base, partition) -> the offset after its last committed record, read to the
    end (read_committed): what the sink records in sink_offsets once it has landed them.
    Not the high watermark, which counts transaction markers too."""
    consumer = clients.consumer(settings, bootstrap, group_id("streambill-replay-ends"),
                                **{"enable.partition.eof": True})  # fmt: skip
    try:
        assigned = []
        for topic in topics:
            n = partition_count(consumer, topic.name)
            assigned += [TopicPartition(topic.name, p, 0) for p in range(n)]
        consumer.assign(assigned)
        base = {t.name: t.base for t in topics}
        ends = {(base[tp.topic], tp.partition): 0 for tp in assigned}
        at_end: set[tuple[str, int]] = set()
        while len(at_end) < len(assigned):
            for msg in consumer.consume(10_000, timeout=1.0):
                err = msg.error()
                if err is None:
                    ends[(base[msg.topic()], msg.partition())] = msg.offset() + 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add((msg.topic(), msg.partition()))
        return ends
    finally:
        consumer.close()


def _landed(settings: Settings, ends: dict[tuple[str, int], int], progress: Any, task: Any) -> bool:
    rows = query(settings, "SELECT topic, partition, max(next_offset) FROM sink_offsets "
                 "GROUP BY topic, partition")["rows"]  # fmt: skip
    landed = {(t, int(p)): int(o) for t, p, o in rows}
    progress.update(task, completed=sum(min(landed.get(k, 0), end) for k, end in ends.items()))
    return all(landed.get(k, 0) >= end for k, end in ends.items())


def landed_invoices(settings: Settings) -> list[Invoice]:
    """Every invoice of the warehouse, sorted by (issued_at, invoice_id). Read without
    FINAL: a row landed twice must be the same row, not two versions of which FINAL
    would keep one."""
    head = query(settings, "SELECT invoice_id, account_id, subscription_id, currency, reason, "
                 "toUnixTimestamp64Micro(issued_at), toString(total), line_count, "
                 "toUnixTimestamp64Micro(finalized_at), toString(credit_applied), "
                 "toString(amount_due) FROM invoices")["rows"]  # fmt: skip
    body = query(settings, "SELECT invoice_id, line_no, charge_id, kind, "
                 "toUnixTimestamp64Micro(period_start), toUnixTimestamp64Micro(period_end), "
                 "toString(quantity), toString(amount) FROM invoice_lines")["rows"]  # fmt: skip
    heads: dict[str, set[tuple]] = {}
    for row in head:
        heads.setdefault(row[0], set()).add(tuple(row))
    lines: dict[str, dict[int, set[tuple]]] = {}
    for row in body:
        lines.setdefault(row[0], {}).setdefault(int(row[1]), set()).add(tuple(row[2:]))
    invoices = []
    for invoice_id, versions in heads.items():
        copies = lines.get(invoice_id, {})
        if len(versions) > 1 or any(len(v) > 1 for v in copies.values()):
            raise ReplayError(f"invoice {invoice_id} landed with different contents")
        _, account, sub, currency, reason, issued_us, total, line_count, *settled = next(
            iter(versions)
        )
        finalized_us, credit, due = settled
        if sorted(copies) != list(range(int(line_count))):
            raise ReplayError(f"invoice {invoice_id}: lines {sorted(copies)} of {line_count}")
        invoice_lines = []
        for no in range(int(line_count)):
            charge_id, kind, start_us, end_us, quantity, amount = next(iter(copies[no]))
            start, end = period_read(kind, from_micros(int(start_us)), from_micros(int(end_us)),
                                     from_micros(int(issued_us)))  # fmt: skip
            amount_ = _money(amount, currency, invoice_id)
            invoice_lines.append(
                InvoiceLine(
                    charge_id,
                    kind,
                    start,
                    end,  # type: ignore[arg-type]
                    Decimal(quantity),
                    amount_,
                )
            )
        invoices.append(Invoice(invoice_id, account, sub, currency, from_micros(int(issued_us)),
                                tuple(invoice_lines), _money(total, currency, invoice_id),
                                reason, from_micros(int(finalized_us)),
                                _money(credit, currency, invoice_id),
                                _money(due, currency, invoice_id)))  # fmt: skip
    orphans = sorted(set(lines) - set(heads))
    if orphans:
        raise ReplayError(f"invoice lines without their invoice: {orphans[:5]}")
    invoices.sort(key=lambda inv: (inv.issued_at, inv.invoice_id))
    return invoices


def _money(text: str, currency: str, invoice_id: str) -> Decimal:
    """A landed amount; `rate`'s format would round one that has more digits than the
    currency's minor unit, hiding the difference, so that is an error."""
    amount = Decimal(text)
    if round_money(amount, currency) != amount:
        raise ReplayError(f"invoice {invoice_id}: amount {text} is not in {currency} minor units")
    return amount
