"""Routing of customer accounts to merchant accounts: stable, even, and independent of
the Kafka partition that the same key lands in (checked against the real broker's
partitioning, as the producer of billing.invoices does it)."""

from __future__ import annotations

import uuid
from collections import Counter

from confluent_kafka.admin import NewTopic

from streams.config import Settings
from streams.kafka import clients
from streams.processors.payments import route

MERCHANTS = ("merchant-1", "merchant-2", "merchant-3", "merchant-4")


def test_route_is_stable_across_processes() -> None:
    """A customer must stay on its merchant account (an attempt re-sent elsewhere would
    not find its idempotency key there): pinned values catch a changed function."""
    assert route("acct-00000000", MERCHANTS) == "merchant-2"
    assert route("acct-00000001", MERCHANTS) == "merchant-4"
    assert route("customer-42", ("only",)) == "only"


def test_route_spreads_accounts_evenly() -> None:
    shares = Counter(route(f"acct-{i:08d}", MERCHANTS) for i in range(40_000))
    assert set(shares) == set(MERCHANTS)
    assert all(abs(n - 10_000) < 400 for n in shares.values()), shares


def test_every_partition_feeds_every_merchant_account(kafka_bootstrap: str) -> None:
    """Invoices are keyed by account: a dispatcher that reads some partitions ahead of
    others must still find work for every merchant account in each of them. (With crc32
    routing, the partitioner's own hash, even partitions held only two of four accounts.)"""
    settings = Settings()
    admin = clients.admin(settings, kafka_bootstrap)
    topic = f"test-routing-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])[topic].result()
    try:
        producer = clients.producer(settings, kafka_bootstrap)
        partition_of: dict[str, int] = {}

        def delivered(err: object, msg: object) -> None:
            assert err is None, err
            partition_of[msg.key().decode()] = msg.partition()  # type: ignore[attr-defined]

        for i in range(12_000):
            producer.produce(topic, key=f"acct-{i:08d}".encode(), value=b"",
                             on_delivery=delivered)  # fmt: skip
            producer.poll(0)
        assert producer.flush(30) == 0
        per_partition: dict[int, Counter[str]] = {}
        for account, partition in partition_of.items():
            per_partition.setdefault(partition, Counter())[route(account, MERCHANTS)] += 1
        assert len(per_partition) == 6
        for partition, shares in per_partition.items():
            total = sum(shares.values())
            low = min(shares.get(m, 0) for m in MERCHANTS)
            assert low > 0.2 * total, (partition, shares)
    finally:
        admin.delete_topics([topic])[topic].result()
