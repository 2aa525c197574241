"""Customer records on billing.customers: `streambill customer set|show`.

A record is always a whole customer (see ``schemas/customer.avsc``): `customer set`
changes the options it is given and keeps the other fields of the account's current
record, read from the topic itself (not the warehouse, which may lag), then publishes
the whole record. The API's ``PUT /v1/customers/{account}`` replaces the record instead
(HTTP's PUT): a client sends the whole customer.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console

from streams.api import reads, records
from streams.codec import codec
from streams.config import Settings
from streams.config import settings as load_settings
from streams.domain.events import CustomerUpdated
from streams.kafka import clients
from streams.kafka.topics import CUSTOMERS
from streams.rating_records import input_record
from streams.runtime.table import TopicTable

customer_app = typer.Typer(help="Customer records (billing.customers): tax, grace, payment method.")
console = Console(stderr=True)


def customer_table(settings: Settings, bootstrap: str, name: str) -> TopicTable[dict[str, Any]]:
    """Every account's current customer record, billing.customers read up to its end."""
    table = TopicTable(settings, bootstrap, CUSTOMERS.name, codec(CUSTOMERS.schema).decode, name)
    table.start().catch_up()
    return table


def publish_customer(settings: Settings, bootstrap: str, record: dict[str, Any]) -> None:
    """The record, after the rating contract's customer.updated event of its country, tax
    status and grace hours on billing.subscriptions (as ``PUT /v1/customers`` does: the
    rating processor sees the change in order with the account's other events). The event
    is acknowledged first: the record is never ahead of it."""
    account = record["account_id"]
    updated = CustomerUpdated(record["timestamp"], account, record["country"],
                              record["tax_exempt"], record["grace_hours"])  # fmt: skip
    topic, event = input_record(updated, account, str(uuid.uuid4()))
    producer = clients.producer(settings, bootstrap, **{"linger.ms": 0})
    producer.produce(topic.name, key=account.encode(), value=codec(topic.schema).encode(event))
    if producer.flush(30):  # acknowledged before the record is sent
        raise RuntimeError("Kafka did not acknowledge the customer.updated event in 30 s")
    producer.produce(CUSTOMERS.name, key=account.encode(),
                     value=codec(CUSTOMERS.schema).encode(record))  # fmt: skip
    if producer.flush(30):
        raise RuntimeError("Kafka did not acknowledge the customer record in 30 s")


def merged(current: dict[str, Any] | None, changes: dict[str, Any]) -> dict[str, Any]:
    """The API's JSON of the current record with `changes` applied (a None change clears
    the field to its default)."""
    body = {k: v for k, v in reads.customer_json(current).items()
            if k in reads.CUSTOMER_FIELDS} if current else {}  # fmt: skip
    for name, value in changes.items():
        body[name] = value
    return {k: v for k, v in body.items() if v is not None}


def _current(account: str) -> tuple[Settings, str, dict[str, Any] | None]:
    """(settings, the cluster, the account's customer record now): the local broker is
    started if none is configured."""
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import ensure_topics

    settings = load_settings()
    bootstrap = bootstrap_servers(settings)
    ensure_topics(clients.admin(settings, bootstrap), settings)
    table = customer_table(settings, bootstrap, "cli")
    try:
        return settings, bootstrap, table.get(account)
    finally:
        table.close()


@customer_app.command("set")
def customer_set(
    account: str = typer.Argument(..., help="the account id"),
    name: str | None = typer.Option(None),
    email: str | None = typer.Option(None),
    address: str | None = typer.Option(None, help="the billing address (\\n between lines)"),
    country: str | None = typer.Option(None, help="ISO 3166-1 alpha-2, e.g. FR"),
    tax_exempt: bool | None = typer.Option(None, "--tax-exempt/--taxed"),
    grace_hours: int | None = typer.Option(None, help="hours an invoice stays a draft"),
    payment_method: str | None = typer.Option(None, help="a gateway token (never a card number)"),
    clear: list[str] = typer.Option([], help="a field to clear (repeatable)"),
) -> None:
    """Change an account's customer record (the other fields keep their values)."""
    unknown = sorted(set(clear) - set(reads.CUSTOMER_FIELDS))
    if unknown:
        raise typer.BadParameter(f"no such field {unknown}; one of {reads.CUSTOMER_FIELDS}")
    if not reads.ID_PATTERN.fullmatch(account):
        raise typer.BadParameter("an account id: letters, digits and ._:@-")
    settings, bootstrap, current = _current(account)
    if address is not None:  # a literal \n typed on the command line breaks the line
        address = address.replace("\\n", "\n")
    given = {"name": name, "email": email, "address": address, "country": country,
             "tax_exempt": tax_exempt, "grace_hours": grace_hours,
             "payment_method": payment_method}  # fmt: skip
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    changes.update(dict.fromkeys(clear))
    now = datetime.now(UTC)
    record, errors = records.validate(
        "customer", records.CUSTOMER_RULES, merged(current, changes), now,
        server_fields={"account_id": account, "timestamp": now},
    )  # fmt: skip
    if record is None:
        for error in errors:
            console.print(f"[red]{error}[/]")
        raise typer.Exit(2)
    publish_customer(settings, bootstrap, record)
    print(json.dumps(reads.customer_json(record), indent=2))


@customer_app.command("show")
def customer_show(account: str = typer.Argument(..., help="the account id")) -> None:
    """An account's current customer record, from billing.customers."""
    _settings, _bootstrap_servers, current = _current(account)
    if current is None:
        console.print(f"[red]no customer record for account {account!r}[/]")
        raise typer.Exit(1)
    print(json.dumps(reads.customer_json(current), indent=2))
