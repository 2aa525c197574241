"""Invoices, their deterministic ids and their JSON shape."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from streams.domain.catalog import Plan
from streams.domain.money import (
    CTX,
    ONE,
    ZERO,
    format_money,
    format_quantity,
    parse_decimal,
    round_money,
    total,
)
from streams.domain.pricing import prorate
from streams.domain.timestamps import format_timestamp, parse_timestamp

KIND_FLAT = "flat"
KIND_USAGE = "usage"
KIND_PRORATION_CREDIT = "proration_credit"
KIND_PRORATION_CHARGE = "proration_charge"
KIND_DISCOUNT = "discount"  # v2
KIND_TAX = "tax"  # v2
KIND_USAGE_ADJUSTMENT = "usage_adjustment"  # v2
LINE_KINDS = (
    KIND_FLAT, KIND_USAGE, KIND_PRORATION_CREDIT, KIND_PRORATION_CHARGE,
    KIND_DISCOUNT, KIND_TAX, KIND_USAGE_ADJUSTMENT,
)  # fmt: skip
# lines whose quantity the contract leaves null
_NO_QUANTITY = frozenset({KIND_FLAT, KIND_PRORATION_CREDIT, KIND_PRORATION_CHARGE, KIND_DISCOUNT})

REASON_CREATED = "created"
REASON_PERIOD_END = "period_end"
REASON_PLAN_CHANGED = "plan_changed"
REASON_CANCELLED = "cancelled"
REASON_TRIAL_ENDED = "trial_ended"  # v2
REASON_PAUSED = "paused"  # v2
REASON_RESUMED = "resumed"  # v2
REASON_ADJUSTMENT = "adjustment"  # v2

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
    # None only for a discount or tax line of an invoice without other lines (rule 22)
    period_start: datetime | None
    period_end: datetime | None
    quantity: Decimal | None  # None for a discount (flat and proration lines hold 1)
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
    # v2 (rule 21); the defaults are an invoice finalized when issued, with no credit
    finalized_at: datetime | None = None
    credit_applied: Decimal = ZERO
    amount_due: Decimal | None = None  # None: max(total, 0)

    def settled(
        self, finalized_at: datetime, credit_applied: Decimal, amount_due: Decimal
    ) -> Invoice:
        # every field named: dataclasses.replace costs more than the rest of a finalization
        return Invoice(self.invoice_id, self.account_id, self.subscription_id, self.currency,
                       self.issued_at, self.lines, self.total, self.reason, finalized_at,
                       credit_applied, amount_due)  # fmt: skip

    @property
    def due(self) -> Decimal:
        """What the customer pays: amount_due, or the total when it is not negative."""
        if self.amount_due is not None:
            return self.amount_due
        return self.total if self.total > 0 else ZERO


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
    currency's minor-unit digits, quantities normalized). `reason` is internal."""
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
                "period_start": _when(ln.period_start),
                "period_end": _when(ln.period_end),
                "quantity": None if ln.quantity is None else format_quantity(ln.quantity),
                "amount": format_money(ln.amount, inv.currency),
            }
            for ln in inv.lines
        ],
        "total": format_money(inv.total, inv.currency),
        "finalized_at": format_timestamp(inv.finalized_at or inv.issued_at),
        "credit_applied": format_money(inv.credit_applied, inv.currency),
        "amount_due": format_money(inv.due, inv.currency),
    }


def invoice_to_contract_dict(inv: Invoice) -> dict[str, Any]:
    """What `streambill rate` prints (the rating contract, version 2): the public shape
    with `reason`; quantities exactly as computed (the digits of the input, not
    normalized) and null for flat, proration and discount lines."""
    d = invoice_to_dict(inv)
    for line, ln in zip(d["lines"], inv.lines, strict=True):
        line["quantity"] = None if ln.kind in _NO_QUANTITY else _exact(ln.quantity)
    d["reason"] = inv.reason
    return d


def _when(t: datetime | None) -> str | None:
    return None if t is None else format_timestamp(t)


def _exact(q: Decimal | None) -> str | None:
    if q is None:
        return None
    return f"{q.copy_abs() if q.is_zero() else q:f}"  # never "-0"


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
        finalized_at=parse_timestamp(d["finalized_at"]) if d.get("finalized_at") else None,
        credit_applied=parse_decimal(d.get("credit_applied", "0")),
        amount_due=parse_decimal(d["amount_due"]) if d.get("amount_due") is not None else None,
    )


# --- line builders shared by the state machines ------------------------------------------


def flat_lines(plan: Plan, start: datetime, end: datetime) -> list[InvoiceLine]:
    """Every flat charge of the plan for [start, end), in full."""
    return [
        InvoiceLine(c.charge_id, KIND_FLAT, start, end, ONE, round_money(c.amount, plan.currency))
        for c in plan.flat_charges
    ]


def proration_lines(
    plan: Plan, kind: str, t: datetime, start: datetime, end: datetime
) -> list[InvoiceLine]:
    """A credit (KIND_PRORATION_CREDIT, negative) or a charge of each flat charge for
    (end - t)/(end - start) of the period [start, end), as lines over [t, end)."""
    lines = []
    for c in plan.flat_charges:
        exact = prorate(c.amount, t, start, end)
        # half-even is symmetric, so rounding the negated value equals negating
        # the rounded one: a credit and a charge of the same amount cancel out
        amount = round_money(
            CTX.minus(exact) if kind == KIND_PRORATION_CREDIT else exact, plan.currency
        )
        lines.append(InvoiceLine(c.charge_id, kind, t, end, ONE, amount))
    return lines
