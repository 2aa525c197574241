"""billing.catalog read and written with the project's Kafka clients and codec: each plan's
whole version history, one record per plan keyed by its id (``streams/catalog_history.py``
says what a history is and which publications the rating contract allows).

Reading: the topic read whole, to its end, with the runtime's ``TopicTable`` (as the
payments processor reads billing.customers): the latest record of each plan. A record
that does not decode, or whose history the contract refuses, is skipped with a warning
(the plan keeps its previous record's history).

Writing: every writer here (``streambill catalog``, the API, a processor importing its
catalog file at start) uses one transactional id, ``<namespace>streambill-catalog-writer``,
and a write is read, validate, write:

1. a new producer initialises its transactions, which fences any other writer of the
   same id and completes or aborts whatever that one left open;
2. the topic is read to its end (``read_committed``): every write committed before;
3. every plan is validated against its current history (``catalog_history.publish`` /
   ``retire``); one refusal and nothing is written (a CatalogError names every refusal);
4. one record per changed plan, all of them in one transaction.

A writer fenced between 1 and 4 (another one initialised meanwhile) cannot commit: it
starts again at 1 and validates against what the other one wrote. So two writers never
both extend the same history, and a batch lands whole or not at all. (A producer that
writes the topic without this id, as ``streambill replay`` does in a namespace of its
own, is not serialised with these writers.)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import structlog
from confluent_kafka import KafkaException

from streams.catalog_history import (
    SINCE_ALWAYS,
    PlanHistory,
    Version,
    from_record,
    publish,
    retire,
    same_plan,
    to_record,
)
from streams.codec import DecodeError, codec
from streams.config import Settings
from streams.domain.catalog import Catalog, CatalogError, Plan, plan_to_dict
from streams.domain.timestamps import format_timestamp
from streams.kafka import clients
from streams.kafka.topics import CATALOG, group_id
from streams.runtime.table import TopicTable

log = structlog.get_logger(__name__)
T = TypeVar("T")

WRITER_ID = "streambill-catalog-writer"  # the transactional id, namespaced by group_id()
# a write fenced by another writer, or cut off by Kafka, is tried again from the read, this
# often at most (and within its time budget), after a random pause: writers starting
# together (rating workers importing their catalog file) do not fence each other forever
ATTEMPTS = 8

# what a publication did to a plan
ADDED = "added"  # a plan the topic did not have: its version 1
NEW_VERSION = "new_version"
UNCHANGED = "unchanged"  # the same definition as its latest version: nothing written
DIFFERS = "differs"  # add_only: the file's definition differs; the topic's history is kept


class PlanNotFound(CatalogError):
    """Retiring a plan the topic does not have."""


class PlanAlreadyRetired(CatalogError):
    """Retiring a plan retired before."""


class CatalogUnavailable(RuntimeError):
    """Kafka did not take the write (or the read before it) in time. Nothing was written,
    unless the commit itself timed out; retrying is safe either way: a write already in
    the topic is found there by the next attempt."""


@dataclass(frozen=True, slots=True)
class Published:
    """What a publication did to one plan, and the plan's history after it."""

    plan_id: str
    action: str  # ADDED | NEW_VERSION | UNCHANGED | DIFFERS
    history: PlanHistory

    @property
    def version(self) -> Version:
        """The plan's latest version (the one published, unless nothing was)."""
        return self.history.versions[-1]


# --- reading ----------------------------------------------------------------------------


def history_of(record: Mapping[str, Any]) -> PlanHistory:
    """A decoded billing.catalog record -> its history; DecodeError (what a TopicTable
    skips and the sink dead-letters) if the contract refuses it."""
    try:
        return from_record(record)
    except CatalogError as exc:
        raise DecodeError("invalid_event", f"a plan history the contract refuses: {exc}") from None
    except (ValueError, TypeError, KeyError, OverflowError) as exc:  # never a crash
        raise DecodeError("invalid_event", f"not a plan history: {exc!r}"[:500]) from None


def decode_history(value: bytes) -> PlanHistory:
    """A billing.catalog value -> its history; DecodeError if it is not Avro of the
    schema or the contract refuses the history."""
    return history_of(codec(CATALOG.schema).decode(value))


def catalog_table(settings: Settings, bootstrap: str, name: str) -> TopicTable[PlanHistory]:
    """billing.catalog as a started TopicTable (plan id -> history), kept current by its
    own thread; ``catch_up()`` before relying on it (its end is the consumer's position:
    past the markers of the transactions the topic is written in). `name`: the holder's,
    for logs."""
    return TopicTable(settings, bootstrap, CATALOG.name, decode_history, name).start()


