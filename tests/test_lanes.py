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
