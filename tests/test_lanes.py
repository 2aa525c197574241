"""The lane routing configuration."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.lanes import LANES, WORKFLOWS, LaneConfigError, parse_urgent, workflows_of


def test_defaults_put_refunds_and_cancellations_in_the_priority_lane() -> None:
    urgent = parse_urgent("refund, cancellation")
    assert workflows_of("priority", urgent) == ("refund", "cancellation")
    assert workflows_of("standard", urgent) == ()


def test_unknown_workflow_or_lane_is_an_error_not_a_silent_demotion() -> None:
    with pytest.raises(LaneConfigError, match="refunds"):
        parse_urgent("refunds,cancellation")
    with pytest.raises(LaneConfigError, match="lanes"):
        workflows_of("fast", frozenset())


@given(st.sets(st.sampled_from(sorted(WORKFLOWS))))
def test_every_workflow_is_served_by_exactly_one_lane(urgent: set[str]) -> None:
    served = [w for lane in LANES for w in workflows_of(lane, parse_urgent(",".join(urgent)))]
    assert sorted(served) == sorted(WORKFLOWS)
    assert set(workflows_of("priority", frozenset(urgent))) == urgent


def test_the_history_a_lane_keeps_is_invisible_to_the_cyclic_collector() -> None:
    """Millions of paid invoices and subscriptions live in a lane's memory; if the garbage
    collector had to walk them, each full collection would pause urgent requests."""
    import gc
    from decimal import Decimal

    from streams.processors.lane import Paid, PartitionState, Subscription

    state = PartitionState()
    for i in range(1000):
        state.record_paid(f"inv-{i}", Paid(f"ch_{i}", "merchant-1", Decimal("9.90"), "EUR"))
        state.record_subscription(f"sub-{i}", Subscription(f"acct-{i}"))
    cancelled = state.subscription("sub-1")._replace(cancelled_by="e-1")  # type: ignore[union-attr]
    state.record_subscription("sub-1", cancelled)
    gc.collect()
    entries = [*state.paid.values(), *state.subscriptions.values()]
    assert len(entries) == 2000 and not any(gc.is_tracked(e) for e in entries)
    # ... and read back as what they are
    assert state.paid_for("inv-7") == Paid("ch_7", "merchant-1", Decimal("9.90"), "EUR")
    assert state.subscription("sub-1") == Subscription("acct-1", "e-1")
    assert state.paid_for("inv-x") is None and state.subscription("sub-x") is None
