"""Hypothesis properties of the rating state machine."""

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.catalog import Catalog
from streams.domain.events import Cancelled, PlanChanged, SubscriptionCreated, Usage
from streams.domain.invoice import (
    KIND_PRORATION_CHARGE,
    KIND_PRORATION_CREDIT,
    invoice_to_dict,
    proration_lines,
)
from streams.domain.money import minor_units
from streams.domain.rating import (
    SubscriptionState,
    apply_event,
    close_periods,
)

from .helpers import D, ts

TIERS = [
    {"up_to": "10.5", "unit_amount": "0.0333", "flat_amount": "1.005"},
    {"up_to": "100", "unit_amount": "0.0125"},
    {"up_to": None, "unit_amount": "0.001", "flat_amount": "0.5"},
]


def usage_charges(prefix: str) -> list[dict]:
    return [
        {
            "charge_id": f"{prefix}g",
            "model": "graduated",
            "metric": "m1",
            "aggregation": "sum",
            "tiers": TIERS,
        },
        {
            "charge_id": f"{prefix}v",
            "model": "volume",
            "metric": "m1",
            "aggregation": "max",
            "tiers": TIERS,
        },
        {
            "charge_id": f"{prefix}p",
            "model": "package",
            "metric": "m2",
            "aggregation": "sum",
            "package_size": "2.5",
            "package_amount": "0.015",
        },
        {
            "charge_id": f"{prefix}u",
            "model": "per_unit",
            "metric": "m2",
            "aggregation": "count",
            "unit_amount": "0.005",
        },
    ]


PROP = Catalog.from_dict(
    {
        "plans": [
            {
                "plan_id": "a",
                "currency": "EUR",
                "interval": "month",
                "charges": [
                    {"charge_id": "fa", "model": "flat", "amount": "9.99"},
                    *usage_charges("a"),
                ],
            },
            {
                "plan_id": "b",
                "currency": "EUR",
                "interval": "month",
                "charges": [
                    {"charge_id": "fb1", "model": "flat", "amount": "0.07"},
                    {"charge_id": "fb2", "model": "flat", "amount": "1234.5678"},
                    *usage_charges("b"),
                ],
            },
            {
                "plan_id": "y",
                "currency": "JPY",
                "interval": "month",
                "charges": [
                    {"charge_id": "fy", "model": "flat", "amount": "999"},
                    *usage_charges("y"),
                ],
            },
        ]
    }
)

T0 = ts("2024-01-31T10:00:00")
SUBS = ["s1", "s2"]

offsets = st.integers(min_value=0, max_value=200 * 86400 * 10**6).map(
    lambda us: T0 + timedelta(microseconds=us)
)
quantities = st.decimals(min_value=0, max_value=500, places=2, allow_nan=False)


@st.composite
def events(draw):
    sub = draw(st.sampled_from(SUBS))
    t = draw(offsets)
    kind = draw(st.sampled_from(["usage"] * 6 + ["change", "cancel", "created"]))
    if kind == "usage":
        return Usage(
            f"e{draw(st.integers(0, 40))}",
            t,
            sub,
            draw(st.sampled_from(["m1", "m2"])),
            draw(quantities),
        )
    if kind == "change":
        return PlanChanged(t, sub, draw(st.sampled_from(["a", "b", "y"])))
    if kind == "cancel":
        return Cancelled(t, sub, draw(st.sampled_from(["immediate", "end_of_period"])))
    return SubscriptionCreated(t, "acc", sub, draw(st.sampled_from(["a", "b", "y"])))


@st.composite
def scenarios(draw):
    creations = [
        SubscriptionCreated(T0 + timedelta(hours=i), f"acc{i}", sub, draw(st.sampled_from("aby")))
        for i, sub in enumerate(SUBS)
    ]
    rest = draw(st.lists(events(), max_size=25))
    return sorted(creations + rest, key=lambda e: e.timestamp)


UNTIL = T0 + timedelta(days=230)


def rate(evs, snapshots=None):
    states: dict[str, SubscriptionState] = {}
    invoices, rejections = [], []
    for e in evs:
        st_, inv, rej = apply_event(states.get(e.subscription_id), e, PROP)
        if st_ is not None:
            states[e.subscription_id] = st_
            if snapshots is not None:
                snapshots.append(st_.to_bytes())
        invoices += inv
        rejections += rej
    for sub in sorted(states):
        states[sub], inv = close_periods(states[sub], UNTIL, PROP)
        invoices += inv
    return states, invoices, rejections


