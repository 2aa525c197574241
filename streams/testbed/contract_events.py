"""Random histories of the rating contract's version 2, for parity runs and benchmarks.

A seeded history exercises every rule at once: accounts holding several subscriptions
(their invoices share a credit balance, so the order of what falls due matters across
subscriptions), plans with a trial, percentage, latest, unique_count and tiered charges,
versions published mid-stream (`keep` and `next_period`), a retirement, customer records
with tax countries, exemptions and grace periods, coupons, granted credit (some sent
twice), pauses and resumes, plan changes, cancellations, and usage arriving on time, in
a grace period, late inside the window, late outside it, and again (a retry).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from streams.domain.timestamps import format_timestamp, parse_timestamp

START = parse_timestamp("2026-01-05T08:00:00Z")

PLANS: list[dict[str, Any]] = [
    {"plan_id": "starter", "currency": "EUR", "interval": "month", "trial_days": 10, "charges": [
        {"charge_id": "fee", "model": "flat", "amount": "9.00"},
        {"charge_id": "calls", "model": "graduated", "metric": "calls", "aggregation": "sum",
         "tiers": [{"up_to": "100", "unit_amount": "0.05"},
                   {"up_to": None, "unit_amount": "0.02", "flat_amount": "1.00"}]}]},
    {"plan_id": "team", "currency": "EUR", "interval": "month", "charges": [
        {"charge_id": "fee", "model": "flat", "amount": "49.00"},
        {"charge_id": "seats", "model": "per_unit", "metric": "seats",
         "aggregation": "unique_count", "field": "user", "unit_amount": "4.00"},
        {"charge_id": "storage", "model": "per_unit", "metric": "storage",
         "aggregation": "latest", "unit_amount": "0.25"}]},
    {"plan_id": "payments", "currency": "EUR", "interval": "month", "charges": [
        {"charge_id": "take", "model": "percentage", "metric": "volume", "aggregation": "sum",
         "rate": "0.029", "fixed_amount": "0.30"},
        {"charge_id": "peak", "model": "volume", "metric": "calls", "aggregation": "max",
         "tiers": [{"up_to": "50", "unit_amount": "0.10"},
                   {"up_to": None, "unit_amount": "0.07", "flat_amount": "2.00"}]}]},
    {"plan_id": "legacy", "currency": "EUR", "interval": "month", "charges": [
        {"charge_id": "fee", "model": "flat", "amount": "19.99"},
        {"charge_id": "calls", "model": "package", "metric": "calls", "aggregation": "count",
         "package_size": "10", "package_amount": "0.50"}]},
]  # fmt: skip
TAX_RATES = [{"country": "NL", "rate": "0.21"}, {"country": "DE", "rate": "0.19"}]
METRICS = {"starter": ["calls"], "team": ["seats", "storage"],
           "payments": ["volume", "calls"], "legacy": ["calls"]}  # fmt: skip


@dataclass
class History:
    catalog: dict[str, Any]
    events: list[str]  # JSON lines, in no particular order
    until: datetime


def random_history(
    seed: int, accounts: int = 8, subscriptions: int = 24, days: int = 140
) -> History:
    rng = random.Random(seed)
    end = START + timedelta(days=days)
    events: list[dict[str, Any]] = []

    def at(lo: datetime, hi: datetime) -> datetime:
        span = max(int((hi - lo).total_seconds()), 1)
        return lo + timedelta(seconds=rng.randrange(span))

    def ts(t: datetime) -> str:
        return format_timestamp(t)

    for n in range(accounts):
        if rng.random() < 0.8:
            fields: dict[str, Any] = {"country": rng.choice(["NL", "DE", "FR"])}
            if rng.random() < 0.2:
                fields["tax_exempt"] = True
            if rng.random() < 0.5:
                fields["grace_hours"] = rng.choice([1, 24, 72])
            when = at(START - timedelta(days=3), START)
            events.append({"type": "customer.updated", "timestamp": ts(when),
                           "account_id": f"acct-{n}", **fields})  # fmt: skip
        if rng.random() < 0.3:  # a change later on
            grace = rng.choice([0, 48])
            events.append({"type": "customer.updated", "timestamp": ts(at(START, end)),
                           "account_id": f"acct-{n}", "grace_hours": grace})  # fmt: skip
        for _ in range(rng.choice([0, 1, 2])):
            credit = {"type": "credit.granted", "timestamp": ts(at(START, end)),
                      "credit_id": f"cr-{n}-{rng.randrange(10**6)}", "account_id": f"acct-{n}",
                      "currency": "EUR",
                      "amount": rng.choice(["5.00", "25.00", "120.00"])}  # fmt: skip
            events.append(credit)
            if rng.random() < 0.3:  # sent again: counts once
                events.append(
                    {**credit, "timestamp": ts(at(parse_timestamp(credit["timestamp"]), end))}
                )

    # the catalog changes while subscriptions run on it
    team2 = orjson.loads(orjson.dumps(PLANS[1]))
    team2["charges"][0]["amount"] = "59.00"
    events.append({"type": "plan.published", "timestamp": ts(START + timedelta(days=20)),
                   "plan": team2, "existing": "keep"})  # fmt: skip
    starter2 = orjson.loads(orjson.dumps(PLANS[0]))
    starter2["charges"][0]["amount"] = "11.00"
    events.append({"type": "plan.published", "timestamp": ts(START + timedelta(days=45)),
                   "plan": starter2, "existing": "next_period"})  # fmt: skip
    bad = {**team2, "currency": "USD"}  # refused: another currency
    events.append({"type": "plan.published", "timestamp": ts(START + timedelta(days=50)),
                   "plan": bad})  # fmt: skip
    events.append({"type": "plan.retired", "timestamp": ts(START + timedelta(days=70)),
                   "plan_id": "legacy"})  # fmt: skip

    event_no = 0
    for n in range(subscriptions):
        sub = f"sub-{n}"
        plan = rng.choice(PLANS)["plan_id"]
        created = at(START, START + timedelta(days=days // 2))
        events.append({"type": "subscription.created", "timestamp": ts(created),
                       "account_id": f"acct-{rng.randrange(accounts)}", "subscription_id": sub,
                       "plan_id": plan})  # fmt: skip
        for _ in range(rng.randrange(25, 60)):
            event_no += 1
            t = at(created, end)
            metric = rng.choice(METRICS[plan] + ["calls"])
            usage: dict[str, Any] = {"type": "usage", "event_id": f"u-{event_no}",
                                     "timestamp": ts(t), "subscription_id": sub, "metric": metric,
                                     "quantity": rng.choice(["1", "5", "12", "130"])}  # fmt: skip
            if metric == "seats":
                usage["properties"] = {"user": f"user-{rng.randrange(6)}"}
            delay = rng.choice([None] * 6 + [2, 30, 24 * 20, 24 * 45, 24 * 100])
            if delay is not None:
                usage["received_at"] = ts(t + timedelta(hours=delay))
            events.append(usage)
            if rng.random() < 0.05:  # a retry, arriving later
                events.append(
                    {**usage, "received_at": ts(t + timedelta(hours=rng.choice([1, 60])))}
                )
        for kind in rng.sample(["change", "coupon", "pause", "cancel", "none"], 3):
            # a cancellation near the end: the subscription is billed for a while first
            t = at(end - timedelta(days=30) if kind == "cancel" else created, end)
            base = {"timestamp": ts(t), "subscription_id": sub}
            if kind == "change":
                events.append({**base, "type": "subscription.plan_changed",
                               "plan_id": rng.choice(PLANS)["plan_id"]})  # fmt: skip
            elif kind == "coupon":
                off = {"percent_off": "15"} if rng.random() < 0.5 else {"amount_off": "7.50"}
                duration = rng.choice(["once", "repeating", "forever"])
                extra = {"periods": 2} if duration == "repeating" else {}
                events.append({**base, "type": "coupon.applied", "coupon_id": f"c-{n}",
                               **off, "duration": duration, **extra})  # fmt: skip
            elif kind == "pause":
                events.append({**base, "type": "subscription.paused"})
                resume = at(t, t + timedelta(days=12))
                events.append({"timestamp": ts(resume), "subscription_id": sub,
                               "type": "subscription.resumed"})  # fmt: skip
            elif kind == "cancel":
                events.append({**base, "type": "subscription.cancelled",
                               "mode": rng.choice(["immediate", "end_of_period"])})  # fmt: skip
    rng.shuffle(events)
    catalog = {"plans": PLANS, "tax_rates": TAX_RATES, "late_usage_periods": 1}
    lines = [orjson.dumps(e).decode() for e in events]
    return History(catalog, lines, end)
