"""Invoice documents: the invoice a customer receives, in HTML and PDF.

One Jinja2 template (``streams/templates/invoice.html``, autoescaped) makes the HTML;
WeasyPrint lays the same HTML out as a PDF (A4), so both formats always show the same
thing. Amounts and dates are formatted with Babel in the customer's locale (from the
country of the customer record; English otherwise), in the invoice's currency with its
own minor units. Pure apart from the PDF step: ``invoice_document`` builds what the
template shows from the invoice, the customer record and the issuer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

from babel.core import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.numbers import format_currency, format_decimal, format_percent
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from streams.config import Settings
from streams.domain.invoice import (
    KIND_DISCOUNT,
    KIND_TAX,
    Invoice,
)

DEFAULT_LOCALE = "en_US"
EN_DASH = "\u2013"  # between a period's first and last day
KIND_LABELS = {
    "flat": "Subscription",
    "usage": "Usage",
    "proration_credit": "Credit for the unused part of the period",
    "proration_charge": "Charge for the rest of the period",
    "usage_adjustment": "Late usage: correction of a billed period",
    KIND_DISCOUNT: "Discount",
    KIND_TAX: "Tax",
}
REASON_LABELS = {
    "created": "Subscription created",
    "period_end": "End of period",
    "plan_changed": "Plan changed",
    "cancelled": "Subscription cancelled",
    "trial_ended": "Trial ended",
    "paused": "Subscription paused",
    "resumed": "Subscription resumed",
    "adjustment": "Late usage adjustment",
}
FORMATS = {"html": "text/html; charset=utf-8", "pdf": "application/pdf"}


@dataclass(frozen=True)
class Issuer:
    name: str
    address: str = ""  # lines separated by newlines
    tax_id: str = ""
    email: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> Issuer:
        return cls(settings.issuer_name, settings.issuer_address, settings.issuer_tax_id,
                   settings.issuer_email)  # fmt: skip


def locale_for(country: str | None) -> str:
    """The customer's locale: the most likely one of its country (FR -> fr_FR)."""
    if not country:
        return DEFAULT_LOCALE
    try:
        return str(Locale.parse(f"und_{country}"))
    except (UnknownLocaleError, ValueError):
        return DEFAULT_LOCALE


def invoice_document(
    invoice: Invoice,
    customer: dict[str, Any] | None,
    issuer: Issuer,
    tax_rates: dict[str, Decimal] | None = None,
    number: str | None = None,
) -> dict[str, Any]:
    """What the template shows. customer: a customer record (billing.customers) or None;
    tax_rates: the catalog's, to print each tax line's rate (else the rate the line
    implies); number: the legal number, when the invoice has one."""
    loc = locale_for(customer.get("country") if customer else None)
    currency = invoice.currency

    def money(amount: Decimal) -> str:
        return format_currency(amount, currency, locale=loc)

    def day(t: datetime | None) -> str:
        return "" if t is None else format_date(t.astimezone(UTC), "medium", locale=loc)

    lines, discounts, taxes = [], [], []
    subtotal = Decimal(0)
    for line in invoice.lines:
        period = ""
        if line.period_start is not None:
            period = f"{day(line.period_start)} {EN_DASH} {day(line.period_end)}"
        if line.kind == KIND_TAX:
            country = line.charge_id.removeprefix("tax:")
            base = line.quantity or Decimal(0)
            rate = (tax_rates or {}).get(country)
            if rate is None and base:
                rate = (line.amount / base).quantize(Decimal("0.0001"))
            taxes.append({"country": country, "base": money(base), "amount": money(line.amount),
                          "rate": "" if rate is None else format_percent(
                              rate, "#,##0.##%", locale=loc)})  # fmt: skip
            continue
        if line.kind == KIND_DISCOUNT:
            discounts.append({"coupon": line.charge_id, "period": period,
                              "amount": money(line.amount)})  # fmt: skip
            continue
        subtotal += line.amount
        lines.append({
            "charge": line.charge_id, "kind": KIND_LABELS.get(line.kind, line.kind),
            "period": period,
            "quantity": "" if line.quantity is None else format_decimal(line.quantity, locale=loc),
            "amount": money(line.amount), "negative": line.amount < 0,
        })  # fmt: skip
    issued = invoice.issued_at
    finalized = invoice.finalized_at or issued
    address = (customer or {}).get("address") or ""
    return {
        "lang": loc.split("_")[0],
        "number": number,
        "invoice_id": invoice.invoice_id,
        "reason": REASON_LABELS.get(invoice.reason, invoice.reason),
        "issued": format_datetime(issued.astimezone(UTC), "medium", tzinfo=UTC, locale=loc),
        "finalized": format_datetime(finalized.astimezone(UTC), "medium", tzinfo=UTC, locale=loc),
        "draft": finalized > datetime.now(UTC),
        "currency": currency,
        "issuer": {
            "name": issuer.name,
            "address": issuer.address.splitlines(),
            "tax_id": issuer.tax_id,
            "email": issuer.email,
        },
        "customer": {
            "account_id": invoice.account_id,
            "name": (customer or {}).get("name") or invoice.account_id,
            "email": (customer or {}).get("email") or "",
            "address": address.splitlines(),
            "country": (customer or {}).get("country") or "",
        },
        "subscription_id": invoice.subscription_id,
        "lines": lines,
        "subtotal": money(subtotal),
        "discounts": discounts,
        "taxes": taxes,
        "total": money(invoice.total),
        "credit_applied": money(invoice.credit_applied) if invoice.credit_applied else "",
        "amount_due": money(invoice.due),
    }


@cache
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("streams", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,  # a field the template names and the document lacks: an error
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(document: dict[str, Any]) -> str:
    return _environment().get_template("invoice.html").render(doc=document)


def render_pdf(html: str) -> bytes:
    from weasyprint import HTML  # imported on use: it loads Pango

    return HTML(string=html).write_pdf()


def render(document: dict[str, Any], fmt: str) -> bytes:
    """The document as `fmt` (html or pdf) bytes."""
    html = render_html(document)
    if fmt == "html":
        return html.encode()
    if fmt == "pdf":
        return render_pdf(html)
    raise ValueError(f"no document format {fmt!r}; one of {', '.join(FORMATS)}")
