"""Offsets of work that finishes out of order (streams.runtime.offsets): a partition is
committed up to its first unfinished record, never past it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.runtime.offsets import OffsetTracker

TP = ("billing.invoices", 3)


def positions(tracker: OffsetTracker) -> dict[tuple[str, int], int]:
    return {(c.topic, c.partition): c.offset for c in tracker.commits()}


def test_the_position_stops_at_the_first_unfinished_record() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.start(TP, offset)
    tracker.finish(TP, 12)
    assert positions(tracker) == {}  # 10 is not finished: nothing to commit
    tracker.finish(TP, 10)
    assert positions(tracker) == {TP: 11}
    assert positions(tracker) == {}  # committed once
    tracker.finish(TP, 11)
    assert positions(tracker) == {TP: 13}  # 12 was finished already
    tracker.finish(TP, 13)
    assert positions(tracker) == {TP: 14}  # all finished: the next record


def test_a_record_finishes_once_all_its_outputs_are_acknowledged() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 5)
    delivered = tracker.finisher(TP, 5, outputs=2)
    delivered(None, None)
    assert positions(tracker) == {}
    delivered(None, None)
    assert positions(tracker) == {TP: 6}
    tracker.start(TP, 6)
    tracker.finisher(TP, 6, outputs=1)("broker gone", None)
    assert tracker.error == "delivery failed: broker gone" and positions(tracker) == {}


def test_a_revoked_partition_is_forgotten_and_late_answers_change_nothing() -> None:
    tracker = OffsetTracker()
    tracker.start(TP, 1)
    tracker.start(TP, 2)
    tracker.finish(TP, 1)
    tracker.forget(TP)
    tracker.finish(TP, 2)  # its new owner redoes it
    assert positions(tracker) == {}
    tracker.start(TP, 7)  # assigned again later: from where the group committed
    tracker.finish(TP, 7)
    assert positions(tracker) == {TP: 8}


def test_offsets_without_records_are_stepped_over() -> None:
    """Transaction markers take offsets that are never consumed."""
    tracker = OffsetTracker()
    tracker.start(TP, 10)
    tracker.start(TP, 12)
    tracker.finish(TP, 10)
    assert positions(tracker) == {TP: 12}


@given(st.permutations(range(20)), st.integers(0, 20))
def test_never_past_an_unfinished_record(order: list[int], done: int) -> None:
    tracker = OffsetTracker()
    for offset in range(20):
        tracker.start(TP, offset)
    finished: set[int] = set()
    committed = 0
    for offset in order[:done]:
        tracker.finish(TP, offset)
        finished.add(offset)
        committed = positions(tracker).get(TP, committed)
        assert set(range(committed)) <= finished  # everything before it is finished
        assert committed == 20 or committed not in finished  # and it stops at the first gap
