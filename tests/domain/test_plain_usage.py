"""PlainUsage (the version-2 rating worker's usage fast path) against the contract's run
applying the same records one at a time."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.billing import ContractRun, PlainUsage, Rejected
from streams.domain.billing_snapshot import subscription_to_bytes
from streams.domain.catalog import Catalog
from streams.domain.events import SubscriptionCreated
from streams.domain.invoice import invoice_to_dict
from streams.domain.timestamps import from_micros, to_micros
from streams.fast_codec import usage_event

START = datetime(2026, 1, 1, tzinfo=UTC)
CATALOG = Catalog.from_dict({
    "late_usage_periods": 1,
    "plans": [{"plan_id": "metered", "currency": "EUR", "interval": "month", "charges": [
        {"charge_id": "calls", "model": "per_unit", "metric": "calls", "aggregation": "sum",
         "unit_amount": "0.10"},
        {"charge_id": "peak", "model": "per_unit", "metric": "calls", "aggregation": "max",
         "unit_amount": "1.00"},
        {"charge_id": "requests", "model": "per_unit", "metric": "calls", "aggregation": "count",
         "unit_amount": "0.01"},
        {"charge_id": "seats", "model": "per_unit", "metric": "seats", "aggregation": "latest",
         "unit_amount": "5.00"},
    ]}],
})  # fmt: skip

records = st.lists(
    st.tuples(
        st.integers(0, 12),  # event id (repeats happen)
        st.integers(0, 45 * 86_400),  # timestamp, s after the creation
        st.integers(0, 40 * 86_400),  # arrival delay, s
        st.sampled_from(["calls", "seats", "unpriced"]),
        st.integers(1, 10**13),  # quantity in 10^-9 units
        st.sampled_from(["a", "a", "a", "other"]),  # the record's account
    ),
    max_size=40,
)


def _run() -> ContractRun:
    run = ContractRun(CATALOG)
    run.apply(SubscriptionCreated(START, "a", "s", "metered"), START)
    return run


def _one_by_one(run: ContractRun, record: tuple, arrival_us: int) -> None:
    at = from_micros(arrival_us)
    run.advance(at)
    with contextlib.suppress(Rejected):  # the same dead letter on both sides
        run.apply(usage_event(record), at)


@settings(max_examples=300, deadline=None)
@given(records)
def test_plain_usage_counts_exactly_what_one_event_at_a_time_counts(drawn) -> None:
    inputs = sorted(
        (
            (f"e{n}", to_micros(START + timedelta(seconds=ts)), account, "s", metric, units),
            to_micros(START + timedelta(seconds=ts + delay)),
        )
        for n, ts, delay, metric, units, account in drawn
    )
    inputs.sort(key=lambda pair: pair[1])  # in order of arrival
    reference, fast = _run(), _run()
    for record, arrival in inputs:
        _one_by_one(reference, record, arrival)

    tally: PlainUsage | None = None
    latest = -1
    for record, arrival in inputs:
        if tally is None and fast.subs["s"].status == "active":
            tally = PlainUsage(fast.subs["s"])
        if tally is not None and tally.takes(record[1], arrival, record[2]):
            tally.records.append(record)
            latest = max(latest, arrival)
            continue
        if tally is not None:
            tally.settle()
            tally = None
        _one_by_one(fast, record, arrival)
    if tally is not None:
        tally.settle()
    if latest >= 0:
        fast.advance(from_micros(latest))

    assert subscription_to_bytes(fast.subs["s"]) == subscription_to_bytes(reference.subs["s"])
    end = START + timedelta(days=120)
    reference.advance(end)
    fast.advance(end)
    assert [invoice_to_dict(i) for i in fast.invoices] == [
        invoice_to_dict(i) for i in reference.invoices
    ]


def test_plain_usage_takes_only_the_open_segment_before_anything_falls_due() -> None:
    run = _run()
    tally = PlainUsage(run.subs["s"])
    jan, feb = to_micros(START), to_micros(datetime(2026, 2, 1, tzinfo=UTC))
    assert tally.takes(jan, jan, "a")
    assert not tally.takes(jan, jan, "other")  # another account's record: the general path
    assert not tally.takes(jan - 1, jan, "a")  # before the segment
    assert not tally.takes(jan + 10, jan + 5, "a")  # arrives before it happened
    assert not tally.takes(feb - 1, feb, "a")  # arrives when the period ends
    assert tally.takes(feb - 1, feb - 1, "a")
