"""The stream runtime's loop and transactions against the real broker: a committed
transaction's outputs and input offsets are visible to read_committed readers; one that
fails is aborted, nothing of it is visible, and its records are read again; a partition
paused when it is revoked is fetched again once reassigned."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import OFFSET_INVALID, TopicPartition
from prometheus_client import REGISTRY

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import ALERTS, CONTROL, PAYMENT_CONTROL, group_id
from streams.runtime.loop import StreamLoop
from streams.runtime.transaction import Transactions

pytestmark = pytest.mark.kafka
GROUP = "runtime-test"


@pytest.fixture
def loops(pipeline_env: Settings, kafka_bootstrap: str) -> Iterator[Callable[..., StreamLoop]]:
    made: list[StreamLoop] = []

    def make(transactional: bool = True, **consumer_config: Any) -> StreamLoop:
        producer_config = {"transactional.id": group_id(GROUP)}  # one worker
        loop = StreamLoop.from_settings(
            "runtime-test", pipeline_env, kafka_bootstrap, GROUP,
            consumer_config, producer_config if transactional else None,
        )  # fmt: skip
        made.append(loop)
        return loop

    yield make
    for loop in made:
        loop.close()


def publish(settings: Settings, bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = clients.producer(settings, bootstrap)
    for value in values:
        producer.produce(topic, value=value, partition=0)
    assert producer.flush(30) == 0


def poll_until(loop: StreamLoop, n: int, timeout: float = 30.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += loop.poll(100, 0.2)
    return got


def committed_values(settings: Settings, bootstrap: str, topic: str) -> list[bytes]:
    """Every record of the topic's partition 0 a read_committed reader sees."""
    reader = clients.consumer(settings, bootstrap, group_id("runtime-reader"),
                              **{"enable.partition.eof": True})  # fmt: skip
    reader.assign([TopicPartition(topic, 0, 0)])
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = reader.poll(0.2)
            if msg is None:
                continue
            if msg.error() is not None:
                break  # end of the partition
            values.append(msg.value())
        return values
    finally:
        reader.close()


def group_offset(settings: Settings, bootstrap: str, topic: str) -> int:
    admin = clients.consumer(settings, bootstrap, group_id(GROUP))
    try:
        (tp,) = admin.committed([TopicPartition(topic, 0)], timeout=10)
        return tp.offset
    finally:
        admin.close()


def transact(loop: StreamLoop, tx: Transactions, msgs: list[Any], fail: bool = False) -> None:
    with tx.open() as offsets:
        for msg in msgs:
            loop.producer.produce(ALERTS.name, value=b"out-" + msg.value(), partition=0,
                                  on_delivery=tx.on_delivery)  # fmt: skip
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
        if fail:
            raise RuntimeError("the processor failed mid-transaction")


def test_a_committed_transaction_shows_its_outputs_and_offsets(
    pipeline_env: Settings, kafka_bootstrap: str, loops: Callable[..., StreamLoop]
) -> None:
    publish(pipeline_env, kafka_bootstrap, CONTROL.name, [b"a", b"b", b"c"])
    loop = loops()
    tx = Transactions(loop.producer, loop.consumer)
    loop.subscribe([CONTROL.name])
    msgs = poll_until(loop, 3)
    assert [m.value() for m in msgs] == [b"a", b"b", b"c"]
    transact(loop, tx, msgs)
    assert committed_values(pipeline_env, kafka_bootstrap, ALERTS.name) == [
        b"out-a", b"out-b", b"out-c",
    ]  # fmt: skip
    assert group_offset(pipeline_env, kafka_bootstrap, CONTROL.name) == 3


def test_a_failed_transaction_is_aborted_and_its_records_read_again(
    pipeline_env: Settings, kafka_bootstrap: str, loops: Callable[..., StreamLoop]
) -> None:
    publish(pipeline_env, kafka_bootstrap, CONTROL.name, [b"a", b"b"])
    loop = loops()
    tx = Transactions(loop.producer, loop.consumer)
    loop.subscribe([CONTROL.name])
    msgs = poll_until(loop, 2)
    with pytest.raises(RuntimeError, match="mid-transaction"):
        transact(loop, tx, msgs, fail=True)
    assert committed_values(pipeline_env, kafka_bootstrap, ALERTS.name) == []
    assert group_offset(pipeline_env, kafka_bootstrap, CONTROL.name) == OFFSET_INVALID
    loop.close()
    # a restarted worker (the same transactional id) reads them again, and commits them
    again = loops()
    tx = Transactions(again.producer, again.consumer)
    again.subscribe([CONTROL.name])
    msgs = poll_until(again, 2)
    assert [m.value() for m in msgs] == [b"a", b"b"]
    transact(again, tx, msgs)
    assert committed_values(pipeline_env, kafka_bootstrap, ALERTS.name) == [b"out-a", b"out-b"]