@settings(max_examples=50, deadline=None)
@given(scenarios())
def test_totals_are_sums_of_rounded_lines(evs):
    _, invoices, _ = rate(evs)
    assert invoices
    for inv in invoices:
        digits = minor_units(inv.currency)
        assert inv.total == sum((ln.amount for ln in inv.lines), D(0))
        for ln in inv.lines:
            assert ln.amount.as_tuple().exponent == -digits
            assert ln.period_start <= ln.period_end
        d = invoice_to_dict(inv)
        assert D(d["total"]) == sum(D(ln["amount"]) for ln in d["lines"])
    ids = [i.invoice_id for i in invoices]
    assert len(ids) == len(set(ids))  # replay-safe ids never collide


@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_apply_event_is_deterministic_and_state_roundtrips(evs):
    snaps1: list[bytes] = []
    states1, inv1, rej1 = rate(evs, snaps1)
    snaps2: list[bytes] = []
    states2, inv2, rej2 = rate(evs, snaps2)
    assert inv1 == inv2 and rej1 == rej2 and snaps1 == snaps2
    assert {k: v.to_bytes() for k, v in states1.items()} == {
        k: v.to_bytes() for k, v in states2.items()
    }
    for b in snaps1:
        s = SubscriptionState.from_bytes(b)
        assert s.to_bytes() == b
    for s in states1.values():
        assert SubscriptionState.from_bytes(s.to_bytes()) == s


@settings(max_examples=40, deadline=None)
@given(scenarios(), st.data())
def test_resuming_from_serialized_state_gives_the_same_invoices(evs, data):
    """What the streaming processor does: reload state from bytes between events."""
    _, expected, _ = rate(evs)
    stored: dict[str, bytes] = {}
    got = []
    for e in evs:
        prev = stored.get(e.subscription_id)
        st_, inv, _ = apply_event(SubscriptionState.from_bytes(prev) if prev else None, e, PROP)
        if st_ is not None:
            stored[e.subscription_id] = st_.to_bytes()
        got += inv
    for sub in sorted(stored):
        _, inv = close_periods(SubscriptionState.from_bytes(stored[sub]), UNTIL, PROP)
        got += inv
    assert got == expected


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from("aby"),
    st.lists(
        st.tuples(
            st.integers(0, 27 * 86400 * 10**6), st.sampled_from(["m1", "m2", "m3"]), quantities
        ),
        max_size=30,
    ),
    st.randoms(use_true_random=False),
)
def test_rating_independent_of_usage_arrival_order(plan, raw, rnd):
    created = SubscriptionCreated(T0, "acc", "s1", plan)
    usages = [
        Usage(f"e{i}", T0 + timedelta(microseconds=us), "s1", m, q)
        for i, (us, m, q) in enumerate(raw)
    ]
    shuffled = list(usages)
    rnd.shuffle(shuffled)

    def bill(order):
        st_, invoices, _ = apply_event(None, created, PROP)
        for u in order:
            st_, inv, rej = apply_event(st_, u, PROP)
            assert inv == [] and rej == []
        st_, inv = close_periods(st_, T0 + timedelta(days=29), PROP)
        return [invoice_to_dict(i) for i in invoices + inv]

    assert bill(usages) == bill(shuffled)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from("aby"), st.integers(0, 29 * 86400 * 10**6 - 1))
def test_proration_credit_and_charge_of_same_plan_cancel(plan_id, us):
    plan = PROP.plan(plan_id)
    start, end = T0, ts("2024-02-29T10:00:00")
    t = start + timedelta(microseconds=us)
    credit = proration_lines(plan, KIND_PRORATION_CREDIT, t, start, end)
    charge = proration_lines(plan, KIND_PRORATION_CHARGE, t, start, end)
    assert sum(ln.amount for ln in credit + charge) == 0
    for c, p in zip(credit, charge, strict=True):
        assert c.amount == -p.amount
        assert (
            0
            <= p.amount
            <= next(f.amount for f in plan.flat_charges if f.charge_id == p.charge_id) + 1
        )