def read_histories(
    settings: Settings, bootstrap: str, timeout: float = 60.0
) -> dict[str, PlanHistory]:
    """Every plan's history: the topic read whole, to its end."""
    table = catalog_table(settings, bootstrap, "catalog-reader")
    try:
        table.catch_up(timeout)
        return dict(table.values)
    finally:
        table.close()


# --- writing ----------------------------------------------------------------------------

# the current histories -> (the histories to write, what to return); raises CatalogError
# to refuse (nothing is written)
Decision = Callable[[dict[str, PlanHistory]], tuple[list[PlanHistory], T]]


def _transact(
    settings: Settings,
    bootstrap: str,
    decide: Decision[T],
    table: TopicTable[PlanHistory] | None,
    timeout: float,
) -> T:
    own = table is None
    reader = catalog_table(settings, bootstrap, "catalog-writer") if table is None else table
    try:
        return _attempts(settings, bootstrap, decide, reader, timeout)
    finally:
        if own:
            reader.close()


def _attempts(
    settings: Settings,
    bootstrap: str,
    decide: Decision[T],
    table: TopicTable[PlanHistory],
    timeout: float,
) -> T:
    encode = codec(CATALOG.schema).encode
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.5, deadline - time.monotonic())

    tried: tuple[list[PlanHistory], T] | None = None  # a write whose commit may have landed
    for attempt in range(1, ATTEMPTS + 1):
        try:
            producer = clients.producer(settings, bootstrap, **{
                "transactional.id": group_id(WRITER_ID),
                "transaction.timeout.ms": 60_000,
                "linger.ms": 0,
            })  # fmt: skip
            producer.init_transactions(left())  # fences every other writer of the id
            table.catch_up(left())  # ...whose commits are all in the topic by now
            current = dict(table.values)
            if tried is not None and all(current.get(h.plan_id) == h for h in tried[0]):
                return tried[1]  # the attempt before did commit
            writes, result = decide(current)  # a refusal raises: nothing written
            if not writes:
                return result
            tried = (writes, result)
            producer.begin_transaction()
            for history in writes:
                producer.produce(CATALOG.name, key=history.plan_id.encode(),
                                 value=encode(to_record(history)))  # fmt: skip
            producer.commit_transaction(left())
        except (KafkaException, TimeoutError) as exc:
            # fenced by another writer, or Kafka did not answer in time: read again
            log.warning("catalog write not committed; trying again from the read",
                        attempt=attempt, error=str(exc)[:300])  # fmt: skip
            pause = random.uniform(0.05, 0.25) * attempt
            if attempt == ATTEMPTS or time.monotonic() + pause >= deadline:
                raise CatalogUnavailable(
                    f"Kafka did not take the catalog write ({exc}); retry later"
                ) from None
            time.sleep(pause)
            continue
        try:
            table.catch_up(left())  # the holder reads its own write at once
        except TimeoutError:
            log.warning("catalog written; the table has not read it back yet")
        log.info("catalog written", plans=[h.plan_id for h in writes])
        return result
    raise AssertionError("unreachable")


def _named(plan_id: str, reason: str) -> str:
    return reason if repr(plan_id) in reason else f"plan {plan_id!r}: {reason}"


def _refuse(refusals: list[str]) -> None:
    if refusals:
        raise CatalogError("; ".join(refusals))


def publish_plans(
    settings: Settings,
    bootstrap: str,
    plans: Iterable[tuple[Plan, str]],
    at: datetime,
    *,
    table: TopicTable[PlanHistory] | None = None,
    timeout: float = 60.0,
) -> list[Published]:
    """Publish each (plan, existing) at `at`: all or nothing. Every plan is validated
    against its current history before anything is written; a CatalogError names every
    refusal (a retired plan, another currency or interval, a version published after
    `at`, a plan given twice, an `existing` other than keep or next_period). A plan whose
    latest version has the same definition and the same `existing` is left alone
    (UNCHANGED); the others get one record each (ADDED, NEW_VERSION). `table`: a started
    catalog table to read through (the API's); else the topic is read here."""
    batch = list(plans)

    def decide(current: dict[str, PlanHistory]) -> tuple[list[PlanHistory], list[Published]]:
        results: list[Published] = []
        refusals: list[str] = []
        seen: set[str] = set()
        for plan, existing in batch:
            pid = plan.plan_id
            if pid in seen:
                refusals.append(f"plan {pid!r} is given twice")
                continue
            seen.add(pid)
            history = current.get(pid)
            if (history is not None and history.retired_at is None
                    and same_plan(history.latest, plan)
                    and history.versions[-1].existing == existing):  # fmt: skip
                results.append(Published(pid, UNCHANGED, history))
                continue
            try:
                published = publish(history, plan, at, existing)
            except CatalogError as exc:
                refusals.append(_named(pid, str(exc)))
                continue
            results.append(Published(pid, ADDED if history is None else NEW_VERSION, published))
        _refuse(refusals)
        return [r.history for r in results if r.action != UNCHANGED], results

    return _transact(settings, bootstrap, decide, table, timeout)


