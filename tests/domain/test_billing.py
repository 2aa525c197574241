"""The rating contract, version 2 (rules 10-22), through the offline rater and the domain's
ContractRun: the shared worked examples, one test per rule edge, and hypothesis properties
(version-1 inputs rate exactly as the version-1 state machine does; a pause resumed at once
nets to zero; a `keep` version never changes an existing subscription; unique_count never
exceeds count)."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.billing import Tally, run_contract
from streams.domain.catalog import Catalog
from streams.domain.events import PlanPublished, Usage, parse_event
from streams.domain.invoice import invoice_to_contract_dict, invoice_to_dict
from streams.domain.timestamps import format_timestamp, parse_timestamp
from streams.offline import rate_events

from .test_properties import PROP, UNTIL, rate, scenarios

EXAMPLES = Path(__file__).parents[1] / "data" / "contract-v2"
# README.md of the examples: the events (1-based lines) that must be dead letters
EXAMPLE_DEAD = {
    "01-versions-and-retirement": [7],
    "02-trial-pause-resume": [6],
    "03-percentage-and-latest": [],
    "04-grace-and-late-usage": [6],
    "05-coupon-tax-credit": [],
}


def _without_id(inv: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in inv.items() if k != "invoice_id"}, sort_keys=True)


@pytest.mark.parametrize("name", sorted(EXAMPLE_DEAD))
def test_worked_example_of_the_contract(name: str) -> None:
    folder = EXAMPLES / name
    catalog = Catalog.from_dict(json.loads((folder / "catalog.json").read_text()))
    until = parse_timestamp((folder / "until").read_text().strip())
    result = rate_events(catalog, (folder / "events.jsonl").read_text().splitlines(), until)
    got = sorted(_without_id(invoice_to_contract_dict(i)) for i in result.invoices)
    expected = sorted(_without_id(json.loads(ln)) for ln in (folder / "expected.jsonl").open())
    assert got == expected  # every field as a string, quantities' digits too
    assert [d["line"] for d in result.dead_letters] == EXAMPLE_DEAD[name]


# --- one rule at a time -----------------------------------------------------------------

PLANS = [
    {"plan_id": "team", "currency": "EUR", "interval": "month", "charges": [
        {"charge_id": "fee", "model": "flat", "amount": "30.00"},
        {"charge_id": "calls", "model": "per_unit", "metric": "calls", "aggregation": "sum",
         "unit_amount": "0.10"}]},
    {"plan_id": "pro", "currency": "EUR", "interval": "month", "charges": [
        {"charge_id": "fee", "model": "flat", "amount": "90.00"}]},
    {"plan_id": "trial", "currency": "EUR", "interval": "month", "trial_days": 14, "charges": [
        {"charge_id": "fee", "model": "flat", "amount": "20.00"}]},
    {"plan_id": "usd", "currency": "USD", "interval": "month", "charges": []},
]  # fmt: skip


def rated(events: list[dict], until: str = "2026-06-01T00:00:00Z", **catalog: Any):
    cat = Catalog.from_dict({"plans": PLANS, **catalog})
    result = rate_events(cat, [json.dumps(e) for e in events], parse_timestamp(until))
    invoices = [invoice_to_contract_dict(i) for i in result.invoices]
    return invoices, [d["reason"] for d in result.dead_letters]


def ev(kind: str, at: str, **fields: Any) -> dict:
    sub = {} if kind.split(".")[0] in ("plan", "customer", "credit") else {"subscription_id": "s"}
    return {"type": kind, "timestamp": at, **sub, **fields}


def created(at: str, plan: str = "team", account: str = "a") -> dict:
    return ev("subscription.created", at, account_id=account, plan_id=plan)


def use(at: str, qty: str, event_id: str, received: str | None = None, **props: str) -> dict:
    e = ev("usage", at, event_id=event_id, metric="calls", quantity=qty)
    if received:
        e["received_at"] = received
    if props:
        e["properties"] = props
    return e


def summary(inv: dict) -> tuple:
    return (inv["reason"], inv["issued_at"][:10], inv["total"],
            [(ln["kind"], ln["charge_id"], ln["amount"]) for ln in inv["lines"]])  # fmt: skip


def test_a_trial_issues_nothing_until_its_end_and_a_plan_change_inside_keeps_the_end() -> None:
    invoices, dead = rated([
        created("2026-03-01T00:00:00Z", "trial"),
        ev("subscription.plan_changed", "2026-03-05T00:00:00Z", plan_id="pro"),
        ev("subscription.paused", "2026-03-06T00:00:00Z"),
    ], until="2026-04-20T00:00:00Z")  # fmt: skip
    assert [summary(i) for i in invoices] == [
        ("trial_ended", "2026-03-15", "90.00", [("flat", "fee", "90.00")]),
        ("period_end", "2026-04-15", "90.00", [("flat", "fee", "90.00")]),
    ]
    assert dead == ["only an active subscription can pause (this one is trialing)"]


@pytest.mark.parametrize(
    "mode, ended", [("immediate", "2026-03-05"), ("end_of_period", "2026-03-15")]
)
def test_a_cancelled_trial_issues_nothing(mode: str, ended: str) -> None:
    invoices, dead = rated([
        created("2026-03-01T00:00:00Z", "trial"),
        ev("subscription.cancelled", "2026-03-05T00:00:00Z", mode=mode),
        use("2026-03-04T00:00:00Z", "1", "before"),  # trial usage: accepted, never billed
        use(f"{ended}T00:00:00Z", "1", "after"),
    ])  # fmt: skip
    assert invoices == []
    assert dead == ["subscription has ended"]


def test_pause_and_resume_rules() -> None:
    invoices, dead = rated([
        created("2026-03-01T00:00:00Z"),
        use("2026-03-02T00:00:00Z", "10", "u1"),
        ev("subscription.paused", "2026-03-17T00:00:00Z"),
        ev("subscription.paused", "2026-03-18T00:00:00Z"),
        ev("subscription.plan_changed", "2026-03-19T00:00:00Z", plan_id="pro"),
        use("2026-03-20T00:00:00Z", "1", "u2"),
        ev("subscription.resumed", "2026-05-16T12:00:00Z"),
        ev("subscription.resumed", "2026-05-17T00:00:00Z"),
        # in the pause, arriving after the resume: outside any billable span
        use("2026-04-20T00:00:00Z", "1", "u3", received="2026-05-20T00:00:00Z"),
    ])  # fmt: skip
    assert [summary(i) for i in invoices] == [
        ("created", "2026-03-01", "30.00", [("flat", "fee", "30.00")]),
        # 15 of 31 days credited: 30 x 15/31 = 14.516...
        ("paused", "2026-03-17", "-13.52",
         [("usage", "calls", "1.00"), ("proration_credit", "fee", "-14.52")]),
        # May 16 12:00 -> Jun 1: 15.5 of 31 days: 15.00
        ("resumed", "2026-05-16", "15.00", [("proration_charge", "fee", "15.00")]),
        ("period_end", "2026-06-01", "30.00",
         [("usage", "calls", "0.00"), ("flat", "fee", "30.00")]),
    ]  # fmt: skip
    assert invoices[2]["credit_applied"] == "13.52" and invoices[2]["amount_due"] == "1.48"
    assert dead == [
        "only an active subscription can pause (this one is paused)",
        "plan change while paused",
        "subscription is paused",
        "only a paused subscription can resume",
        "usage outside any billable span of its subscription",
    ]


def test_cancelling_a_paused_subscription_ends_it_with_no_invoice() -> None:
    invoices, dead = rated([
        created("2026-03-01T00:00:00Z"),
        ev("subscription.paused", "2026-03-10T00:00:00Z"),
        ev("subscription.cancelled", "2026-04-10T00:00:00Z", mode="end_of_period"),
        ev("subscription.resumed", "2026-04-11T00:00:00Z"),
    ])  # fmt: skip
    assert [i["reason"] for i in invoices] == ["created", "paused"]
    assert dead == ["subscription has ended"]


def test_versions_next_period_moves_at_resume_and_retired_plans_refuse_new_subscriptions() -> None:
    published = {"plan_id": "team", "currency": "EUR", "interval": "month",
                 "charges": [{"charge_id": "fee", "model": "flat", "amount": "62.00"}]}  # fmt: skip
    invoices, dead = rated([
        created("2026-03-01T00:00:00Z"),
        ev("subscription.paused", "2026-03-11T00:00:00Z"),
        ev("plan.published", "2026-03-12T00:00:00Z", plan=published, existing="next_period"),
        ev("plan.published", "2026-03-13T00:00:00Z", existing="keep",
           plan={**published, "currency": "USD"}),
        ev("plan.retired", "2026-03-14T00:00:00Z", plan_id="team"),
        ev("plan.retired", "2026-03-14T00:00:00Z", plan_id="nope"),
        ev("subscription.resumed", "2026-04-01T00:00:00Z"),  # a whole period: the new 62.00
        created("2026-04-02T00:00:00Z") | {"subscription_id": "s2"},
        ev("plan.published", "2026-04-03T00:00:00Z", plan=published),
    ], until="2026-05-01T00:00:00Z")  # fmt: skip
    assert [summary(i)[:3] for i in invoices] == [
        ("created", "2026-03-01", "30.00"),
        ("paused", "2026-03-11", "-20.32"),  # 30 x 21/31 = 20.322...
        ("resumed", "2026-04-01", "62.00"),
        ("period_end", "2026-05-01", "62.00"),  # the new version: no calls charge
    ]
    assert dead == [
        "a new version of 'team' must keep its currency and interval (EUR/month, got USD/month)",
        "unknown plan 'nope'",
        "plan 'team' is retired",
        "plan 'team' is retired",
    ]


def test_percentage_unique_count_and_latest_charges() -> None:
    plans = [{"plan_id": "m", "currency": "EUR", "interval": "month", "charges": [
        {"charge_id": "take", "model": "percentage", "metric": "calls", "aggregation": "sum",
         "rate": "0.1", "fixed_amount": "0.25"},
        {"charge_id": "users", "model": "per_unit", "metric": "calls",
         "aggregation": "unique_count", "field": "user", "unit_amount": "1"},
        {"charge_id": "last", "model": "per_unit", "metric": "calls", "aggregation": "latest",
         "unit_amount": "1"}]}]  # fmt: skip
    cat = Catalog.from_dict({"plans": plans})
    events = [created("2026-03-01T00:00:00Z", "m"),
              use("2026-03-03T00:00:00Z", "7", "a", user="ann", page="p1"),
              use("2026-03-02T00:00:00Z", "5", "b", user="bob"),
              use("2026-03-03T00:00:00Z", "4", "c", user="ann"),  # same instant: the later one
              use("2026-03-01T00:00:00Z", "9", "d"),  # no user: adds nothing to the count
              use("2026-03-01T00:00:00Z", "9", "d")]  # a repeat: ignored  # fmt: skip
    result = rate_events(cat, [json.dumps(e) for e in events],
                         parse_timestamp("2026-04-01T00:00:00Z"))  # fmt: skip
    lines = invoice_to_contract_dict(result.invoices[-1])["lines"]
    # take: 25 x 0.1 + 4 events x 0.25 = 3.50
    assert [(ln["charge_id"], ln["quantity"], ln["amount"]) for ln in lines] == [
        ("take", "25", "3.50"), ("users", "2", "2.00"), ("last", "4", "4.00")]  # fmt: skip
    # only the counted property's values are kept in the state, not every property's
    (seg,) = [s for s in result.run.subs["s"].closed if s.tallies]
    assert set(seg.tallies["calls"].uniques) == {"user"}


def test_customers_tax_exemption_and_grace_apply_to_invoices_finalized_after_them() -> None:
    invoices, dead = rated([
        ev("customer.updated", "2026-02-01T00:00:00Z", account_id="a", country="FR",
           grace_hours=24),
        created("2026-03-01T00:00:00Z"),
        ev("customer.updated", "2026-04-01T12:00:00Z", account_id="a", tax_exempt=True),
        ev("customer.updated", "2026-04-02T00:00:00Z", account_id="a", country="fr"),
    ], until="2026-05-01T00:00:00Z", tax_rates=[{"country": "FR", "rate": "0.2"}])  # fmt: skip
    got = [(i["reason"], i["finalized_at"], i["total"], i["lines"][-1]["kind"]) for i in invoices]
    assert got == [
        ("created", "2026-03-01T00:00:00Z", "36.00", "tax"),
        # issued at Apr 1 with a 24 h grace: finalized after the exemption, so no tax
        ("period_end", "2026-04-02T00:00:00Z", "30.00", "flat"),
    ]  # fmt: skip
    assert dead == ["country must be an ISO 3166-1 alpha-2 code, got 'fr'"]


def test_coupons_once_forever_amount_and_for_unknown_subscriptions() -> None:
    def coupon(at: str, **kw: Any) -> dict:
        return ev("coupon.applied", at, coupon_id=kw.pop("coupon_id", "c"), **kw)

    invoices, dead = rated([
        created("2026-03-01T00:00:00Z"),
        coupon("2026-03-02T00:00:00Z", amount_off="50", duration="forever"),
        coupon("2026-03-02T00:00:00Z", subscription_id="nope", percent_off="10", duration="once"),
        coupon("2026-03-02T00:00:00Z", percent_off="10", amount_off="1", duration="once"),
        coupon("2026-04-02T00:00:00Z", coupon_id="p", percent_off="33.333", duration="once"),
    ], until="2026-06-01T00:00:00Z")  # fmt: skip
    assert [(i["total"], [ln["amount"] for ln in i["lines"] if ln["kind"] == "discount"])
            for i in invoices] == [
        ("30.00", []),  # before the coupon
        ("0.00", ["-30.00"]),  # min(50, 30)
        ("20.00", ["-10.00"]),  # 30 x 33.333 % = 9.9999 -> 10.00, replacing the forever one
        ("30.00", []),  # once: used
    ]  # fmt: skip
    # an invalid event is refused when it is read, before the run
    assert dead == [
        "a coupon has exactly one of percent_off and amount_off",
        "unknown subscription",
    ]


def test_credit_is_granted_once_and_negative_totals_are_carried() -> None:
    grant = ev("credit.granted", "2026-02-01T00:00:00Z", credit_id="g1", account_id="a",
               currency="EUR", amount="10")  # fmt: skip
    invoices, dead = rated([
        grant, grant,
        ev("credit.granted", "2026-02-01T00:00:00Z", credit_id="g2", account_id="a",
           currency="EUR", amount="0.001"),
        created("2026-03-01T00:00:00Z"),
        ev("subscription.plan_changed", "2026-03-16T12:00:00Z", plan_id="pro"),
        ev("subscription.plan_changed", "2026-03-16T12:00:00Z", plan_id="team"),
    ], until="2026-04-01T00:00:00Z")  # fmt: skip
    # (the two plan changes at one instant print in invoice id order)
    assert sorted(
        (i["reason"], i["total"], i["credit_applied"], i["amount_due"]) for i in invoices
    ) == [
        ("created", "30.00", "10.00", "20.00"),
        ("period_end", "30.00", "30.00", "0.00"),  # the balance from the second change
        ("plan_changed", "-30.00", "0.00", "0.00"),  # -45 + 15: 30 into the balance
        ("plan_changed", "30.00", "0.00", "30.00"),  # -15 + 45, processed first
    ]
    assert dead == ["amount '0.001' has more digits than EUR has"]


def test_a_balance_larger_than_the_total_pays_it_all_and_the_rest_carries_on() -> None:
    invoices, _ = rated([
        ev("credit.granted", "2026-02-01T00:00:00Z", credit_id="big", account_id="a",
           currency="EUR", amount="50.00"),
        ev("credit.granted", "2026-02-01T00:00:00Z", credit_id="usd", account_id="a",
           currency="USD", amount="50.00"),  # another currency: another balance
        created("2026-03-01T00:00:00Z"),
    ], until="2026-05-01T00:00:00Z")  # fmt: skip
    assert [(i["total"], i["credit_applied"], i["amount_due"]) for i in invoices] == [
        ("30.00", "30.00", "0.00"),
        ("30.00", "20.00", "10.00"),
        ("30.00", "0.00", "30.00"),
    ]


def test_late_usage_on_an_ended_subscription_gets_an_adjustment_invoice_a_day_later() -> None:
    invoices, dead = rated([
        created("2026-03-01T00:00:00Z"),
        ev("subscription.plan_changed", "2026-03-10T00:00:00Z", plan_id="pro"),
        ev("subscription.plan_changed", "2026-03-20T00:00:00Z", plan_id="team"),
        ev("subscription.cancelled", "2026-03-25T00:00:00Z", mode="immediate"),
        use("2026-03-05T00:00:00Z", "10", "late1", received="2026-04-02T00:00:00Z"),
        use("2026-03-15T00:00:00Z", "10", "other-plan", received="2026-04-02T06:00:00Z"),
        use("2026-03-06T00:00:00Z", "5", "late2", received="2026-04-02T12:00:00Z"),
        use("2026-03-06T00:00:00Z", "5", "late2", received="2026-04-02T13:00:00Z"),
        use("2026-03-07T00:00:00Z", "1", "late3", received="2026-04-04T00:00:00Z"),
        use("2026-03-08T00:00:00Z", "1", "too-late", received="2026-06-01T00:00:00Z"),
        use("2026-04-01T00:00:00Z", "1", "future", received="2026-03-30T00:00:00Z"),
    ], until="2026-07-01T00:00:00Z")  # fmt: skip
    adjustments = [summary(i) for i in invoices if i["reason"] == "adjustment"]
    assert adjustments == [
        ("adjustment", "2026-04-03", "1.50", [("usage_adjustment", "calls", "1.50")]),
        ("adjustment", "2026-04-05", "0.10", [("usage_adjustment", "calls", "0.10")]),
    ]
    first = next(i for i in invoices if i["reason"] == "adjustment")
    assert first["lines"][0]["period_start"] == "2026-03-01T00:00:00Z"
    assert first["lines"][0]["period_end"] == "2026-03-10T00:00:00Z"
    assert first["lines"][0]["quantity"] == "15"
    assert dead == ["usage timestamp is later than its arrival",
                    "late usage older than late_usage_periods"]  # fmt: skip


def test_an_invoice_without_lines_gets_a_tax_line_without_a_period() -> None:
    invoices, _ = rated([
        ev("customer.updated", "2026-02-01T00:00:00Z", account_id="a", country="US"),
        created("2026-03-01T00:00:00Z", "usd"),
    ], until="2026-03-02T00:00:00Z", tax_rates=[{"country": "US", "rate": "0.07"}])  # fmt: skip
    assert invoices[0]["lines"] == [
        {"charge_id": "tax:US", "kind": "tax", "period_start": None, "period_end": None,
         "quantity": "0", "amount": "0.00"}
    ]  # fmt: skip


def test_events_are_processed_in_arrival_order_and_after_until_are_not() -> None:
    invoices, dead = rated([
        created("2026-03-01T00:00:00Z"),
        use("2026-03-31T00:00:00Z", "10", "inside", received="2026-04-01T00:00:00Z"),
        use("2026-03-30T00:00:00Z", "10", "deferred", received="2026-06-02T00:00:00Z"),
    ], until="2026-06-01T00:00:00Z", late_usage_periods=0)  # fmt: skip
    # arriving exactly at the period end: the period is invoiced first, so the usage is late
    # (k = k(arrival) - 1 < k(arrival) - 0): a dead letter with no late window
    assert dead == ["late usage older than late_usage_periods"]
    assert [i["total"] for i in invoices] == ["30.00", "30.00", "30.00", "30.00"]


# --- properties -------------------------------------------------------------------------


def _v1_view(invoices, *, credit: bool = True) -> list[dict]:
    """The public JSON and reason, by invoice id; without the credit balance's fields when
    compared with the version-1 state machine, which has none."""
    drop = () if credit else ("credit_applied", "amount_due")
    return sorted(
        ({**{k: v for k, v in invoice_to_dict(i).items() if k not in drop}, "reason": i.reason}
         for i in invoices),
        key=lambda d: d["invoice_id"],
    )  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(scenarios())
def test_version_1_inputs_rate_as_the_version_1_state_machine_does(evs) -> None:
    _, v1_invoices, v1_rejections = rate(evs)
    run, dead, _, _ = run_contract(PROP, [(e, n) for n, e in enumerate(evs)], UNTIL)
    assert _v1_view(run.invoices, credit=False) == _v1_view(v1_invoices, credit=False)
    assert len(dead) == len(v1_rejections)


@settings(max_examples=80, deadline=None)
@given(
    plan=st.sampled_from("aby"),
    created_after=st.integers(0, 400 * 86400),
    paused_after=st.integers(0, 90 * 86400 * 10**6),
)
def test_a_pause_resumed_at_once_nets_to_zero(
    plan: str, created_after: int, paused_after: int
) -> None:
    t0 = parse_timestamp("2024-01-31T10:00:00Z") + timedelta(seconds=created_after)
    t = t0 + timedelta(microseconds=paused_after)
    events = [
        {"type": "subscription.created", "timestamp": format_timestamp(t0), "account_id": "a",
         "subscription_id": "s", "plan_id": plan},
        {"type": "subscription.paused", "timestamp": format_timestamp(t), "subscription_id": "s"},
        {"type": "subscription.resumed", "timestamp": format_timestamp(t), "subscription_id": "s"},
    ]  # fmt: skip
    run, dead, _, _ = run_contract(PROP, [(parse_event(e), 0) for e in events], t)
    assert dead == []
    credits = {ln.charge_id: ln.amount for i in run.invoices if i.reason == "paused"
               for ln in i.lines if ln.kind == "proration_credit"}  # fmt: skip
    charges = {ln.charge_id: ln.amount for i in run.invoices if i.reason == "resumed"
               for ln in i.lines}  # fmt: skip
    assert credits and {c: -a for c, a in credits.items()} == charges


@settings(max_examples=60, deadline=None)
@given(scenarios(), st.integers(0, 230 * 86400), st.sampled_from("aby"))
def test_a_keep_version_never_changes_an_existing_subscription(
    evs, published_after, plan_id
) -> None:
    """Subscriptions created before a `keep` publication (with no plan change after it) are
    billed exactly as without it."""
    at = parse_timestamp("2024-01-31T10:00:00Z") + timedelta(seconds=published_after)
    base = PROP.plans[plan_id]
    new = {"plan_id": plan_id, "currency": base.currency, "interval": "month",
           "charges": [{"charge_id": "new", "model": "flat", "amount": "1.00"}]}  # fmt: skip
    from streams.domain.catalog import parse_plan

    evs = [e for e in evs if e.timestamp < at or type(e).__name__ in ("Usage", "Cancelled")]
    published = PlanPublished(at, parse_plan(new), "keep")
    before, _, _, _ = run_contract(PROP, [(e, 0) for e in evs], UNTIL)
    after, _, _, _ = run_contract(PROP, [(e, 0) for e in [*evs, published]], UNTIL)
    assert _v1_view(after.invoices) == _v1_view(before.invoices)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([None, "u1", "u2", "u3", "u4"]))))
def test_unique_count_never_exceeds_count(events) -> None:
    tally = Tally()
    t = parse_timestamp("2026-01-01T00:00:00Z")
    for n, (q, user) in enumerate(events):
        props = {"user": user} if user else None
        tally.add(Usage(f"e{n}", t, "s", "m", Decimal(q), None, props), ("user",))
    assert tally.value("unique_count:user") <= tally.value("count")
    assert tally.value("unique_count:user") == len({u for _, u in events if u})


# --- random version-2 histories -----------------------------------------------------------

V2_PLANS = {
    "plans": [
        {"plan_id": "a", "currency": "EUR", "interval": "month", "charges": [
            {"charge_id": "fee", "model": "flat", "amount": "9.99"},
            {"charge_id": "g", "model": "graduated", "metric": "m", "aggregation": "sum",
             "tiers": [{"up_to": "10", "unit_amount": "0.5"},
                       {"up_to": None, "unit_amount": "0.1", "flat_amount": "1"}]},
            {"charge_id": "u", "model": "per_unit", "metric": "m",
             "aggregation": "unique_count", "field": "k", "unit_amount": "0.3"}]},
        {"plan_id": "b", "currency": "EUR", "interval": "month", "trial_days": 3, "charges": [
            {"charge_id": "fee", "model": "flat", "amount": "20"},
            {"charge_id": "p", "model": "percentage", "metric": "m", "aggregation": "sum",
             "rate": "0.015", "fixed_amount": "0.05"},
            {"charge_id": "l", "model": "volume", "metric": "n", "aggregation": "latest",
             "tiers": [{"up_to": "3", "unit_amount": "2"}, {"up_to": None, "unit_amount": "1"}]}]},
    ],
    "tax_rates": [{"country": "NL", "rate": "0.21"}],
    "late_usage_periods": 1,
}  # fmt: skip
V2_CATALOG = Catalog.from_dict(V2_PLANS)
V2_T0 = parse_timestamp("2026-01-30T06:00:00Z")
V2_UNTIL = V2_T0 + timedelta(days=200)


def v2_histories():
    """Three subscriptions created at the start (one on a trial plan), then anything, and
    some of its usage events and credit grants sent again (the same event, arriving later)."""
    starts = [{"type": "subscription.created", "timestamp": format_timestamp(V2_T0),
               "subscription_id": s, "account_id": f"acc{s[-1]}", "plan_id": p}
              for s, p in (("s1", "a"), ("s2", "b"), ("s3", "a"))]  # fmt: skip

    def with_repeats(rest: list[dict], repeats: list[tuple[int, int]]) -> list[dict]:
        again = []
        for index, hours in repeats:
            e = rest[index % len(rest)]
            if e["type"] in ("usage", "credit.granted"):
                arrival = parse_timestamp(e.get("received_at", e["timestamp"]))
                later = format_timestamp(arrival + timedelta(hours=hours))
                e = {**e, "received_at" if e["type"] == "usage" else "timestamp": later}
                again.append(e)
        return starts + rest + again

    return st.builds(
        with_repeats,
        st.lists(v2_events(), min_size=1, max_size=40),
        st.lists(st.tuples(st.integers(0, 39), st.integers(0, 30 * 24)), max_size=8),
    )


@st.composite
def v2_events(draw) -> dict:
    at = V2_T0 + timedelta(minutes=draw(st.integers(0, 150 * 24 * 60)))
    sub = draw(st.sampled_from(["s1", "s2", "s3"]))
    kind = draw(st.sampled_from(
        ["usage"] * 8 + ["created", "change", "cancel", "pause", "resume", "resume", "publish",
                         "retire", "customer", "coupon", "credit"]))  # fmt: skip
    base = {"timestamp": format_timestamp(at), "subscription_id": sub}
    if kind == "usage":
        late = draw(st.sampled_from([0, 0, 0, 1, 20, 24 * 40, 24 * 70]))
        e = {**base, "type": "usage", "event_id": f"e{draw(st.integers(0, 60))}",
             "metric": draw(st.sampled_from("mn")), "quantity": str(draw(st.integers(0, 30))),
             "properties": {"k": draw(st.sampled_from("xyz"))}}  # fmt: skip
        if late:
            e["received_at"] = format_timestamp(at + timedelta(hours=late))
        return e
    if kind == "created":
        return {**base, "type": "subscription.created", "account_id": f"acc{sub[-1]}",
                "plan_id": draw(st.sampled_from("ab"))}  # fmt: skip
    if kind == "change":
        return {**base, "type": "subscription.plan_changed", "plan_id": draw(st.sampled_from("ab"))}
    if kind == "cancel":
        mode = draw(st.sampled_from(["immediate", "end_of_period"]))
        return {**base, "type": "subscription.cancelled", "mode": mode}
    if kind in ("pause", "resume"):
        return {**base, "type": f"subscription.{kind}d"}
    if kind == "publish":
        plan = dict(draw(st.sampled_from(V2_PLANS["plans"])))
        plan["charges"] = [{**c, "amount": "12.34"} if c["model"] == "flat" else c
                           for c in plan["charges"]]  # fmt: skip
        return {"type": "plan.published", "timestamp": base["timestamp"], "plan": plan,
                "existing": draw(st.sampled_from(["keep", "next_period"]))}  # fmt: skip
    if kind == "retire":
        return {"type": "plan.retired", "timestamp": base["timestamp"], "plan_id": "a"}
    if kind == "customer":
        return {"type": "customer.updated", "timestamp": base["timestamp"],
                "account_id": f"acc{sub[-1]}", "country": draw(st.sampled_from(["NL", "DE"])),
                "grace_hours": draw(st.sampled_from([0, 5, 48]))}  # fmt: skip
    if kind == "coupon":
        off = draw(st.sampled_from([{"percent_off": "25"}, {"amount_off": "3.50"}]))
        return {
            **base,
            "type": "coupon.applied",
            "coupon_id": "c",
            **off,
            "duration": draw(st.sampled_from(["once", "repeating", "forever"])),
            "periods": 2,
        }
    return {
        "type": "credit.granted",
        "timestamp": base["timestamp"],
        "account_id": f"acc{sub[-1]}",
        "credit_id": f"g{draw(st.integers(0, 3))}",
        "currency": "EUR",
        "amount": "5.00",
    }


@settings(max_examples=150, deadline=None)
@given(v2_histories())
def test_random_histories_bill_every_segment_exactly_and_account_for_every_event(events) -> None:
    lines = [json.dumps(e) for e in events]
    result = rate_events(V2_CATALOG, lines, V2_UNTIL)
    assert result.applied + len(result.dead_letters) + result.deferred == len(lines)
    again = rate_events(V2_CATALOG, list(lines), V2_UNTIL)
    assert [invoice_to_contract_dict(i) for i in again.invoices] == [
        invoice_to_contract_dict(i) for i in result.invoices]  # fmt: skip
    billed: dict[tuple, Decimal] = {}
    for inv in result.invoices:
        assert inv.total == sum((ln.amount for ln in inv.lines), Decimal(0))
        assert inv.amount_due is not None and inv.amount_due >= 0 and inv.credit_applied >= 0
        if inv.total > 0:
            assert inv.credit_applied + inv.amount_due == inv.total
        else:
            assert inv.credit_applied == inv.amount_due == 0
        for ln in inv.lines:
            if ln.kind in ("usage", "usage_adjustment"):
                key = (inv.subscription_id, ln.period_start, ln.period_end, ln.charge_id)
                billed[key] = billed.get(key, Decimal(0)) + ln.amount
    assert all(
        b >= 0 for acc in result.run.accounts.records.values() for b in acc.balances.values()
    )
    # what is billed for a segment is the exact price of everything counted in it
    for sub in result.run.subs.values():
        for seg in sub.closed:
            if seg.billed is None or seg.late:
                continue  # a draft, or late usage not invoiced by `until`
            for charge in seg.plan.usage_charges:
                key = (sub.subscription_id, seg.start, seg.end, charge.charge_id)
                assert billed[key] == seg.price(charge)[1], key


# --- the order of what is due -------------------------------------------------------------


def test_a_version_published_at_a_period_end_moves_subscriptions_one_period_later() -> None:
    published = {"plan_id": "team", "currency": "EUR", "interval": "month",
                 "charges": [{"charge_id": "fee", "model": "flat", "amount": "40.00"}]}  # fmt: skip
    invoices, _ = rated([
        created("2026-03-01T00:00:00Z"),
        # at the instant of the period end: the period end is processed first
        ev("plan.published", "2026-04-01T00:00:00Z", plan=published, existing="next_period"),
    ], until="2026-05-01T00:00:00Z")  # fmt: skip
    assert [i["total"] for i in invoices] == ["30.00", "30.00", "40.00"]


def test_invoices_due_at_one_instant_take_the_credit_in_subscription_order() -> None:
    invoices, _ = rated([
        ev("credit.granted", "2026-02-01T00:00:00Z", credit_id="g", account_id="a",
           currency="EUR", amount="75.00"),
        created("2026-03-01T00:00:00Z") | {"subscription_id": "b"},
        created("2026-03-01T00:00:00Z") | {"subscription_id": "a"},
    ], until="2026-04-01T00:00:00Z")  # fmt: skip
    credit = {(i["subscription_id"], i["reason"]): i["credit_applied"] for i in invoices}
    # creations in arrival order (b first), then the period ends at Apr 1 by subscription id
    assert credit == {("b", "created"): "30.00", ("a", "created"): "30.00",
                      ("a", "period_end"): "15.00", ("b", "period_end"): "0.00"}  # fmt: skip


def test_a_held_invoice_is_finalized_before_an_event_arriving_at_that_instant() -> None:
    invoices, _ = rated([
        ev("customer.updated", "2026-02-01T00:00:00Z", account_id="a", grace_hours=10),
        created("2026-03-01T00:00:00Z"),
        # the finalization is due at Apr 1 10:00: this arrives at that instant, so it is late
        use("2026-03-31T00:00:00Z", "10", "edge", received="2026-04-01T10:00:00Z"),
        ev("customer.updated", "2026-04-01T10:00:00Z", account_id="a", country="NL"),
        use("2026-03-31T00:00:00Z", "20", "inside", received="2026-04-01T09:59:59Z"),
    ], until="2026-04-02T00:00:00Z", tax_rates=[{"country": "NL", "rate": "0.5"}])  # fmt: skip
    period_end = next(i for i in invoices if i["reason"] == "period_end")
    assert period_end["finalized_at"] == "2026-04-01T10:00:00Z"
    # the usage inside the grace counts on it; no tax: the country came after it
    assert [(ln["kind"], ln["quantity"], ln["amount"]) for ln in period_end["lines"]] == [
        ("usage", "20", "2.00"), ("flat", None, "30.00")]  # fmt: skip


def test_a_plan_change_in_a_grace_period_carries_the_late_usage_of_the_segment_before() -> None:
    invoices, _ = rated([
        ev("customer.updated", "2026-02-01T00:00:00Z", account_id="a", grace_hours=48),
        created("2026-03-01T00:00:00Z"),
        ev("subscription.plan_changed", "2026-03-20T00:00:00Z", plan_id="pro"),
        ev("subscription.plan_changed", "2026-03-25T00:00:00Z", plan_id="team"),
        # in the segment [Mar 1, Mar 20), billed when the plan changed: late
        use("2026-03-10T00:00:00Z", "10", "late", received="2026-04-01T12:00:00Z"),
        # in [Mar 25, Apr 1), whose period_end invoice waits until Apr 3: not late
        use("2026-03-30T00:00:00Z", "7", "held", received="2026-04-02T00:00:00Z"),
    ], until="2026-04-04T00:00:00Z")  # fmt: skip
    period_end = next(i for i in invoices if i["reason"] == "period_end")
    assert [(ln["kind"], ln["period_start"][:10], ln["quantity"], ln["amount"])
            for ln in period_end["lines"]] == [
        ("usage", "2026-03-25", "7", "0.70"),
        ("flat", "2026-04-01", None, "30.00"),
        ("usage_adjustment", "2026-03-01", "10", "1.00"),
    ]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(v2_histories(), st.data())
def test_a_run_resumed_from_its_snapshot_issues_the_same_invoices(events, data) -> None:
    from streams.domain.billing import Rejected, arrival_of
    from streams.domain.billing_snapshot import restore, snapshot

    parsed = []
    for e in events:
        try:
            parsed.append(parse_event(e))
        except Exception:  # an invalid event: no part of this property
            continue
    whole, _, _, _ = run_contract(V2_CATALOG, [(e, 0) for e in parsed], V2_UNTIL)
    ordered = sorted((e for e in parsed if arrival_of(e) <= V2_UNTIL), key=arrival_of)
    split = data.draw(st.integers(0, len(ordered)))
    run, issued = whole.__class__(V2_CATALOG), []
    for n, event in enumerate(ordered):
        if n == split:
            state = snapshot(run)
            issued += run.invoices
            run = restore(V2_CATALOG, state)
            assert snapshot(run) == state  # the bytes say everything there is
        run.advance(arrival_of(event))
        with contextlib.suppress(Rejected):  # its dead letter: no part of this property
            run.apply(event, arrival_of(event))
    run.advance(V2_UNTIL)
    issued += run.invoices
    assert [invoice_to_contract_dict(i) for i in issued] == [
        invoice_to_contract_dict(i) for i in whole.invoices
    ]


def test_a_rich_history_resumed_from_a_snapshot_at_every_point_issues_the_same_invoices() -> None:
    from streams.domain.billing import ContractRun, Rejected, arrival_of
    from streams.domain.billing_snapshot import restore, snapshot

    fee40 = {"plan_id": "team", "currency": "EUR", "interval": "month",
             "charges": [{"charge_id": "fee", "model": "flat", "amount": "40.00"}]}  # fmt: skip
    history = [
        ev("customer.updated", "2026-02-01T00:00:00Z", account_id="a", country="NL",
           grace_hours=30),
        ev("credit.granted", "2026-02-01T00:00:00Z", credit_id="g", account_id="a",
           currency="EUR", amount="12.00"),
        created("2026-03-01T00:00:00Z"),
        created("2026-03-01T00:00:00Z", "trial") | {"subscription_id": "t"},
        use("2026-03-02T00:00:00Z", "5", "u1", k="x"),
        ev("coupon.applied", "2026-03-03T00:00:00Z", coupon_id="c", percent_off="10",
           duration="repeating", periods=2),
        ev("plan.published", "2026-03-04T00:00:00Z", plan=fee40, existing="next_period"),
        ev("plan.retired", "2026-03-05T00:00:00Z", plan_id="pro"),
        use("2026-03-31T00:00:00Z", "3", "u2", received="2026-04-01T20:00:00Z"),
        ev("credit.granted", "2026-04-01T21:00:00Z", credit_id="g", account_id="a",
           currency="EUR", amount="12.00"),  # a repeat
        use("2026-03-10T00:00:00Z", "4", "u3", received="2026-04-10T00:00:00Z"),  # late
        ev("subscription.paused", "2026-04-15T00:00:00Z"),
        ev("subscription.plan_changed", "2026-04-16T00:00:00Z", plan_id="pro",
           subscription_id="t"),  # retired
        ev("subscription.resumed", "2026-04-20T00:00:00Z"),
        use("2026-03-10T00:00:00Z", "4", "u3", received="2026-04-21T00:00:00Z"),  # a repeat
        ev("subscription.cancelled", "2026-05-10T00:00:00Z", mode="immediate"),
        use("2026-03-20T00:00:00Z", "2", "u4", received="2026-05-12T00:00:00Z"),  # late, ended
    ]  # fmt: skip
    cat = Catalog.from_dict({"plans": PLANS, "tax_rates": [{"country": "NL", "rate": "0.21"}]})
    until = parse_timestamp("2026-06-15T00:00:00Z")
    events = sorted((parse_event(e) for e in history), key=arrival_of)
    whole, dead, _, _ = run_contract(cat, [(e, 0) for e in events], until)
    assert len(dead) == 1  # the plan change to the retired plan
    assert {i.reason for i in whole.invoices} >= {"paused", "resumed", "adjustment"}
    expected = [invoice_to_contract_dict(i) for i in whole.invoices]
    for split in range(len(events) + 1):
        run, issued = ContractRun(cat), []
        for n, event in enumerate(events):
            if n == split:
                state = snapshot(run)
                issued += run.invoices
                run = restore(cat, state)
            run.advance(arrival_of(event))
            with contextlib.suppress(Rejected):
                run.apply(event, arrival_of(event))
        run.advance(until)
        assert [invoice_to_contract_dict(i) for i in issued + run.invoices] == expected, split


def _through_records(run, catalog: Catalog):
    """A run carried on from its subscriptions and accounts each written to bytes and read
    back, as a rating worker keeps them in its state store (the plan versions it sees are
    kept: the worker derives them from the catalog topic)."""
    from streams.domain.billing import Accounts, ContractRun
    from streams.domain.billing_snapshot import (
        account_from_bytes,
        account_to_bytes,
        subscription_from_bytes,
        subscription_to_bytes,
    )

    records = {
        a: account_from_bytes(account_to_bytes(acc)) for a, acc in run.accounts.records.items()
    }
    resumed = ContractRun(catalog, book=run.book,
                          accounts=Accounts(records, global_credit_ids=False))  # fmt: skip
    for sub_id, sub in run.subs.items():
        data = subscription_to_bytes(sub)
        resumed.subs[sub_id] = subscription_from_bytes(data)
        assert subscription_to_bytes(resumed.subs[sub_id]) == data  # nothing is lost
        resumed.schedule(resumed.subs[sub_id])
    return resumed


@settings(max_examples=300, deadline=None)
@given(v2_histories(), st.data())
def test_a_run_carried_on_from_its_records_issues_the_same_invoices(events, data) -> None:
    """What a rating worker does between transactions: every subscription and account
    through its bytes, at random points of random histories."""
    from streams.domain.billing import Accounts, ContractRun, Rejected, arrival_of

    parsed = []
    for e in events:
        try:
            parsed.append(parse_event(e))
        except Exception:  # an invalid event: no part of this property
            continue
    ordered = sorted((e for e in parsed if arrival_of(e) <= V2_UNTIL), key=arrival_of)

    def rate(splits: set[int]) -> list:
        run = ContractRun(V2_CATALOG, accounts=Accounts(global_credit_ids=False))
        issued = []
        for n, event in enumerate(ordered):
            if n in splits:
                issued += run.invoices
                run = _through_records(run, V2_CATALOG)
            run.advance(arrival_of(event))
            with contextlib.suppress(Rejected):
                run.apply(event, arrival_of(event))
        run.advance(V2_UNTIL)
        return [invoice_to_contract_dict(i) for i in issued + run.invoices]

    splits = set(data.draw(st.lists(st.integers(0, max(len(ordered) - 1, 0)), max_size=6)))
    assert rate(splits) == rate(set())
