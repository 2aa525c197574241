"""An invoice as written down outside the domain: the billing.invoices record
(schemas/invoice.avsc) of a domain ``Invoice``, the one mapping between the two.

Every other form of an invoice derives from it or is checked against it
(tests/test_invoice_shape.py): the schema's fields are ``INVOICE_FIELDS`` and
``LINE_FIELDS``; the fast Avro writer (streams/fast_codec.py ``InvoiceWriter``) writes the
bytes fastavro writes for ``invoice_record``; the sink's ``invoices`` and
``invoice_lines`` columns are these fields (flattened, plus totals it derives); the public
JSON (``streambill rate``, the API's ``GET /v1/invoices/{id}``:
streams/domain/invoice.py ``invoice_to_dict``) is the record less ``PRIVATE_FIELDS``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from streams.domain.invoice import KIND_DISCOUNT, KIND_TAX, Invoice, InvoiceLine

INVOICE_FIELDS = ("invoice_id", "account_id", "subscription_id", "plan_id", "currency",
                  "issued_at", "reason", "lines", "total", "payment_method",
                  "finalized_at", "credit_applied", "amount_due")  # fmt: skip
LINE_FIELDS = ("charge_id", "kind", "period_start", "period_end", "quantity", "amount")
# on the topic and in the warehouse, not in the public JSON: the plan and payment method
# are the subscription's (the rating processor adds them), the reason is internal
PRIVATE_FIELDS = frozenset({"plan_id", "reason", "payment_method"})


# A discount or tax line of an invoice without other lines has no period (the rating
# contract's rule 22). The record's periods are not nullable (readers of every earlier
# invoice expect them): such a line is written with the empty period [issued_at,
# issued_at), and read back without one. (Only a discount or tax line whose invoice's other
# lines all span exactly that empty period would read back wrongly; no rule makes one.)
PERIODLESS_KINDS = frozenset({KIND_DISCOUNT, KIND_TAX})


def line_period(inv: Invoice, ln: InvoiceLine) -> tuple[datetime, datetime]:
    """A line's (period_start, period_end) as the record holds them."""
    if ln.period_start is None or ln.period_end is None:
        return inv.issued_at, inv.issued_at
    return ln.period_start, ln.period_end


def period_read(
    kind: str, start: datetime, end: datetime, issued_at: datetime
) -> tuple[datetime | None, datetime | None]:
    """line_period's inverse."""
    if kind in PERIODLESS_KINDS and start == end == issued_at:
        return None, None
    return start, end


def invoice_record(inv: Invoice, plan_id: str, payment_method: str | None) -> dict[str, Any]:
    return {
        "invoice_id": inv.invoice_id,
        "account_id": inv.account_id,
        "subscription_id": inv.subscription_id,
        "plan_id": plan_id,
        "currency": inv.currency,
        "issued_at": inv.issued_at,
        "reason": inv.reason,
        "lines": [
            {
                "charge_id": ln.charge_id,
                "kind": ln.kind,
                "period_start": line_period(inv, ln)[0],
                "period_end": line_period(inv, ln)[1],
                "quantity": ln.quantity,
                "amount": ln.amount,
            }
            for ln in inv.lines
        ],
        "total": inv.total,
        "payment_method": payment_method,
        "finalized_at": inv.finalized_at or inv.issued_at,
        "credit_applied": inv.credit_applied,
        "amount_due": inv.due,
    }
