"""Consumer-group lag, as the broker sees it: the records each group still has to read,
from its committed offsets and the read-committed end (last stable offset) of every
partition. Nothing joins a group.

Offsets are not records. A transactional producer writes a commit (or abort) marker
after each transaction, and a read_committed consumer is never given markers or aborted
records. A group that commits "last record read + 1", as every transactional processor
does (KAFKA-6607), stays one marker short of the last stable offset when it has read
everything, so "end - committed" would show it 1 behind on every partition for good.
The gap is therefore counted rather than subtracted: a read_committed consumer,
assigned (never subscribed: it joins no group) at the committed offsets, reads each gap
up to the end and counts the records it is given. Gaps are read smallest first, up to
``COUNTED_GAP_BUDGET`` offsets in all, which covers every caught-up or nearly caught-up
group; a gap beyond the budget, or not read to its end within the timeout, is shown as
the offset gap (an over-count by the markers in it, one per transaction, when the group
is far behind anyway).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import group_id, namespace

# offsets read (at most) per call to count the records in the gaps
COUNTED_GAP_BUDGET = 20_000


class UnknownGroup(LookupError):
    """No consumer group of that name in this namespace."""


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    end: int  # the last stable offset (read_committed end of the partition)
    lag: int  # records the group still has to read (markers and aborted records excluded)


def group_lags(
    settings: Settings, bootstrap: str, timeout: float = 10.0, group: str | None = None
) -> list[PartitionLag]:
    """Every partition of every consumer group of this namespace with its lag (groups
    whose name starts with the namespace; the bench's and tests' own stay apart), or of
    ``group`` alone (its full id); an unknown ``group`` raises UnknownGroup."""
    admin = clients.admin(settings, bootstrap)
    ns = namespace()
    listed = admin.list_consumer_groups(request_timeout=timeout).result()
    if listed.errors and not listed.valid:
        # no broker answered (unreachable, or authentication refused): not "no groups"
        raise KafkaException(listed.errors[0])
    groups = sorted(
        g.group_id
        for g in listed.valid
        if g.group_id.startswith(ns) and not g.group_id.startswith(f"{ns}streambill-reader-")
    )
    if group is not None:
        if group not in groups:
            raise UnknownGroup(group)
        groups = [group]
    committed = _committed(admin, groups, timeout)
    if not committed:
        return []
    wanted = {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for _, tp in committed}
    ends = {
        (tp.topic, tp.partition): info.offset
        for tp, fut in admin.list_offsets(
            wanted, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout
        ).items()
        for info in [fut.result()]
    }
    starts = {(g, tp.topic, tp.partition): max(tp.offset, 0) for g, tp in committed}
    counted = _records_in_gaps(settings, bootstrap, starts, ends, timeout)
    rows = []
    for g, tp in committed:
        key = (tp.topic, tp.partition)
        start, end = starts[(g, *key)], ends[key]
        if start >= end:
            lag = 0
        elif key in counted:
            offsets = counted[key]
            lag = len(offsets) - bisect_left(offsets, start)
        else:
            lag = end - start
        rows.append(PartitionLag(g, tp.topic, tp.partition,
                                 tp.offset if tp.offset >= 0 else None, end, lag))  # fmt: skip
    return sorted(rows, key=lambda r: (r.group, r.topic, r.partition))


def _committed(
    admin: AdminClient, groups: list[str], timeout: float
) -> list[tuple[str, TopicPartition]]:
    committed: list[tuple[str, TopicPartition]] = []
    for group in groups:
        future = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=timeout
        )[group]
        committed += [(group, tp) for tp in future.result().topic_partitions]
    if not committed:
        return []
    # a partition the group never committed (it had nothing yet when the group last
    # committed) is still the group's: its lag is all of it
    metadata = admin.list_topics(timeout=timeout).topics
    known = {(g, tp.topic, tp.partition) for g, tp in committed}
    for group, topic in sorted({(g, tp.topic) for g, tp in committed}):
        for p in metadata[topic].partitions if topic in metadata else ():
            if (group, topic, p) not in known:
                committed.append((group, TopicPartition(topic, p, -1001)))
    return committed


def _records_in_gaps(
    settings: Settings,
    bootstrap: str,
    starts: dict[tuple[str, str, int], int],
    ends: dict[tuple[str, int], int],
    timeout: float,
) -> dict[tuple[str, int], list[int]]:
    """(topic, partition) -> the sorted offsets of the records a read_committed consumer
    is given between the lowest committed offset of any group there and the end, for
    the partitions (smallest gap first, within the budget) read to that end in time."""
    lowest: dict[tuple[str, int], int] = {}
    for (_, topic, partition), start in starts.items():
        key = (topic, partition)
        if start < ends[key]:
            lowest[key] = min(start, lowest.get(key, start))
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    budget = COUNTED_GAP_BUDGET
    for key, start in sorted(lowest.items(), key=lambda kv: ends[kv[0]] - kv[1]):
        if ends[key] - start > budget:
            break
        budget -= ends[key] - start
        spans[key] = (start, ends[key])
    if not spans:
        return {}
    consumer = clients.consumer(
        settings, bootstrap, group_id("streambill-reader-lag"),
        **{"enable.partition.eof": True, "fetch.wait.max.ms": 10},
    )  # fmt: skip
    offsets: dict[tuple[str, int], list[int]] = {key: [] for key in spans}
    unread = set(spans)
    try:
        consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in spans.items()])
        deadline = time.monotonic() + timeout
        while unread and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, timeout=0.2):
                key = (msg.topic(), msg.partition())
                if key not in unread:
                    continue
                error = msg.error()
                if error is not None:  # the end (of what is committed now), or a failure
                    if error.code() == KafkaError._PARTITION_EOF:
                        unread.discard(key)
                elif msg.offset() >= spans[key][1]:  # written since the end was asked
                    unread.discard(key)
                else:
                    offsets[key].append(msg.offset())
    finally:
        consumer.close()
    return {key: found for key, found in offsets.items() if key not in unread}


def group_members(admin: AdminClient, group: str, timeout: float = 10.0) -> dict[str, list[str]]:
    """client id -> the partitions (``topic[p]``) it owns now; {} while rebalancing."""
    description = admin.describe_consumer_groups([group], request_timeout=timeout)[group].result()
    return {
        m.client_id: sorted(f"{tp.topic}[{tp.partition}]" for tp in m.assignment.topic_partitions)
        for m in description.members
    }
