"""Event-time alignment of two co-partitioned topics (streams.runtime.alignment), pure:
records go in timestamp order, the first topic's first on ties; a record waits while
the other topic may still hold an earlier one; a full buffer pauses its partition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streams.runtime.alignment import MAX_BUFFERED, Alignment
from tests.hostile import Msg, OfflineAdmin, OfflineConsumer

A, B = "subscriptions", "usage"  # A goes first on a tie


@dataclass
class Rec:
    timestamp: float
    msg: Any


class CountingAdmin(OfflineAdmin):
    """Every partition caught up; the partitions asked about, per request."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[tuple[str, int]]] = []

    def list_offsets(self, specs: dict[Any, Any], **options: Any) -> dict[Any, Any]:
        self.asked.append(sorted((tp.topic, tp.partition) for tp in specs))
        return super().list_offsets(specs, **options)


def aligned(**options: Any) -> Alignment:
    return Alignment(OfflineConsumer(), CountingAdmin(), A, B, **options)


def fill(alignment: Alignment, topic: str, timestamps: list[float], p: int = 0) -> None:
    buffer = alignment.buffer(p)[topic]
    first = buffer[-1].msg.offset() + 1 if buffer else 0
    for n, ts in enumerate(timestamps, first):
        buffer.append(Rec(ts, Msg(topic, b"", None, p, n)))


def order(alignment: Alignment, caught: dict, p: int = 0) -> tuple[list, Any, dict]:
    ready: list[Rec] = []
    positions: dict = {}
    need = alignment.order(p, positions, caught, ready)
    return [(r.msg.topic(), r.timestamp) for r in ready], need, positions


def test_records_go_in_timestamp_order_the_first_topic_first_on_ties() -> None:
    alignment = aligned()
    fill(alignment, A, [1, 3, 5])
    fill(alignment, B, [2, 3, 4, 9])
    ready, need, positions = order(alignment, {(A, 0): True, (B, 0): True})
    # in time order; then B's 9 alone: A is caught up, nothing of it comes before
    assert ready == [(A, 1), (B, 2), (A, 3), (B, 3), (B, 4), (A, 5), (B, 9)]
    assert need is None and positions == {(A, 0): 3, (B, 0): 4}


def test_a_record_waits_while_the_other_topic_may_hold_an_earlier_one() -> None:
    alignment = aligned()
    fill(alignment, A, [1, 8])
    fill(alignment, B, [5])
    # A's 8 waits: B's buffer is empty and nobody has asked whether B is caught up
    ready, need, positions = order(alignment, {})
    assert ready == [(A, 1), (B, 5)] and need == (B, 0)
    assert positions == {(A, 0): 1, (B, 0): 1}
    # B is not caught up: A's 8 waits
    ready, need, _ = order(alignment, {(B, 0): False})
    assert ready == [] and need is None and alignment.waiting
    # B is caught up: it goes
    ready, need, positions = order(alignment, {(B, 0): True})
    assert ready == [(A, 8)] and positions == {(A, 0): 2} and not alignment.waiting


def test_when_the_broker_cannot_say_records_go_after_max_idle() -> None:
    waits = aligned(max_idle=3600)
    fill(waits, A, [1])
    assert order(waits, {(B, 0): None})[0] == [] and waits.waiting
    goes = aligned(max_idle=0)
    fill(goes, A, [1])
    assert order(goes, {(B, 0): False})[0] == []  # known to be behind: no time-out
    assert order(goes, {(B, 0): None})[0] == [(A, 1)] and not goes.waiting


def test_drain_releases_every_partition_and_asks_what_it_needs() -> None:
    alignment = aligned()
    fill(alignment, A, [1, 2], p=0)
    fill(alignment, B, [1], p=1)
    released: list = []
    positions: dict = {}
    alignment.drain(positions, lambda ready, p: released.append((p, [r.timestamp for r in ready])))
    assert alignment.admin.asked == [[(A, 1), (B, 0)]]  # one look for both partitions
    assert sorted(released) == [(0, [1, 2]), (1, [1])]
    assert positions == {(A, 0): 2, (B, 1): 1}


def test_a_full_buffer_pauses_its_partition_until_half_is_left() -> None:
    alignment = aligned()
    fill(alignment, B, [float(n) for n in range(MAX_BUFFERED)])
    alignment.backpressure()
    assert alignment.consumer.paused == {(B, 0)}
    buffer = alignment.buffers[0][B]
    for _ in range(MAX_BUFFERED // 2):
        buffer.popleft()
    alignment.backpressure()
    assert alignment.consumer.paused == {(B, 0)}  # half left: still paused
    buffer.popleft()
    alignment.backpressure()
    assert alignment.consumer.paused == set()


def test_a_revoked_partition_leaves_nothing_behind() -> None:
    alignment = aligned()
    fill(alignment, B, [float(n) for n in range(MAX_BUFFERED)], p=2)
    alignment.backpressure()
    order(alignment, {(A, 2): False}, p=2)
    alignment.revoke(2)
    assert alignment.buffers == {} and not alignment.waiting and alignment.throttled == set()
    assert not alignment.holds_before(2, {B: 10})
