"""billing.catalog's records: a plan's whole history, refused whole if the rating contract
would refuse any step of it, and the catalog events a rating worker derives from them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from streams.catalog_history import (
    SINCE_ALWAYS,
    CatalogView,
    catalog_events,
    file_histories,
    from_record,
    publish,
    retire,
    same_plan,
    to_record,
)
from streams.codec import codec
from streams.domain.catalog import Catalog, CatalogError, parse_plan
from streams.domain.events import PlanPublished, PlanRetired
from streams.domain.timestamps import parse_timestamp
from streams.kafka.topics import CATALOG

T0 = parse_timestamp("2026-03-01T00:00:00Z")


def plan(amount: str = "10.00", currency: str = "EUR", plan_id: str = "basic", **extra):
    return parse_plan({"plan_id": plan_id, "currency": currency, "interval": "month",
                       "charges": [{"charge_id": "fee", "model": "flat", "amount": amount}],
                       **extra})  # fmt: skip


def test_versions_are_numbered_in_order_and_survive_the_topic_record() -> None:
    h = publish(None, plan(), SINCE_ALWAYS)
    h = publish(h, plan("12.00", trial_days=7), T0, "next_period")
    h = retire(h, "basic", T0 + timedelta(days=1))
    assert [v.plan.version for v in h.versions] == [1, 2]
    assert h.latest.trial_days == 7 and h.versions[1].existing == "next_period"
    avro = codec(CATALOG.schema)
    back = from_record(avro.decode(avro.encode(to_record(h))))
    assert back == h


@pytest.mark.parametrize(
    "step, message",
    [
        (lambda h: publish(h, plan(currency="USD"), T0), "must keep its currency"),
        (lambda h: publish(retire(h, "basic", T0), plan("11.00"), T0), "is retired"),
        (lambda h: retire(retire(h, "basic", T0), "basic", T0), "already retired"),
        (lambda h: publish(h, plan("11.00"), T0, "sometimes"), "keep or next_period"),
        (lambda h: publish(h, plan(plan_id="pro"), T0), "is not 'basic'"),
        (
            lambda h: publish(publish(h, plan("11.00"), T0), plan("12.00"), SINCE_ALWAYS),
            "published after",
        ),
    ],
)
def test_what_the_contract_refuses_is_refused_with_its_reason(step, message) -> None:
    with pytest.raises(CatalogError, match=message):
        step(publish(None, plan(), SINCE_ALWAYS))


def test_a_record_the_contract_would_refuse_is_refused_whole() -> None:
    rec = to_record(publish(publish(None, plan(), SINCE_ALWAYS), plan("11.00"), T0))
    rec["versions"][1]["plan"] = rec["versions"][1]["plan"].replace('"EUR"', '"USD"')
    with pytest.raises(CatalogError, match="currency"):
        from_record(rec)
    rec = to_record(publish(None, plan(), SINCE_ALWAYS))
    rec["versions"][0]["version"] = 2
    with pytest.raises(CatalogError, match="version 2 where 1 was due"):
        from_record(rec)


def test_events_are_ordered_by_instant_then_plan_whatever_the_order_read() -> None:
    a = publish(publish(None, plan(plan_id="a"), SINCE_ALWAYS), plan("2.00", plan_id="a"), T0)
    b = retire(publish(None, plan(plan_id="b"), T0), "b", T0)
    events = catalog_events([b, a])
    assert events == catalog_events([a, b])
    assert [(at, type(e).__name__, getattr(e, "plan_id", None) or e.plan.plan_id)
            for at, e in events] == [
        (SINCE_ALWAYS, "PlanPublished", "a"), (T0, "PlanPublished", "a"),
        (T0, "PlanPublished", "b"), (T0, "PlanRetired", "b")]  # fmt: skip


def test_a_view_applies_each_event_once_as_its_clock_reaches_it() -> None:
    h = publish(publish(None, plan(), SINCE_ALWAYS), plan("12.00"), T0, "next_period")
    events = catalog_events([h])
    view = CatalogView()
    view.advance(events, T0 - timedelta(seconds=1))
    assert view.book.latest("basic").version == 1 and not view.book.next_period
    view.advance(events, T0)
    view.advance(events, T0)  # again: nothing twice
    assert view.book.latest("basic").version == 2 and len(view.book.versions["basic"]) == 2
    assert view.book.next_period["basic"].version == 2
    view.apply(PlanRetired(T0, "basic"))
    assert not view.apply(PlanRetired(T0, "basic"))  # once
    assert not view.apply(PlanPublished(T0, h.versions[0].plan))


def test_a_catalog_file_gives_version_1_of_each_plan_since_always() -> None:
    cat = Catalog({"basic": plan(), "pro": plan("20.00", plan_id="pro")})
    histories = file_histories(cat)
    assert {pid: [(v.plan.version, v.published_at) for v in h.versions]
            for pid, h in histories.items()} == {
        "basic": [(1, SINCE_ALWAYS)], "pro": [(1, SINCE_ALWAYS)]}  # fmt: skip
    assert same_plan(histories["basic"].latest, plan())
    assert not same_plan(histories["basic"].latest, plan("10.01"))


def test_a_subscription_record_keeps_its_payment_method_and_plans() -> None:
    from streams.domain.billing import ContractRun
    from streams.domain.billing_snapshot import subscription_from_bytes, subscription_to_bytes
    from streams.domain.events import SubscriptionCreated

    run = ContractRun(Catalog({"basic": plan()}))
    run.apply(SubscriptionCreated(T0, "acct", "s1", "basic", "tok_visa"), T0)
    back = subscription_from_bytes(subscription_to_bytes(run.subs["s1"]))
    assert back.payment_method == "tok_visa"
    assert back.plan == plan() and back.segment is not None and back.segment.plan == plan()
