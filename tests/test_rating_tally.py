"""The rating processor's usage fast path (UsageTally: plain usage added up per
subscription before it touches the state) against the general path.

- The domain: a tally of plain events leaves the state byte for byte as ``apply_event`` of
  each event in turn (sum, max and count, unpriced metrics, repeated ids, usage already in
  the state).
- The processor: random mixes of subscription events and usage (other accounts, unknown
  subscriptions, period ends crossed, late usage, plan changes, cancellations, repeated
  ids), cut into transactions, give the same outputs in the same order (invoices, dead
  letters, changelog states) as the same processor with the fast path switched off.
- Each comparison is shown to fail on a deliberately broken tally.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streams.codec import codec
from streams.domain.catalog import Catalog
from streams.domain.events import Cancelled, PlanChanged, SubscriptionCreated, Usage
from streams.domain.rating import UsageTally, apply_event
from streams.fast_codec import usage_event
from streams.kafka.topics import CONTROL, DEAD_LETTER, INVOICES, SUBSCRIPTIONS, USAGE
from streams.processors import rating
from tests.hostile import Msg, micros, rating_processor

METERED = {"charge_id": "calls", "model": "per_unit", "metric": "api_calls",
           "aggregation": "sum", "unit_amount": "0.001"}  # fmt: skip
CATALOG = Catalog.from_dict({
    "plans": [
        {"plan_id": "all", "currency": "EUR", "interval": "month", "charges": [
            {"charge_id": "fee", "model": "flat", "amount": "10"}, METERED,
            {"charge_id": "seats", "model": "per_unit", "metric": "seats",
             "aggregation": "max", "unit_amount": "5"},
            {"charge_id": "logins", "model": "per_unit", "metric": "logins",
             "aggregation": "count", "unit_amount": "0.5"},
            # api_calls also maxed and counted: one metric, three aggregations
            {"charge_id": "peak", "model": "per_unit", "metric": "api_calls",
             "aggregation": "max", "unit_amount": "1"},
            {"charge_id": "calls-n", "model": "per_unit", "metric": "api_calls",
             "aggregation": "count", "unit_amount": "0.01"},
        ]},
        {"plan_id": "calls", "currency": "EUR", "interval": "month", "charges": [
            {"charge_id": "fee", "model": "flat", "amount": "5"}, METERED,
        ]},
        {"plan_id": "usd", "currency": "USD", "interval": "month", "charges": [METERED]},
    ]
})  # fmt: skip
T0 = datetime(2026, 1, 10, tzinfo=UTC)
END = datetime(2026, 12, 31, tzinfo=UTC)
PUBLISHED_MS = micros(datetime(2026, 9, 1, tzinfo=UTC)) // 1000
METRICS = ["api_calls", "seats", "logins", "unpriced"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


# --- the domain ------------------------------------------------------------------------

nanos = st.one_of(st.integers(1, 10**12), st.integers(1, 10**27 - 1))
plain_events = st.lists(
    st.tuples(st.integers(0, 12), st.sampled_from(METRICS), nanos, st.integers(0, 10**6)),
    max_size=40,
)  # (event id number: repeats, metric, quantity, µs into the segment)


def tally_agrees(events: list, before: list, tally_class: type = UsageTally) -> bool:
    """A state of plan "all" with `before` applied by apply_event; then `events` through
    apply_event one by one, and through a tally: the same state bytes?"""
    state, _, _ = apply_event(None, SubscriptionCreated(T0, "a", "s", "all"), CATALOG)
    for n, (metric, q) in enumerate(before):
        u = Usage(f"b{n}", T0 + timedelta(hours=1), "s", metric, Decimal(q).scaleb(-9))
        state, _, _ = apply_event(state, u, CATALOG)
    assert state is not None
    records = []
    for k, metric, q, offset in events:
        us = micros(T0 + timedelta(hours=2)) + offset
        records.append((f"e{k}", us, "a", "s", metric, q))
    general = state.copy()
    for rec in records:
        general, invoices, rejected = apply_event(general, usage_event(rec), CATALOG)
        assert invoices == [] and rejected == []  # plain: neither
    tally = tally_class(state, CATALOG.plan("all"))
    assert all(tally.start_us <= r[1] < tally.end_us for r in records)
    tally.records.extend(records)
    assert tally.settle() is state and tally.records == []
    return state.to_bytes() == general.to_bytes()


@SETTINGS
@given(
    events=plain_events,
    before=st.lists(st.tuples(st.sampled_from(METRICS), nanos), max_size=4),
)
def test_a_tally_leaves_the_state_as_apply_event_does(events: list, before: list) -> None:
    assert tally_agrees(events, before)


class _CountsRepeats(UsageTally):
    """Broken on purpose: skips the ids the state has seen, counts repeats among its own."""

    def settle(self):  # type: ignore[no-untyped-def]
        seen = self.state.seen_event_ids
        self.records = [(f"{r[0]}#{n}", *r[1:]) for n, r in enumerate(self.records)
                        if r[0] not in seen]  # fmt: skip
        return super().settle()


class _MaxOfTheLast(UsageTally):
    """Broken on purpose: every seats quantity read as the smallest there is."""

    def settle(self):  # type: ignore[no-untyped-def]
        for n, rec in enumerate(self.records):
            if rec[4] == "seats":
                self.records[n] = (*rec[:5], 1)
        return super().settle()


@pytest.mark.parametrize(
    ("broken", "events"),
    [
        (_CountsRepeats, [(1, "api_calls", 5, 0), (1, "api_calls", 7, 1)]),
        (_MaxOfTheLast, [(1, "seats", 5, 0), (2, "seats", 3, 1)]),
    ],
)
def test_the_domain_comparison_catches_a_broken_tally(broken: type, events: list) -> None:
    assert tally_agrees(events, [])
    assert not tally_agrees(events, [], broken)


def test_no_tally_for_an_ended_subscription_or_another_plan() -> None:
    state, _, _ = apply_event(None, SubscriptionCreated(T0, "a", "s", "all"), CATALOG)
    assert state is not None
    with pytest.raises(ValueError):
        UsageTally(state, CATALOG.plan("calls"))
    state.status = "ended"
    with pytest.raises(ValueError):
        UsageTally(state, CATALOG.plan("all"))


lifecycle = st.lists(
    st.tuples(st.sampled_from(["usage", "calls", "all", "later", "now"]), st.integers(0, 90_000)),
    max_size=12,
)  # (usage, a plan change to "calls"/"all", an end-of-period or immediate cancellation;
#     minutes after the previous event)


@SETTINGS
@given(steps=lifecycle)
def test_a_tallys_bounds_follow_the_state_through_its_life(steps: list) -> None:
    """The bounds a tally keeps on the state (periods closed, plan changes at any instant,
    cancellations) are those of a fresh copy of it, which has none kept."""
    state, _, _ = apply_event(None, SubscriptionCreated(T0, "a", "s", "all"), CATALOG)
    at = T0
    for n, (kind, minutes) in enumerate(steps):
        at += timedelta(minutes=minutes)
        if kind == "usage":
            event: Any = Usage(f"u{n}", at, "s", "api_calls", Decimal(1))
        elif kind in ("later", "now"):
            mode = "end_of_period" if kind == "later" else "immediate"
            event = Cancelled(at, "s", mode)
        else:
            event = PlanChanged(at, "s", kind)
        state, _, _ = apply_event(state, event, CATALOG)
        assert state is not None
        if state.status == "ended":
            return
        kept = UsageTally(state, CATALOG.plan(state.plan_id))
        fresh = UsageTally(state.copy(), CATALOG.plan(state.plan_id))
        assert (kept.start_us, kept.end_us) == (fresh.start_us, fresh.end_us)
        assert kept.start_us == micros(state.segment_start)


# --- the processor -------------------------------------------------------------------------


SUB_KINDS = ["created", "created", "plan_changed", "cancel_now", "cancel_later"]
mixes = st.lists(
    st.one_of(
        # (subscription event, subscription, minutes after T0, kind, plan)
        st.tuples(st.just("sub"), st.integers(0, 3), st.integers(0, 80_000),
                  st.sampled_from(SUB_KINDS), st.sampled_from(["all", "calls", "usd"])),
        # (usage, subscription, minutes after T0, event id, metric, quantity, other account?)
        st.tuples(st.just("usage"), st.integers(0, 3), st.integers(0, 80_000),
                  st.integers(0, 30), st.sampled_from(METRICS), nanos,
                  st.integers(0, 4).map(lambda n: n == 0)),
    ),
    max_size=60,
)  # fmt: skip


def encoded(mix: list) -> list[Msg]:
    """The mix as consumed records: subscription events in time order (as their producers
    publish them), usage in the order drawn (some of it late)."""
    # subscriptions mostly created early, so that most usage has one to go to
    subs = [(*m[:2], m[2] % 600 if m[3] == "created" else m[2], *m[3:]) for m in mix
            if m[0] == "sub"]  # fmt: skip
    usage = [m for m in mix if m[0] == "usage"]
    out = []
    for n, (_, s, minutes, kind, plan) in enumerate(sorted(subs, key=lambda m: m[2])):
        at = T0 + timedelta(minutes=minutes, microseconds=n)
        rec = {"event_id": f"x{n}", "timestamp": at, "account_id": f"a{s}",
               "subscription_id": f"s{s}", "plan_id": None, "mode": None,
               "payment_method": None}  # fmt: skip
        if kind == "created":
            rec.update(type="subscription.created", plan_id=plan)
        elif kind == "plan_changed":
            rec.update(type="subscription.plan_changed", plan_id=plan)
        else:
            mode = "immediate" if kind == "cancel_now" else "end_of_period"
            rec.update(type="subscription.cancelled", mode=mode)
        value = codec(SUBSCRIPTIONS.schema).encode(rec)
        out.append(Msg(SUBSCRIPTIONS.name, value, f"a{s}".encode(), 0, n, PUBLISHED_MS))
    for n, (_, s, minutes, k, metric, q, other) in enumerate(usage):
        rec = {"event_id": f"u{k}", "timestamp": T0 + timedelta(minutes=minutes, seconds=n),
               "account_id": "z" if other else f"a{s}", "subscription_id": f"s{s}",
               "metric": metric, "quantity": Decimal(q).scaleb(-9)}  # fmt: skip
        value = codec(USAGE.schema).encode(rec)
        out.append(Msg(USAGE.name, value, b"a", 0, n, PUBLISHED_MS))
    return out


def rate(msgs: list[Msg], cuts: list[int], fast: bool, tally_class: type = UsageTally) -> list:
    """The records in transactions of the given sizes, then a bill run closing every
    period up to the end of the year: what the processor produced (invoices, dead letters,
    changelog states), in order. fast=False: no tally, every record through apply_input."""
    with tempfile.TemporaryDirectory() as home:
        proc = rating_processor(CATALOG, Path(home), usage_tally=tally_class if fast else None)
        done, turn = 0, 0
        while done < len(msgs):
            size = cuts[turn % len(cuts)]
            turn += 1
            proc.transaction(msgs[done : done + size])
            done += size
        run = codec(CONTROL.schema).encode(
            {"run_id": "r", "until": END, "accounts": None, "barrier": {}, "issued_at": END}
        )
        proc.transaction([Msg(CONTROL.name, run, None, 0, 0, micros(END) // 1000)])
        while proc.jobs.running:
            proc.transaction([])
        proc.close()
    out = []
    for topic, key, value in proc.producer.produced:
        if topic == DEAD_LETTER.name:  # its failed_at is the wall clock's
            value = {**codec(DEAD_LETTER.schema).decode(value), "failed_at": None}
        out.append((topic, key, value))
    return out


def outputs(mix: list, cuts: list[int], tally_class: type = UsageTally) -> tuple[Any, Any]:
    msgs = encoded(mix)
    return rate(msgs, cuts, True, tally_class), rate(msgs, cuts, False)


@SETTINGS
@given(mix=mixes, cuts=st.lists(st.integers(1, 25), min_size=1, max_size=5))
@example(  # usage under another account than its subscription's: a dead letter
    mix=[("sub", 0, 0, "created", "all"), ("usage", 0, 60, 1, "api_calls", 5, True)], cuts=[9]
)
def test_the_processor_gives_what_the_general_path_gives(mix: list, cuts: list) -> None:
    fast, general = outputs(mix, cuts)
    assert fast == general


def test_ordinary_usage_takes_the_fast_path() -> None:
    """Usage of a subscription's own account inside its period never reaches apply_input."""
    mix = [("sub", 0, 0, "created", "all"), ("sub", 1, 0, "created", "calls")]
    mix += [("usage", n % 2, 60 + n, n, METRICS[n % 4], n + 1, False) for n in range(40)]
    calls = []
    original = rating.apply_input

    def counting(*args: Any) -> Any:
        calls.append(args[1])
        return original(*args)

    rating.apply_input = counting
    try:
        fast, general = outputs(mix, [100])
    finally:
        rating.apply_input = original
    assert fast == general
    usage_calls = [e for e in calls if isinstance(e, Usage)]
    assert len(usage_calls) == 40  # all of them, once: by the general run only
    invoices = [codec(INVOICES.schema).decode(v) for t, _, v in fast if t == INVOICES.name]
    usage = [ln["quantity"] for inv in invoices for ln in inv["lines"] if ln["kind"] == "usage"]
    assert any(q > 0 for q in usage)


@pytest.mark.parametrize("broken", [_CountsRepeats, _MaxOfTheLast])
def test_the_processor_comparison_catches_a_broken_tally(broken: type) -> None:
    mix = [("sub", 0, 0, "created", "all")]
    mix += [("usage", 0, 60, 1, "api_calls", 5, False), ("usage", 0, 61, 1, "api_calls", 7, False)]
    mix += [("usage", 0, 62, 2, "seats", 5, False), ("usage", 0, 63, 3, "seats", 3, False)]
    fast, general = outputs(mix, [50])
    assert fast == general
    assert outputs(mix, [50], broken)[0] != general
