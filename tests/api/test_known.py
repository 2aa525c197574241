"""What the API refuses at once because the rating processor is certain to refuse it,
and what it must accept because it cannot know (streams.api.known)."""

from __future__ import annotations

import json
from typing import Any

from streams.api.known import SubscriptionBook
from streams.domain.catalog import Catalog
from streams.testbed.demo import DEMO_CATALOG

CATALOG = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))


def acme(account: str) -> bool:
    return account.startswith("acme-")


def usage(account: str = "acme-1", sub: str = "s-1", metric: str = "api_calls") -> dict:
    return {"account_id": account, "subscription_id": sub, "metric": metric}


def event(kind: str, account: str = "acme-1", sub: str = "s-1", plan: str | None = None) -> dict:
    return {"type": f"subscription.{kind}", "account_id": account, "subscription_id": sub,
            "plan_id": plan}  # fmt: skip


def book_with(*created: dict[str, Any], sole_worker: bool = True) -> SubscriptionBook:
    book = SubscriptionBook(CATALOG, sole_worker)
    for e in created:
        book.accepted(e)
    return book


def test_a_metric_no_plan_bills_is_refused_whatever_the_subscription() -> None:
    book = book_with()
    assert book.usage_problem(usage(metric="api_calls"), acme) is None
    assert book.usage_problem(usage(metric="seats"), acme) is None
    assert book.usage_problem(usage(metric="cpu_hours"), acme) == (
        "metric: no plan of the catalog bills 'cpu_hours'"
    )


def test_an_unknown_subscription_is_never_refused() -> None:
    book = book_with()
    assert book.usage_problem(usage(account="acme-2"), acme) is None
    assert book.subscription_problem(event("plan_changed", plan="starter-eur"), acme) is None
    assert book.subscription_problem(event("plan_changed", plan="pro-usd"), acme) is None
    assert book.subscription_problem(event("cancelled", account="acme-2"), acme) is None


def test_a_known_subscription_refuses_another_account() -> None:
    book = book_with(event("created", plan="pro-usd"))
    assert book.usage_problem(usage(), acme) is None
    problem = "subscription_id: 's-1' is not a subscription of account 'acme-2'"
    assert book.usage_problem(usage(account="acme-2"), acme) == problem
    assert book.subscription_problem(event("cancelled", account="acme-2"), acme) == problem
    assert book.subscription_problem(event("cancelled"), acme) is None
    # another tenant's subscription is unknown to this tenant: nothing tells it exists
    globex = book_with(event("created", account="globex-1", plan="pro-usd"))
    assert globex.usage_problem(usage(account="acme-1"), acme) is None
    # a second creation never overwrites what the first one said
    book.accepted(event("created", account="acme-9", plan="starter-eur"))
    assert book.usage_problem(usage(account="acme-9"), acme) is not None


def test_a_plan_change_keeps_currency_and_interval_and_changes_the_plan() -> None:
    book = book_with(event("created", plan="pro-usd"))
    assert book.subscription_problem(event("plan_changed", plan="starter-eur"), acme) == (
        "plan_id: a change to another currency (USD -> EUR)"
    )
    assert book.subscription_problem(event("plan_changed", plan="scale-usd-yearly"), acme) == (
        "plan_id: a change to another interval (month -> year)"
    )
    assert book.subscription_problem(event("plan_changed", plan="pro-usd"), acme) == (
        "plan_id: the subscription is already on plan 'pro-usd'"
    )
    # several workers: another one may have changed the plan already
    shared = book_with(event("created", plan="pro-usd"), sole_worker=False)
    assert shared.subscription_problem(event("plan_changed", plan="pro-usd"), acme) is None
    # once a change was accepted the current plan is no longer certain (it may be refused
    # downstream): only currency and interval are still decided
    book.accepted(event("plan_changed", plan="growth-eur"))
    assert book.subscription_problem(event("plan_changed", plan="pro-usd"), acme) is None
    assert book.subscription_problem(event("plan_changed", plan="team-jpy"), acme) is not None


def test_pauses_resumes_and_coupons_of_a_known_subscription_keep_its_account() -> None:
    """Version 2's subscription events: under another account, certain to be refused;
    accepted otherwise (whether it is paused, or the coupon fits, is rating's to say), and
    they change nothing the book knows."""
    book = book_with(event("created", plan="pro-usd"))
    coupon = {"type": "coupon.applied", "account_id": "acme-1", "subscription_id": "s-1"}
    problem = "subscription_id: 's-1' is not a subscription of account 'acme-2'"
    for e in (event("paused"), event("resumed"), coupon):
        assert book.subscription_problem(e, acme) is None
        assert book.subscription_problem({**e, "account_id": "acme-2"}, acme) == problem
        assert book.subscription_problem({**e, "subscription_id": "s-9"}, acme) is None
        book.accepted(e)
    assert book.subscription_problem(event("plan_changed", plan="pro-usd"), acme) == (
        "plan_id: the subscription is already on plan 'pro-usd'"
    )


def test_a_plan_refusal_says_unknown_or_retired_in_the_rating_processors_words() -> None:
    plan_id = next(iter(CATALOG.plans))
    published = {plan_id: None, "fresh": CATALOG.plans[plan_id]}  # retired, and a new one
    book = SubscriptionBook(CATALOG, True, published=lambda: published)
    assert book.plan_refusal(plan_id) == f"plan {plan_id!r} is retired"
    assert book.plan_refusal("fresh") is None
    assert book.plan_refusal("gold") == "unknown plan 'gold'"
    assert SubscriptionBook(CATALOG, True).plan_refusal(plan_id) is None
