"""The API's reads from the warehouse: the SQL of each, and what its rows mean. Pure:
the server runs the SQL (``streams.warehouse.query``) and asks Kafka for the offsets.

Every id that reaches SQL matched ``ID_PATTERN`` (no quote, no backslash) and every other
value is an integer or an enumerated word, so only an account prefix needs quoting.

An event's status (``GET /v1/events/{id}``), per copy of it on its topic (the same event
id sent twice is two copies):
- ``dead_lettered``: a dead letter of that copy has landed; its reason and detail.
- ``applied``: the copy has landed, the rating processor has committed past it (its dead
  letters are written in the same transaction as that commit) and the sink has landed
  every dead letter committed since then (its lag on the dead-letter topic is 0), and
  none is this copy's.
- ``ignored_repeat``: like applied, but an earlier copy was applied: the rating
  processor counts a usage event id once per period (same timestamp: same period) and
  dead-letters a second creation as a duplicate.
- ``pending``: landed, but not (yet) known to be applied or dead-lettered.
An event that has not landed (or is another tenant's) is not found.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from streams.domain.invoice import Invoice, InvoiceLine
from streams.domain.timestamps import format_timestamp, from_micros
from streams.invoice_record import period_read

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
INVOICE_STATUSES = ("open", "paid", "uncollectible")
MAX_PAGE = 500
DEFAULT_PAGE = 100


# --- invoices --------------------------------------------------------------------------

# paid: a charge succeeded, or nothing was due (zero, a credit, or all of it paid by the
# account's credit balance); uncollectible: dunning gave up; open: neither, yet
INVOICE_STATUS_SQL = (
    "multiIf(p.succeeded > 0 OR i.amount_due <= 0, 'paid', p.uncollectible > 0, "
    "'uncollectible', 'open')"
)


def string_literal(text: str) -> str:
    """A ClickHouse string literal of any text (an account prefix is not an id)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def encode_cursor(issued_us: int, invoice_id: str) -> str:
    return base64.urlsafe_b64encode(f"{issued_us}|{invoice_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str] | None:
    """(issued_at µs, invoice_id) after which the next page starts; None if invalid."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        issued, invoice_id = raw.split("|", 1)
        if ID_PATTERN.fullmatch(invoice_id) and issued.isdigit():
            return int(issued), invoice_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    return None


def invoices_sql(
    account_prefix: str,
    account: str | None,
    status: str | None,
    from_us: int | None,
    to_us: int | None,
    after: tuple[int, str] | None,
    limit: int,
) -> str:
    """One page (limit + 1 rows: the extra one says another page follows), oldest first."""
    where = [f"startsWith(account_id, {string_literal(account_prefix)})"]
    if account is not None:
        where.append(f"account_id = '{account}'")
    if from_us is not None:
        where.append(f"issued_at >= fromUnixTimestamp64Micro({from_us}, 'UTC')")
    if to_us is not None:
        where.append(f"issued_at < fromUnixTimestamp64Micro({to_us}, 'UTC')")
    if after is not None:
        where.append(
            f"(issued_at, invoice_id) > (fromUnixTimestamp64Micro({after[0]}, 'UTC'), '{after[1]}')"
        )
    outer = f"WHERE status = '{status}'" if status else ""
    return (
        "SELECT invoice_id, account_id, subscription_id, currency, issued_us, total, status "
        "FROM (SELECT i.invoice_id AS invoice_id, i.account_id AS account_id, "
        "i.subscription_id AS subscription_id, i.currency AS currency, "
        "toUnixTimestamp64Micro(i.issued_at) AS issued_us, toString(i.total) AS total, "
        f"{INVOICE_STATUS_SQL} AS status "
        "FROM (SELECT invoice_id, account_id, subscription_id, currency, issued_at, total, "
        f"amount_due FROM invoices FINAL WHERE {' AND '.join(where)}) AS i "
        "LEFT JOIN (SELECT invoice_id, countIf(status = 'succeeded') AS succeeded, "
        "countIf(status = 'uncollectible') AS uncollectible FROM payment_attempts FINAL "
        "GROUP BY invoice_id) AS p ON p.invoice_id = i.invoice_id) "
        f"{outer} ORDER BY issued_us, invoice_id LIMIT {limit + 1}"
    )


# --- subscriptions and refunds ---------------------------------------------------------


def subscription_sql(subscription_id: str) -> str:
    """created_at is 0 when no creation landed (only later events): not a subscription."""
    return (
        "SELECT subscription_id, account_id, plan_id, toUnixTimestamp64Micro(created_at), "
        "status, toUnixTimestamp64Micro(cancelled_at), toUnixTimestamp64Micro(updated_at) "
        f"FROM subscriptions WHERE subscription_id = '{subscription_id}'"
    )


def refund_sql(refund_id: str) -> str:
    # a repeated request is answered with the first result again: the first copy counts
    return (
        "SELECT refund_id, invoice_id, account_id, status, toString(amount), currency, "
        "reason, refund_reason, gateway_reference, toUnixTimestamp64Micro(requested_at), "
        "toUnixTimestamp64Micro(completed_at) "
        f"FROM refunds FINAL WHERE refund_id = '{refund_id}' "
        "ORDER BY _partition, _offset LIMIT 1"
    )


def invoice_sql(invoice_id: str) -> tuple[str, str]:
    """The invoice's head and its lines (invoice_from_rows reads them)."""
    where = f"invoice_id = '{invoice_id}'"
    return (
        "SELECT invoice_id, account_id, subscription_id, currency, "
        "toUnixTimestamp64Micro(issued_at), toString(total), "
        "toUnixTimestamp64Micro(finalized_at), toString(credit_applied), "
        f"toString(amount_due), reason FROM invoices FINAL WHERE {where}",
        "SELECT charge_id, kind, toUnixTimestamp64Micro(period_start), "
        "toUnixTimestamp64Micro(period_end), toString(quantity), "
        f"toString(amount) FROM invoice_lines FINAL WHERE {where} ORDER BY line_no",
    )


def invoice_from_rows(head: list[Any], lines: list[list[Any]]) -> Invoice:
    inv_id, account, sub, currency, issued, total, finalized, credit, due, reason = head
    issued_at = from_micros(int(issued))
    return Invoice(
        inv_id, account, sub, currency, issued_at,
        tuple(InvoiceLine(c, k, *period_read(k, from_micros(int(ps)), from_micros(int(pe)),
                                             issued_at),  # type: ignore[arg-type]
                          None if q is None else Decimal(q), Decimal(a))
              for c, k, ps, pe, q, a in lines),
        Decimal(total), reason=reason, finalized_at=from_micros(int(finalized)),
        credit_applied=Decimal(credit), amount_due=Decimal(due),
    )  # fmt: skip


def document_format(path_id: str, accept: str | None) -> tuple[str, str]:
    """(invoice id, json | html | pdf) of GET /v1/invoices/{id}: a `.html` or `.pdf`
    suffix, else the first of JSON, HTML or PDF the Accept header lists (JSON for none,
    or only */*)."""
    for fmt in ("html", "pdf"):
        if path_id.endswith(f".{fmt}"):
            return path_id.removesuffix(f".{fmt}"), fmt
    wanted = {"application/json": "json", "text/html": "html", "application/pdf": "pdf"}
    for item in (accept or "").split(","):
        fmt = wanted.get(item.split(";", 1)[0].strip().lower())
        if fmt:
            return path_id, fmt
    return path_id, "json"


# --- customers -------------------------------------------------------------------------

CUSTOMER_FIELDS = (
    "name", "email", "address", "country", "tax_exempt", "grace_hours", "payment_method",
)  # fmt: skip


def customer_sql(account_id: str) -> str:
    """The account's current customer record: (timestamp µs, *CUSTOMER_FIELDS)."""
    return (
        "SELECT toUnixTimestamp64Micro(updated_at), name, email, address, country, tax_exempt, "
        f"grace_hours, payment_method FROM customers_current WHERE account_id = '{account_id}'"
    )


def customer_record(account_id: str, row: list[Any]) -> dict[str, Any]:
    """A row of customer_sql -> the customer record (as on billing.customers)."""
    updated, name, email, address, country, tax_exempt, grace_hours, payment_method = row
    return {"account_id": account_id, "timestamp": from_micros(int(updated)), "name": name,
            "email": email, "address": address, "country": country,
            "tax_exempt": bool(int(tax_exempt)), "grace_hours": int(grace_hours),
            "payment_method": payment_method}  # fmt: skip


def customer_json(record: dict[str, Any]) -> dict[str, Any]:
    """A customer record -> the API's shape."""
    return {"account_id": record["account_id"], **{f: record[f] for f in CUSTOMER_FIELDS},
            "updated_at": format_timestamp(record["timestamp"])}  # fmt: skip


# --- events ----------------------------------------------------------------------------


def landed_event_sql(event_id: str) -> str:
    """Every landed copy: (table, account, subscription, partition, offset, timestamp µs)."""
    return " UNION ALL ".join(
        f"SELECT '{table}', account_id, subscription_id, _partition, _offset, "
        f"toUnixTimestamp64Micro(timestamp) FROM {table} FINAL WHERE event_id = '{event_id}'"
        for table in ("usage_events", "subscription_events")
    )


def dead_letters_sql(event_id: str) -> str:
    """Dead letters whose original value holds the id (Avro writes strings as their
    bytes): candidates, confirmed by decoding the value. Cancellations the lane refused
    have no landed copy, so the value is the only place their id is found."""
    return (
        "SELECT source_topic, source_partition, source_offset, reason, detail, processor, "
        f"hex(value) FROM dead_letters FINAL WHERE position(value, '{event_id}') > 0"
    )


def owner_sql(subscription_id: str) -> str:
    return (
        f"SELECT account_id FROM subscriptions WHERE subscription_id = '{subscription_id}' LIMIT 1"
    )


@dataclass
class Copy:
    """One copy of an event on its topic, as the warehouse holds it."""

    topic: str
    partition: int
    offset: int
    account_id: str
    subscription_id: str
    timestamp_us: int | None = None
    kind: str = "usage"  # usage | subscription
    dead_letter: tuple[str, str, str] | None = None  # (reason, detail, processor)
    rated: bool = False  # the rating processor committed past it
    status: str = "pending"


def is_foreign_account(reason: str, detail: str) -> bool:
    """The rating processor's and the lane's answer for an event under another account
    than the subscription's, when both accounts' keys share a partition."""
    return reason == "account_mismatch" or (
        reason == "rejected" and " belongs to another account than " in detail
    )


def is_unknown_subscription(reason: str, detail: str) -> bool:
    """The rating processor's and the lane's answer for a subscription their partition
    does not hold, which is also what an event under another account than the owner's
    gets: the account is the key, so it reaches a partition without that subscription."""
    return reason == "unknown_subscription" or (reason, detail) == (
        "rejected",
        "unknown subscription",
    )


def settle(copies: list[Copy], dead_letters_landed: bool) -> str:
    """Each copy's status (in offset order), and the event's: applied when a copy was
    applied, else pending when one may still be, else dead_lettered."""
    applied_at: list[int | None] = []  # timestamps of the applied copies
    for c in sorted(copies, key=lambda c: (c.partition, c.offset)):
        repeat = c.timestamp_us in applied_at if c.kind == "usage" else bool(applied_at)
        if c.dead_letter is not None:
            duplicate = c.dead_letter[1] == "duplicate subscription.created"
            c.status = "ignored_repeat" if duplicate and applied_at else "dead_lettered"
        elif c.rated and dead_letters_landed:
            c.status = "ignored_repeat" if repeat else "applied"
            if c.status == "applied":
                applied_at.append(c.timestamp_us)
        else:
            c.status = "pending"
    statuses = {c.status for c in copies}
    if "applied" in statuses:
        return "applied"
    return "pending" if "pending" in statuses else "dead_lettered"
