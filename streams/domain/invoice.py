"""Invoices, their deterministic ids and their JSON shape."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from streams.domain.money import format_money, format_quantity, parse_decimal, total
from streams.domain.timestamps import format_timestamp, parse_timestamp

KIND_FLAT = "flat"
KIND_USAGE = "usage"
KIND_PRORATION_CREDIT = "proration_credit"
KIND_PRORATION_CHARGE = "proration_charge"
LINE_KINDS = (KIND_FLAT, KIND_USAGE, KIND_PRORATION_CREDIT, KIND_PRORATION_CHARGE)

REASON_CREATED = "created"
REASON_PERIOD_END = "period_end"
REASON_PLAN_CHANGED = "plan_changed"
REASON_CANCELLED = "cancelled"

# Fixed forever: changing it would re-key every invoice ever issued.
INVOICE_NAMESPACE = uuid.UUID("5b0c7a36-3f0e-4f5e-9d43-6c1f2a8e9b10")


def invoice_id(subscription_id: str, reason_key: str, at: datetime) -> str:
    """uuid5 of "sub|reason|timestamp": a replay or retry yields the same id."""
    return uuid5_text(f"{subscription_id}|{reason_key}|{format_timestamp(at)}")


_NAMESPACE_BYTES = INVOICE_NAMESPACE.bytes


def uuid5_text(name: str) -> str:
    """``str(uuid.uuid5(INVOICE_NAMESPACE, name))`` without building the UUID object (a
    bill run makes one per invoice): SHA-1 of namespace + name, version 5, RFC 4122
    variant, in the canonical 8-4-4-4-12 form."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    charge_id: str
    kind: str
    period_start: datetime
    period_end: datetime
    quantity: Decimal
    amount: Decimal  # already rounded to the currency's minor unit


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_id: str
    account_id: str
    subscription_id: str
    currency: str
    issued_at: datetime
    lines: tuple[InvoiceLine, ...]
    total: Decimal
    reason: str


def make_invoice(
    *,
    subscription_id: str,
    account_id: str,
    currency: str,
    issued_at: datetime,
    reason: str,
    lines: list[InvoiceLine],
    reason_key: str | None = None,
) -> Invoice:
    """Build an invoice whose total is the exact sum of its (rounded) lines."""
    return Invoice(
        invoice_id=invoice_id(subscription_id, reason_key or reason, issued_at),
        account_id=account_id,
        subscription_id=subscription_id,
        currency=currency,
        issued_at=issued_at,
        lines=tuple(lines),
        total=total([ln.amount for ln in lines]),
        reason=reason,
    )


def invoice_to_dict(inv: Invoice) -> dict[str, Any]:
    """The public JSON shape; every number is a string (amounts with exactly the
    currency's minor-unit digits). `reason` is internal and not part of it."""
    return {
        "invoice_id": inv.invoice_id,
        "account_id": inv.account_id,
        "subscription_id": inv.subscription_id,
        "currency": inv.currency,
        "issued_at": format_timestamp(inv.issued_at),
        "lines": [
            {
                "charge_id": ln.charge_id,
                "kind": ln.kind,
                "period_start": format_timestamp(ln.period_start),
                "period_end": format_timestamp(ln.period_end),
                "quantity": format_quantity(ln.quantity),
                "amount": format_money(ln.amount, inv.currency),
            }
            for ln in inv.lines
        ],
        "total": format_money(inv.total, inv.currency),
    }


def invoice_from_dict(d: dict[str, Any], reason: str = "") -> Invoice:
    """Inverse of invoice_to_dict (the reason is not serialized, pass it if known)."""
    lines = tuple(
        InvoiceLine(
            charge_id=ln["charge_id"],
            kind=ln["kind"],
            period_start=parse_timestamp(ln["period_start"]),
            period_end=parse_timestamp(ln["period_end"]),
            quantity=parse_decimal(ln["quantity"]),
            amount=parse_decimal(ln["amount"], allow_negative=True),
        )
        for ln in d["lines"]
    )
    return Invoice(
        invoice_id=d["invoice_id"],
        account_id=d["account_id"],
        subscription_id=d["subscription_id"],
        currency=d["currency"],
        issued_at=parse_timestamp(d["issued_at"]),
        lines=lines,
        total=parse_decimal(d["total"], allow_negative=True),
        reason=reason,
    )
