"""A deterministic generator of subscriptions and usage (demo and benchmarks).

Account i subscribes at ``base + i * window / n`` to plan ``i mod plans`` and reports a
seeded-random number of usage events inside its first period, so every run with the same
arguments publishes byte-identical events (a second run is a replay, not new data).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from streams.domain.catalog import Catalog
from streams.domain.periods import period_bounds

DEFAULT_BASE = datetime(2026, 1, 1, tzinfo=UTC)
# every first period ends in Feb 2026, before the demo's bill-run instant
DEFAULT_WINDOW = timedelta(days=27)
DEFAULT_UNTIL = datetime(2026, 2, 28, tzinfo=UTC)


@dataclass(frozen=True)
class Dataset:
    accounts: int
    seed: int = 42
    base: datetime = DEFAULT_BASE
    window: timedelta = DEFAULT_WINDOW
    usage_per_subscription: tuple[int, int] = (3, 15)

    @property
    def prefix(self) -> str:
        # datasets of different sizes never share accounts; the same one is a replay
        return f"acct-n{self.accounts}-s{self.seed}-"

    def account(self, i: int) -> str:
        return f"{self.prefix}{i:07d}"

    def subscription(self, i: int) -> str:
        return f"sub-n{self.accounts}-s{self.seed}-{i:07d}"

    def anchor(self, i: int) -> datetime:
        step = self.window / self.accounts
        return (self.base + step * i).replace(microsecond=0)


def subscription_events(ds: Dataset, catalog: Catalog) -> Iterator[dict]:
    """subscription.created records (Avro shape of billing.subscriptions)."""
    plans = sorted(catalog.plans)
    for i in range(ds.accounts):
        yield {
            "event_id": f"{ds.subscription(i)}-created",
            "type": "subscription.created",
            "timestamp": ds.anchor(i),
            "account_id": ds.account(i),
            "subscription_id": ds.subscription(i),
            "plan_id": plans[i % len(plans)],
            "mode": None,
            "payment_method": f"tok_{ds.account(i)}",
        }


def usage_events(ds: Dataset, catalog: Catalog) -> Iterator[dict]:
    """Usage records (Avro shape of billing.usage), inside each first period."""
    rng = random.Random(ds.seed)
    plans = sorted(catalog.plans)
    for i in range(ds.accounts):
        plan = catalog.plan(plans[i % len(plans)])
        metrics = sorted({c.metric for c in plan.usage_charges}) or ["api_calls"]
        start, end = period_bounds(ds.anchor(i), plan.interval, 0)
        # usage within the first 27 days: inside the first period of every interval
        span = int((min(end, start + timedelta(days=27)) - start).total_seconds()) - 1
        for j in range(rng.randint(*ds.usage_per_subscription)):
            yield {
                "event_id": f"{ds.subscription(i)}-u{j}",
                "timestamp": start + timedelta(seconds=rng.randint(0, span)),
                "account_id": ds.account(i),
                "subscription_id": ds.subscription(i),
                "metric": metrics[j % len(metrics)],
                "quantity": Decimal(
                    rng.randint(1, 40 if metrics[j % len(metrics)] == "seats" else 1000)
                ),
            }


def expected_invoices(ds: Dataset, catalog: Catalog, until: datetime) -> int:
    """One invoice at creation plus one per period end <= until (no plan changes here)."""
    plans = sorted(catalog.plans)
    count = 0
    for i in range(ds.accounts):
        plan = catalog.plan(plans[i % len(plans)])
        count += 1
        k = 0
        while period_bounds(ds.anchor(i), plan.interval, k)[1] <= until:
            count += 1
            k += 1
    return count