def publish_file(
    settings: Settings,
    bootstrap: str,
    catalog: Catalog,
    at: datetime,
    *,
    add_only: bool = False,
    existing: str = "keep",
    table: TopicTable[PlanHistory] | None = None,
    timeout: float = 60.0,
) -> list[Published]:
    """A catalog file imported, idempotently: a plan the topic does not have gets the
    file's definition as its version 1, in effect since always (SINCE_ALWAYS: as
    `streambill rate` takes a catalog file's plans); a plan whose latest version has the
    same definition is UNCHANGED; a plan whose definition changed gets a new version at
    `at` with `existing` (all or nothing, as publish_plans) -- or, with `add_only` (what a
    processor does at start), is left as the topic has it (DIFFERS). Plans of the topic
    that the file does not list are left alone. Run twice, the second run writes nothing."""

    def decide(current: dict[str, PlanHistory]) -> tuple[list[PlanHistory], list[Published]]:
        results: list[Published] = []
        refusals: list[str] = []
        for pid, plan in sorted(catalog.plans.items()):
            history = current.get(pid)
            try:
                if history is None:
                    results.append(Published(pid, ADDED, publish(None, plan, SINCE_ALWAYS)))
                elif same_plan(history.latest, plan):
                    results.append(Published(pid, UNCHANGED, history))
                elif add_only:
                    results.append(Published(pid, DIFFERS, history))
                else:
                    new = publish(history, plan, at, existing)
                    results.append(Published(pid, NEW_VERSION, new))
            except CatalogError as exc:
                refusals.append(_named(pid, str(exc)))
        _refuse(refusals)
        written = [r.history for r in results if r.action in (ADDED, NEW_VERSION)]
        return written, results

    return _transact(settings, bootstrap, decide, table, timeout)


def retire_plan(
    settings: Settings,
    bootstrap: str,
    plan_id: str,
    at: datetime,
    *,
    table: TopicTable[PlanHistory] | None = None,
    timeout: float = 60.0,
) -> PlanHistory:
    """The plan retired at `at` (its history, with retired_at). PlanNotFound,
    PlanAlreadyRetired, or a CatalogError if a version was published after `at`."""

    def decide(current: dict[str, PlanHistory]) -> tuple[list[PlanHistory], PlanHistory]:
        history = current.get(plan_id)
        if history is None:
            raise PlanNotFound(f"unknown plan {plan_id!r}")
        if history.retired_at is not None:
            raise PlanAlreadyRetired(
                f"plan {plan_id!r} is already retired (at {history.retired_at.isoformat()})"
            )
        retired = retire(history, plan_id, at)
        return [retired], retired

    return _transact(settings, bootstrap, decide, table, timeout)


def versions_by_plan(
    histories: Mapping[str, PlanHistory], all_versions: bool = True
) -> list[tuple[PlanHistory, Version]]:
    """(history, version) by plan id then version: every version, or each plan's latest."""
    return [(h, v) for _, h in sorted(histories.items())
            for v in (h.versions if all_versions else h.versions[-1:])]  # fmt: skip


def version_json(history: PlanHistory, version: Version) -> dict[str, Any]:
    """One version as `streambill catalog list --json` and ``GET /v1/plans`` show it: the
    plan as the catalog file writes it, when it took effect, its `existing`, and the plan's
    number of versions and retirement."""
    return {
        "plan_id": history.plan_id,
        "version": version.plan.version,
        "published_at": format_timestamp(version.published_at),
        "existing": version.existing,
        "plan": plan_to_dict(version.plan),
        "versions": len(history.versions),
        "retired_at": None if history.retired_at is None else format_timestamp(history.retired_at),
    }
