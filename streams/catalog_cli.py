"""`streambill catalog publish|list|retire`: the plans' version history on billing.catalog
(``streams/catalog_store.py``), read from and written to the topic itself.

`publish FILE` imports a catalog file idempotently: a plan the topic does not have gets
the file's definition as its version 1 (in effect since always, as `streambill rate`
takes a catalog file), a plan whose definition changed gets a new version now, the others
are left alone; a plan the rating contract refuses (retired, another currency or
interval) and nothing is published. Exit codes: 0 done, 1 refused (or Kafka did not take
it), 2 bad usage (a file that is not a catalog).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.table import Table

from streams.config import Settings
from streams.config import settings as load_settings
from streams.domain.catalog import Catalog, CatalogError

catalog_app = typer.Typer(
    help="The plans and their versions (billing.catalog): publish a catalog file, list, retire.",
    no_args_is_help=True,
)
console = Console(stderr=True)
out = Console()


class Existing(StrEnum):
    keep = "keep"
    next_period = "next_period"


def _kafka() -> tuple[Settings, str]:
    """The settings and the cluster (the local broker started if none is configured),
    its declared topics created: as `streambill customer set` does."""
    from streams.kafka import clients
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import ensure_topics

    settings = load_settings()
    try:
        bootstrap = bootstrap_servers(settings)
        ensure_topics(clients.admin(settings, bootstrap), settings)
    except (KafkaException, TimeoutError) as exc:
        raise _fail(f"Kafka unavailable: {exc}") from None
    return settings, bootstrap


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(file: Path) -> Catalog:
    try:
        return Catalog.from_dict(json.loads(file.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"not a catalog file: {file}: {exc}", 2) from None
    except CatalogError as exc:
        raise _fail(f"invalid catalog, nothing was published: {exc}", 2) from None


@catalog_app.command("publish")
def catalog_publish(
    file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                help="a catalog file (JSON, as `streambill rate --catalog`)"),
    existing: Existing = typer.Option(
        Existing.keep, help="for the new version of a changed plan: keep (subscriptions stay "
        "on their version) or next_period (they move at their next period end)"),
) -> None:  # fmt: skip
    """Publish a catalog file's plans (idempotent: unchanged plans are left alone)."""
    from streams.catalog_store import CatalogUnavailable, publish_file

    catalog = _load(file)
    settings, bootstrap = _kafka()
    try:
        results = publish_file(settings, bootstrap, catalog, datetime.now(UTC),
                               existing=existing.value)  # fmt: skip
    except CatalogError as exc:
        raise _fail(f"refused, nothing was published: {exc}") from None
    except (CatalogUnavailable, KafkaException, TimeoutError) as exc:
        raise _fail(f"not published: {exc}") from None
    for r in results:
        v = r.version
        said = {
            "added": "added as version 1, in effect since always",
            "new_version": f"new version, version {v.plan.version} (in effect from "
            f"{v.published_at.isoformat()}, existing {v.existing})",
        }.get(r.action, f"unchanged (version {v.plan.version})")
        out.print(f"{r.plan_id}: {said}", markup=False, highlight=False)
    counts = Counter(r.action for r in results)
    out.print(f"{counts['added']} added, {counts['new_version']} new version(s), "
              f"{counts['unchanged']} unchanged", highlight=False)  # fmt: skip


def _charges(plan: dict[str, Any]) -> str:
    return "\n".join(
        f"{c['charge_id']} ({c['model']}"
        + (f" {c['amount']}" if c["model"] == "flat" else f" {c['metric']}")
        + ")"
        for c in plan["charges"]
    )


def _since(published_at: str) -> str:
    from streams.catalog_history import SINCE_ALWAYS
    from streams.domain.timestamps import format_timestamp

    return "since always" if published_at == format_timestamp(SINCE_ALWAYS) else published_at


@catalog_app.command("list")
def catalog_list(
    as_json: bool = typer.Option(False, "--json", help="a JSON array, one object per row"),
    all_versions: bool = typer.Option(False, "--all-versions", help="every version of each plan"),
) -> None:
    """The plans as billing.catalog holds them: each plan's latest version (or every one)."""
    from streams.catalog_store import read_histories, version_json, versions_by_plan

    settings, bootstrap = _kafka()
    try:
        histories = read_histories(settings, bootstrap)
    except (KafkaException, TimeoutError) as exc:
        raise _fail(f"billing.catalog not read: {exc}") from None
    rows = [version_json(h, v) for h, v in versions_by_plan(histories, all_versions)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no plans on billing.catalog (`streambill catalog publish FILE`)")
        return
    table = Table("plan", "version" if all_versions else "latest version", "currency",
                  "interval", "charges", "trial days", "published at", "existing",
                  "retired at")  # fmt: skip
    for r in rows:
        plan = r["plan"]
        table.add_row(r["plan_id"], f"{r['version']} of {r['versions']}", plan["currency"],
                      plan["interval"], _charges(plan), str(plan.get("trial_days", 0)),
                      _since(r["published_at"]), r["existing"], r["retired_at"] or "")  # fmt: skip
    out.print(table)


@catalog_app.command("retire")
def catalog_retire(plan_id: str = typer.Argument(..., help="the plan to retire")) -> None:
    """Retire a plan: no new subscription or plan change to it; existing ones go on."""
    from streams.catalog_store import CatalogUnavailable, retire_plan

    settings, bootstrap = _kafka()
    try:
        history = retire_plan(settings, bootstrap, plan_id, datetime.now(UTC))
    except CatalogError as exc:
        raise _fail(f"refused: {exc}") from None
    except (CatalogUnavailable, KafkaException, TimeoutError) as exc:
        raise _fail(f"not retired: {exc}") from None
    assert history.retired_at is not None
    out.print(f"plan {plan_id} retired at {history.retired_at.isoformat()} (its "
              f"{len(history.versions)} version(s) go on billing the subscriptions on them)",
              markup=False, highlight=False)  # fmt: skip
