"""Refunds: what a partition's history says about its invoices, and which refund request
may go to the gateway.

A refund is judged by what the topics sharing its key (the account) have said: which
invoices were paid and through which charge (``billing.payment-results``), which
subscription each invoice bills (``billing.invoices``) and what was refunded already,
with the first result of every refund id (``billing.refund-results``). Pure: the lane
processor feeds the history in and calls the gateway.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

ZERO = Decimal(0)


class Paid(NamedTuple):
    charge_reference: str | None
    merchant_account: str
    amount: Decimal
    currency: str


@dataclass
class RefundLedger:
    """One partition's refund history. It holds millions of paid invoices, kept as plain
    tuples: the cyclic garbage collector stops tracking a plain tuple of strings and
    decimals once it has seen it (not a NamedTuple or a dataclass), so the full
    collections that the history's growth triggers do not walk them; each such walk
    pauses the process, urgent requests included."""

    paid: dict[str, tuple] = field(default_factory=dict)  # invoice -> Paid's fields
    subscription_of: dict[str, str] = field(default_factory=dict)  # invoice -> subscription
    refunded: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # refund_id -> first

    def paid_for(self, invoice_id: str) -> Paid | None:
        fields = self.paid.get(invoice_id)
        return None if fields is None else Paid._make(fields)

    def record_paid(self, invoice_id: str, paid: Paid) -> None:
        self.paid[invoice_id] = tuple(paid)

    def record_result(self, result: dict[str, Any]) -> None:
        """A refund result (a billing.refund-results record): the first of its refund id
        counts, a repeat changes nothing."""
        if result["refund_id"] in self.results:
            return
        self.results[result["refund_id"]] = result
        if result["status"] == "refunded":
            self.refunded[result["invoice_id"]] += result["amount"]


def refund_refusal(ledger: RefundLedger, req: dict[str, Any]) -> str | None:
    """Why a refund request is rejected, from what the partition knows (None: it may go to
    the gateway)."""
    invoice_id, amount = req["invoice_id"], req["amount"]
    paid = ledger.paid_for(invoice_id)
    if paid is None:
        return "invoice_not_paid" if invoice_id in ledger.subscription_of else "unknown_invoice"
    if req["currency"] != paid.currency:
        return "currency_mismatch"
    if amount <= ZERO:
        return "amount_not_positive"
    if amount > paid.amount - ledger.refunded[invoice_id]:
        return "amount_exceeds_paid"
    return None


def refund_idempotency_key(refund_id: str) -> str:
    """The gateway call's key: the same refund id never refunds twice."""
    return f"streambill-refund:{refund_id}"


def refund_result(
    req: dict[str, Any], status: str, reason: str | None, reference: str | None, at: datetime
) -> dict[str, Any]:
    """The billing.refund-results record of a request: refunded (the gateway's
    reference) or rejected (the reason)."""
    return {
        "refund_id": req["refund_id"],
        "invoice_id": req["invoice_id"],
        "account_id": req["account_id"],
        "status": status,
        "amount": req["amount"],
        "currency": req["currency"],
        "reason": reason,
        "gateway_reference": reference,
        "refund_reason": req["reason"],
        "requested_at": req["requested_at"],
        "completed_at": at,
    }
