"""Shared builders for domain tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from streams.domain.catalog import Catalog
from streams.domain.events import Cancelled, PlanChanged, SubscriptionCreated, Usage
from streams.domain.invoice import Invoice
from streams.domain.rating import apply_event, close_periods


def ts(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=UTC)


D = Decimal

CATALOG = {
    "plans": [
        {
            "plan_id": "basic",
            "currency": "EUR",
            "interval": "month",
            "charges": [
                {"charge_id": "base", "model": "flat", "amount": "10.00"},
                {
                    "charge_id": "api",
                    "model": "per_unit",
                    "metric": "api_calls",
                    "aggregation": "sum",
                    "unit_amount": "0.01",
                },
                {
                    "charge_id": "seats",
                    "model": "per_unit",
                    "metric": "seats",
                    "aggregation": "max",
                    "unit_amount": "5",
                },
            ],
        },
        {
            "plan_id": "pro",
            "currency": "EUR",
            "interval": "month",
            "charges": [
                {"charge_id": "base", "model": "flat", "amount": "30.00"},
                {"charge_id": "support", "model": "flat", "amount": "3.10"},
                {
                    "charge_id": "api",
                    "model": "package",
                    "metric": "api_calls",
                    "aggregation": "sum",
                    "package_size": "1000",
                    "package_amount": "2",
                },
            ],
        },
        {
            "plan_id": "usd",
            "currency": "USD",
            "interval": "month",
            "charges": [{"charge_id": "base", "model": "flat", "amount": "10"}],
        },
        {
            "plan_id": "annual",
            "currency": "EUR",
            "interval": "year",
            "charges": [{"charge_id": "base", "model": "flat", "amount": "120"}],
        },
        {
            "plan_id": "yen",
            "currency": "JPY",
            "interval": "month",
            "charges": [
                {"charge_id": "base", "model": "flat", "amount": "1000"},
                {
                    "charge_id": "calls",
                    "model": "per_unit",
                    "metric": "calls",
                    "aggregation": "count",
                    "unit_amount": "0.5",
                },
            ],
        },
        {
            "plan_id": "free",
            "currency": "EUR",
            "interval": "month",
            "charges": [],
        },
    ]
}


def catalog() -> Catalog:
    return Catalog.from_dict(CATALOG)


def created(t: str, sub: str = "s1", plan: str = "basic", account: str = "a1"):
    return SubscriptionCreated(ts(t), account, sub, plan)


def usage(t: str, qty: str, event_id: str, metric: str = "api_calls", sub: str = "s1"):
    return Usage(event_id, ts(t), sub, metric, D(qty))


def change(t: str, plan: str, sub: str = "s1"):
    return PlanChanged(ts(t), sub, plan)


def cancel(t: str, mode: str = "immediate", sub: str = "s1"):
    return Cancelled(ts(t), sub, mode)  # type: ignore[arg-type]


def run(events, until: str | None = None, cat: Catalog | None = None):
    """Apply events in the given order to one-subscription-per-id states."""
    cat = cat or catalog()
    states: dict = {}
    invoices: list[Invoice] = []
    rejections = []
    for e in events:
        st, inv, rej = apply_event(states.get(e.subscription_id), e, cat)
        if st is not None:
            states[e.subscription_id] = st
        invoices += inv
        rejections += rej
    if until is not None:
        for sub in sorted(states):
            states[sub], inv = close_periods(states[sub], ts(until), cat)
            invoices += inv
    return states, invoices, rejections


def lines(inv: Invoice) -> list[tuple[str, str, str, str]]:
    """(charge_id, kind, quantity, amount) as strings, for compact assertions."""
    from streams.domain.invoice import invoice_to_dict

    return [
        (ln["charge_id"], ln["kind"], ln["quantity"], ln["amount"])
        for ln in invoice_to_dict(inv)["lines"]
    ]
