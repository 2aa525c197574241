"""What the API knows for certain, so that it refuses at once (422) what the rating
processor would only dead-letter later, and never refuses what may still be valid.

- The catalog: a usage metric that no plan bills is never billed.
- Subscriptions whose creation this worker accepted (Kafka acknowledged it): their
  account, currency and interval never change, so usage, a plan change, a cancellation, a
  pause, a resume or a coupon under another account, and a plan change to another
  currency or interval, are refused.
  A subscription created any other way (another worker, before a restart, a bulk publish)
  is unknown: its events are accepted, and the rating processor decides as before.
- The current plan changes, and a change the API accepted may still be refused
  downstream (a late event, an ended subscription): "already on this plan" is decided only
  while the creation's plan is certain (no change accepted since) and only by a sole
  worker (another worker may have accepted a change this one did not see).

A subscription owned by another tenant's account is treated as unknown, so that no
answer tells one tenant about another's subscriptions. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from streams.domain.catalog import Catalog, Plan

# beyond this many subscriptions (~60 MB a worker) new ones stay unknown: accepted, and
# decided downstream as before
MAX_KNOWN = 250_000
CREATED, PLAN_CHANGED = "subscription.created", "subscription.plan_changed"


@dataclass(frozen=True, slots=True)
class KnownSubscription:
    account_id: str
    currency: str
    interval: str
    plan_id: str | None  # the current plan while certain, else None


class SubscriptionBook:
    def __init__(
        self,
        catalog: Catalog,
        sole_worker: bool,
        published: Callable[[], Mapping[str, Plan | None]] = dict,
    ) -> None:
        """published: billing.catalog's plans by id, each one's latest version (None: it
        is retired), which a plan id names before the catalog file's."""
        self.catalog = catalog
        self.sole_worker = sole_worker
        self.published = published
        self.billed_metrics = frozenset(
            c.metric for plan in catalog.plans.values() for c in plan.usage_charges
        )
        self.known: dict[str, KnownSubscription] = {}

    def plan(self, plan_id: str) -> Plan | None:
        """The plan a creation or a plan change naming `plan_id` takes, if there is one."""
        published = self.published()
        if plan_id in published:
            return published[plan_id]
        return self.catalog.plans.get(plan_id)

    def plan_refusal(self, plan_id: str) -> str | None:
        """Why a creation or a plan change cannot take `plan_id` (the rating processor's
        words), None if it can."""
        if self.published().get(plan_id, False) is None:
            return f"plan {plan_id!r} is retired"
        return None if self.plan(plan_id) is not None else f"unknown plan {plan_id!r}"

    def bills(self, metric: str) -> bool:
        return metric in self.billed_metrics or any(
            c.metric == metric
            for plan in self.published().values()
            if plan is not None
            for c in plan.usage_charges
        )

    def _known(
        self, record: dict[str, Any], owns: Callable[[str], bool]
    ) -> KnownSubscription | None:
        known = self.known.get(record["subscription_id"])
        return known if known is not None and owns(known.account_id) else None

    @staticmethod
    def _foreign(record: dict[str, Any], known: KnownSubscription) -> str | None:
        if known.account_id == record["account_id"]:
            return None
        return (f"subscription_id: {record['subscription_id']!r} is not a subscription of "
                f"account {record['account_id']!r}")  # fmt: skip

    def usage_problem(self, record: dict[str, Any], owns: Callable[[str], bool]) -> str | None:
        """Why a valid usage event is certain to be refused downstream, if it is."""
        if not self.bills(record["metric"]):
            return f"metric: no plan of the catalog bills {record['metric']!r}"
        known = self._known(record, owns)
        return None if known is None else self._foreign(record, known)

    def subscription_problem(
        self, record: dict[str, Any], owns: Callable[[str], bool]
    ) -> str | None:
        """Why a valid subscription event is certain to be refused downstream, if it is."""
        if record["type"] == CREATED:
            return None
        known = self._known(record, owns)
        if known is None:
            return None
        foreign = self._foreign(record, known)
        if foreign or record["type"] != PLAN_CHANGED:
            return foreign
        plan = self.plan(record["plan_id"])
        if plan is None:  # validated, then retired meanwhile: rating says so
            return None
        if plan.currency != known.currency:
            return f"plan_id: a change to another currency ({known.currency} -> {plan.currency})"
        if plan.interval != known.interval:
            return f"plan_id: a change to another interval ({known.interval} -> {plan.interval})"
        if self.sole_worker and known.plan_id == plan.plan_id:
            return f"plan_id: the subscription is already on plan {plan.plan_id!r}"
        return None

    def accepted(self, record: dict[str, Any]) -> None:
        """Note a subscription event that Kafka acknowledged."""
        sub = record["subscription_id"]
        if record["type"] == CREATED:
            # the first creation wins: a second one is dead-lettered as a duplicate
            plan = self.plan(record["plan_id"])
            if sub not in self.known and len(self.known) < MAX_KNOWN and plan is not None:
                self.known[sub] = KnownSubscription(
                    record["account_id"], plan.currency, str(plan.interval), plan.plan_id
                )
        elif record["type"] == PLAN_CHANGED:
            known = self.known.get(sub)
            if known is not None and known.plan_id is not None:
                self.known[sub] = replace(known, plan_id=None)