def test_a_delivery_failure_aborts_the_transaction(
    pipeline_env: Settings, kafka_bootstrap: str, loops: Callable[..., StreamLoop]
) -> None:
    publish(pipeline_env, kafka_bootstrap, CONTROL.name, [b"a"])
    loop = loops()
    tx = Transactions(loop.producer, loop.consumer)
    loop.subscribe([CONTROL.name])
    msgs = poll_until(loop, 1)
    with pytest.raises(RuntimeError, match="delivery failed"), tx.open() as offsets:
        loop.producer.produce(ALERTS.name, value=b"x", partition=0, on_delivery=tx.on_delivery)
        # a partition the topic does not have: its delivery report is a failure
        loop.producer.produce(ALERTS.name, value=b"y", partition=99, on_delivery=tx.on_delivery)
        offsets[(CONTROL.name, 0)] = msgs[0].offset() + 1
    assert committed_values(pipeline_env, kafka_bootstrap, ALERTS.name) == []
    assert group_offset(pipeline_env, kafka_bootstrap, CONTROL.name) == OFFSET_INVALID


def test_a_partition_paused_when_revoked_is_fetched_once_reassigned(
    pipeline_env: Settings, kafka_bootstrap: str, loops: Callable[..., StreamLoop]
) -> None:
    """Eager (range) rebalancing revokes every partition of every member: a member joining
    the group for another topic takes this loop's partitions away and gives them back."""
    loop = loops(transactional=False, **{"partition.assignment.strategy": "range"})
    revoked: list[int] = []
    loop.subscribe([CONTROL.name], on_revoke=lambda _c, tps: revoked.append(len(tps)))
    deadline = time.monotonic() + 30
    while not loop.consumer.assignment() and time.monotonic() < deadline:
        loop.poll(10, 0.2)
    assert loop.consumer.assignment()
    loop.consumer.pause([TopicPartition(CONTROL.name, 0)])
    other = clients.consumer(pipeline_env, kafka_bootstrap, group_id(GROUP),
                             **{"partition.assignment.strategy": "range"})  # fmt: skip
    try:
        other.subscribe([PAYMENT_CONTROL.name])
        deadline = time.monotonic() + 60
        while not revoked and time.monotonic() < deadline:
            other.poll(0.1)
            loop.poll(10, 0.1)
        assert revoked, "no rebalance"
        publish(pipeline_env, kafka_bootstrap, CONTROL.name, [b"after"])
        got: list[Any] = []
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            other.poll(0.1)
            got = loop.poll(10, 0.1)
        assert [m.value() for m in got] == [b"after"]
    finally:
        other.close()


def test_lag_is_reported_at_the_first_poll_after_an_assignment(
    pipeline_env: Settings, kafka_bootstrap: str, loops: Callable[..., StreamLoop]
) -> None:
    """The lag alert reads the gauge: a worker that just took partitions over reports their
    lag at once, not one refresh period (here an hour) after its first poll."""
    publish(pipeline_env, kafka_bootstrap, CONTROL.name, [b"a", b"b", b"c"])
    loop = loops(transactional=False)
    loop.lag.every_s = 3600.0
    loop.subscribe([CONTROL.name])
    loop.poll(10, 0.0)  # the refresh of the first poll: nothing assigned yet
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not lag_reported(CONTROL.name):
        loop.poll(1, 0.2)
    assert lag_reported(CONTROL.name)


def lag_reported(topic: str) -> bool:
    return any(
        s.labels.get("processor") == "runtime-test" and s.labels.get("topic") == topic
        for metric in REGISTRY.collect() if metric.name == "streambill_consumer_lag"
        for s in metric.samples
    )  # fmt: skip
