"""Consumer-group lag, as the broker sees it: committed offsets against the
read-committed end of every partition (admin API only; nothing joins a group)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from streams.kafka.topics import namespace


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    end: int

    @property
    def lag(self) -> int:
        return self.end - (self.committed or 0)


def group_lags(admin: AdminClient, timeout: float = 10.0) -> list[PartitionLag]:
    """Every partition of every consumer group of this namespace with its lag (groups
    whose name starts with the namespace; the bench's and tests' own stay apart)."""
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
    wanted = {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for _, tp in committed}
    ends = {
        (tp.topic, tp.partition): info.offset
        for tp, fut in admin.list_offsets(
            wanted, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout
        ).items()
        for info in [fut.result()]
    }
    return sorted(
        (
            PartitionLag(
                group,
                tp.topic,
                tp.partition,
                tp.offset if tp.offset >= 0 else None,
                ends[(tp.topic, tp.partition)],
            )
            for group, tp in committed
        ),
        key=lambda r: (r.group, r.topic, r.partition),
    )


def group_members(admin: AdminClient, group: str, timeout: float = 10.0) -> dict[str, list[str]]:
    """client id -> the partitions (``topic[p]``) it owns now; {} while rebalancing."""
    description = admin.describe_consumer_groups([group], request_timeout=timeout)[group].result()
    return {
        m.client_id: sorted(f"{tp.topic}[{tp.partition}]" for tp in m.assignment.topic_partitions)
        for m in description.members
    }
