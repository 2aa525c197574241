"""The benchmarks' inputs, encoded ahead of the timed window: subscriptions on monthly
plans, usage spread over their first period, invoices to land and invoices to collect."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from streams.codec import codec
from streams.config import DEFAULT_CATALOG
from streams.domain.catalog import Catalog
from streams.domain.timestamps import to_micros
from streams.kafka.topics import INVOICES, SUBSCRIPTIONS, USAGE

ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 2, 1, tzinfo=UTC)  # monthly plans anchored at ANCHOR


# --- inputs -------------------------------------------------------------------------


def encoded_subscriptions(
    n: int, plans: list[str], unique_every: int = 0
) -> list[tuple[bytes, bytes]]:
    """n creations on `plans` in turn; with unique_every k, every k-th on UNIQUE_PLAN."""
    encode = codec(SUBSCRIPTIONS.schema).encode
    out = []
    for i in range(n):
        account = f"acct-{i:08d}"
        plan = UNIQUE_PLAN if unique_every and i % unique_every == 0 else plans[i % len(plans)]
        out.append((account.encode(), encode({
            "event_id": f"sub-{i:08d}-created", "type": "subscription.created",
            "timestamp": ANCHOR, "account_id": account, "subscription_id": f"sub-{i:08d}",
            "plan_id": plan, "mode": None, "payment_method": f"tok_{i}",
        })))  # fmt: skip
    return out


# a plan counting distinct users (the rating contract's version 2): its state keeps the
# values seen in the open period, so the bench can show state stays bounded
UNIQUE_PLAN = "active-users-eur"
UNIQUE_USERS = 50  # distinct "user" values a subscription's usage cycles through


def unique_catalog(path: Path) -> Path:
    """The bench catalog plus UNIQUE_PLAN, written to `path`."""
    catalog = json.loads(DEFAULT_CATALOG.read_text())
    catalog["plans"].append({
        "plan_id": UNIQUE_PLAN, "currency": "EUR", "interval": "month", "charges": [
            {"charge_id": "base-fee", "model": "flat", "amount": "10.00"},
            {"charge_id": "active-users", "model": "per_unit", "metric": "api_calls",
             "aggregation": "unique_count", "field": "user", "unit_amount": "0.50"},
        ],
    })  # fmt: skip
    path.write_text(json.dumps(catalog, indent=2))
    return path


def subscription_stamps(n: int) -> list[int]:
    """The record timestamps (ms) of encoded_subscriptions: each arrives when it happened."""
    return [to_micros(ANCHOR) // 1000] * n


def usage_stamps(n_subs: int, per_sub: int, start: int = 0) -> list[int]:
    """The record timestamps (ms) of encoded_usage, in its order: each arrives when it
    happened (with the rating contract's version 2, an event arriving now would make every
    period ending before now happen first)."""
    anchor_ms = to_micros(ANCHOR) // 1000
    return [anchor_ms + ((start + j) * 3_600 + i % 3_600) * 1000
            for j in range(per_sub) for i in range(n_subs)]  # fmt: skip


def encoded_usage(
    n_subs: int, per_sub: int, start: int = 0, unique_every: int = 0
) -> list[tuple[bytes, bytes]]:
    """per_sub usage events per subscription, spread over its first period; those of
    UNIQUE_PLAN's subscriptions (unique_every) name a user."""
    encode = codec(USAGE.schema).encode
    span = int((PERIOD_END - ANCHOR).total_seconds())
    out = []
    for j in range(per_sub):
        for i in range(n_subs):
            account = f"acct-{i:08d}"
            unique = unique_every and i % unique_every == 0
            out.append((account.encode(), encode({
                "event_id": f"u-{i:08d}-{start + j}", "account_id": account,
                "timestamp": ANCHOR + timedelta(seconds=(start + j) * 3_600 + i % 3_600),
                "subscription_id": f"sub-{i:08d}", "metric": "api_calls",
                "quantity": Decimal(1 + (i * 7 + j) % 500),
                "properties": {"user": f"user-{(i + j) % UNIQUE_USERS}"} if unique else None,
            })))  # fmt: skip
    assert all(j * 3_600 + 3_600 < span for j in range(start + per_sub))
    return out


def monthly_plans() -> list[str]:
    catalog = Catalog.from_dict(json.loads(DEFAULT_CATALOG.read_text()))
    return sorted(p for p, plan in catalog.plans.items() if plan.interval.value == "month")


def encoded_invoices(rows: int, lines_per_invoice: int) -> list[tuple[bytes, bytes]]:
    """Invoices of `lines_per_invoice` usage and flat lines, `rows` lines in all."""
    encode = codec(INVOICES.schema).encode
    out = []
    n_invoices = max(1, rows // lines_per_invoice)
    for i in range(n_invoices):
        account = f"acct-{i:08d}"
        lines = [{
            "charge_id": f"charge-{k}", "kind": "flat" if k == 0 else "usage",
            "period_start": ANCHOR, "period_end": PERIOD_END,
            "quantity": Decimal(1 + (i + k) % 997), "amount": Decimal(f"{(i * 31 + k) % 9999}.25"),
        } for k in range(lines_per_invoice)]  # fmt: skip
        out.append((account.encode(), encode({
            "invoice_id": f"inv-{uuid.UUID(int=i)}", "account_id": account,
            "subscription_id": f"sub-{i:08d}", "plan_id": "growth-eur", "currency": "EUR",
            "issued_at": PERIOD_END, "reason": "period_end", "lines": lines,
            "total": sum((ln["amount"] for ln in lines), Decimal(0)), "payment_method": f"tok_{i}",
        })))  # fmt: skip
    return out


def encoded_due_invoices(
    n: int, issued_at: datetime, prefix: str = "", token: str = "tok_"
) -> list[tuple[bytes, bytes]]:
    """n invoices with an amount due and a card token on file (tokens decide declines)."""
    encode = codec(INVOICES.schema).encode
    out = []
    for i in range(n):
        account = f"{prefix}acct-{i:08d}"
        amount = Decimal(f"{10 + i % 490}.{i % 100:02d}")
        line = {"charge_id": "base", "kind": "flat", "period_start": issued_at,
                "period_end": issued_at + timedelta(days=30), "quantity": Decimal(1),
                "amount": amount}  # fmt: skip
        out.append((account.encode(), encode({
            "invoice_id": f"{prefix}inv-pay-{uuid.UUID(int=i)}", "account_id": account,
            "subscription_id": f"{prefix}sub-{i:08d}", "plan_id": "pro-usd", "currency": "USD",
            "issued_at": issued_at, "reason": "period_end", "lines": [line], "total": amount,
            "payment_method": f"{token}{i:08d}",
        })))  # fmt: skip
    return out
