"""The catalog as a stream: each plan's version history, as the records of
``billing.catalog`` (schemas/catalog_plan.avsc) hold it.

One record per plan, keyed by its id, carries *every* version (with the instant it took
effect and its `existing` mode) and the instant it was retired: the topic is compacted,
and a replay must see the whole history, not just the latest version. Publishing a
version or retiring a plan writes the plan's whole history again, one version longer.

The rules of what may be published are the rating contract's (rules 10 and 11), in one
place: ``streams.domain.billing.PlanBook``. A publication it refuses is refused here with
its reason, before anything is written, so the topic only ever holds valid histories and
every rating worker, reading the same records, derives the same versions.

A rating worker turns the histories into the contract's catalog events
(``catalog_events``), ordered by the instant each took effect, and applies each one to a
partition when the partition's clock reaches it (``CatalogView``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.domain.billing import PlanBook, Rejected
from streams.domain.catalog import Catalog, CatalogError, Plan, parse_plan, plan_to_dict
from streams.domain.events import CatalogEvent, ExistingMode, PlanPublished, PlanRetired

# the instant of the versions a catalog file gives: in effect from the start of time, as
# `streambill rate` takes them (its catalog's plans are version 1 of each plan)
SINCE_ALWAYS = datetime(1970, 1, 1, tzinfo=UTC)
EXISTING_MODES = ("keep", "next_period")


@dataclass(frozen=True, slots=True)
class Version:
    plan: Plan  # its version number set
    published_at: datetime
    existing: ExistingMode


@dataclass(frozen=True, slots=True)
class PlanHistory:
    plan_id: str
    versions: tuple[Version, ...]
    retired_at: datetime | None = None

    @property
    def latest(self) -> Plan:
        return self.versions[-1].plan

    def events(self) -> list[tuple[datetime, CatalogEvent]]:
        """The contract's events of this history, in order."""
        out: list[tuple[datetime, CatalogEvent]] = [
            (v.published_at, PlanPublished(v.published_at, v.plan, v.existing))
            for v in self.versions
        ]
        if self.retired_at is not None:
            out.append((self.retired_at, PlanRetired(self.retired_at, self.plan_id)))
        return out


def _book(history: PlanHistory | None) -> PlanBook:
    book = PlanBook(Catalog({}))
    for _, event in history.events() if history is not None else ():
        if isinstance(event, PlanPublished):
            book.publish(event)
        else:
            book.retire(event.plan_id)
    return book


def publish(
    history: PlanHistory | None, plan: Plan, at: datetime, existing: str = "keep"
) -> PlanHistory:
    """The history with `plan` published at `at` as its next version. CatalogError, with
    the reason, if the contract refuses it (a retired plan, another currency or interval)
    or it would go back in time."""
    if existing not in EXISTING_MODES:
        raise CatalogError(f"existing must be keep or next_period, got {existing!r}")
    if history is not None and history.plan_id != plan.plan_id:
        raise CatalogError(f"plan {plan.plan_id!r} is not {history.plan_id!r}")
    if history is not None and at < history.versions[-1].published_at:
        raise CatalogError(f"plan {plan.plan_id!r} has a version published after {at.isoformat()}")
    try:
        published = _book(history).publish(PlanPublished(at, plan, existing))  # type: ignore[arg-type]
    except Rejected as exc:
        raise CatalogError(exc.reason) from None
    version = Version(published, at, existing)  # type: ignore[arg-type]
    if history is None:
        return PlanHistory(plan.plan_id, (version,))
    return replace(history, versions=(*history.versions, version))


def retire(history: PlanHistory | None, plan_id: str, at: datetime) -> PlanHistory:
    """The history with the plan retired at `at`; CatalogError if it cannot be."""
    if history is None:
        raise CatalogError(f"unknown plan {plan_id!r}")
    if history.retired_at is not None:
        raise CatalogError(f"plan {plan_id!r} is already retired")
    if at < history.versions[-1].published_at:
        raise CatalogError(f"plan {plan_id!r} has a version published after {at.isoformat()}")
    return replace(history, retired_at=at)


def same_plan(a: Plan, b: Plan) -> bool:
    """The same definition, whatever the version numbers."""
    return plan_to_dict(a) == plan_to_dict(b)


# --- records ------------------------------------------------------------------------------


def to_record(history: PlanHistory) -> dict[str, Any]:
    """The billing.catalog record (schemas/catalog_plan.avsc) of a history."""
    return {
        "plan_id": history.plan_id,
        "versions": [
            {
                "version": v.plan.version,
                "published_at": v.published_at,
                "existing": v.existing,
                "plan": orjson.dumps(plan_to_dict(v.plan), option=orjson.OPT_SORT_KEYS).decode(),
            }
            for v in history.versions
        ],
        "retired_at": history.retired_at,
    }


def from_record(rec: Mapping[str, Any]) -> PlanHistory:
    """A history from its decoded record; CatalogError if it is not one the rules allow
    (it is rebuilt through ``publish`` and ``retire``: a record written by hand that the
    contract would refuse is refused whole)."""
    plan_id = rec["plan_id"]
    history: PlanHistory | None = None
    for n, v in enumerate(rec["versions"], start=1):
        if v["version"] != n:
            raise CatalogError(f"plan {plan_id!r}: version {v['version']} where {n} was due")
        try:
            raw = orjson.loads(v["plan"])
        except orjson.JSONDecodeError as exc:
            raise CatalogError(f"plan {plan_id!r} version {n}: not JSON ({exc})") from None
        plan = parse_plan(raw, f"{plan_id}.versions[{n - 1}].plan")
        history = publish(history, plan, v["published_at"], v["existing"])
    if history is None:
        raise CatalogError(f"plan {plan_id!r}: a history without a version")
    if rec.get("retired_at") is not None:
        history = retire(history, plan_id, rec["retired_at"])
    return history


# --- what a rating worker does with them -----------------------------------------------------


def catalog_events(histories: Iterable[PlanHistory]) -> list[tuple[datetime, CatalogEvent]]:
    """Every plan's events in the order they take effect: by instant, then plan id, then
    their order in the plan's history. Deterministic whatever order the records are read."""
    keyed = [
        (at, h.plan_id, n, event) for h in histories for n, (at, event) in enumerate(h.events())
    ]
    keyed.sort(key=lambda k: k[:3])
    return [(at, event) for at, _, _, event in keyed]


def file_histories(catalog: Catalog) -> dict[str, PlanHistory]:
    """A catalog file's plans as histories of one version each, in effect since always."""
    return {pid: publish(None, plan, SINCE_ALWAYS) for pid, plan in catalog.plans.items()}


class CatalogView:
    """The plan versions as one partition sees them at its clock: a PlanBook to which
    the catalog events are applied in order as the clock reaches each one's instant, each
    once (one that takes effect before the clock but was read only now, published late,
    is applied when it is read, which is what a replay of the same topics does too)."""

    def __init__(self) -> None:
        self.book = PlanBook(Catalog({}))
        self.applied: set[tuple[str, int]] = set()  # (plan id, version; 0: retirement)

    def apply(self, event: CatalogEvent) -> bool:
        """Apply an event unless it was; True if it was applied now."""
        key = event_key(event)
        if key in self.applied:
            return False
        self.applied.add(key)
        if isinstance(event, PlanPublished):
            self.book.publish(event)
        else:
            self.book.retire(event.plan_id)
        return True

    def advance(self, events: list[tuple[datetime, CatalogEvent]], clock: datetime) -> None:
        """Apply every event taking effect at or before the clock."""
        for at, event in events:
            if at > clock:
                break
            self.apply(event)


def event_key(event: CatalogEvent) -> tuple[str, int]:
    if isinstance(event, PlanPublished):
        return event.plan.plan_id, event.plan.version
    return event.plan_id, 0
