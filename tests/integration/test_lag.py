"""`streambill lag` on the real broker: a group that read everything of a transactional
topic has nothing left to read (the commit markers are not records), new records are
counted one by one, aborted ones not at all; `--json` is one document; an unknown group
is an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.lag import UnknownGroup, group_lags
from streams.kafka.topics import group_id, namespace
from streams.ops.dashboard import Dashboard

pytestmark = pytest.mark.kafka
PARTITIONS = 3


def produce_in_transactions(
    producer: Producer, topic: str, records: int, per_transaction: int
) -> None:
    for start in range(0, records, per_transaction):
        producer.begin_transaction()
        for n in range(start, min(records, start + per_transaction)):
            producer.produce(topic, key=f"k{n}".encode(), value=b"v")
        producer.commit_transaction()


def read_and_commit(settings: Settings, bootstrap: str, topic: str, group: str, n: int) -> None:
    """Read n records as a group and commit "last record read + 1" on each partition, as
    the transactional processors do."""
    consumer = clients.consumer(settings, bootstrap, group)
    consumer.subscribe([topic])
    read: dict[int, int] = {}
    deadline = time.monotonic() + 60
    seen = 0
    try:
        while seen < n:
            assert time.monotonic() < deadline, f"read {seen} of {n}"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            read[msg.partition()] = msg.offset() + 1
            seen += 1
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in read.items()],
                        asynchronous=False)  # fmt: skip
    finally:
        consumer.close()


def lag_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", "lag", *args],
                          capture_output=True, text=True, timeout=120, env=os.environ)  # fmt: skip


def test_a_caught_up_group_of_a_transactional_topic_has_no_lag(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    settings = pipeline_env
    admin = clients.admin(settings, kafka_bootstrap)
    topic = f"{namespace()}lag-check"
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result()
    group = group_id("lag-check")
    producer = clients.producer(settings, kafka_bootstrap, **{"transactional.id": topic})
    producer.init_transactions()
    produce_in_transactions(producer, topic, 30, per_transaction=4)
    read_and_commit(settings, kafka_bootstrap, topic, group, 30)

    rows = group_lags(settings, kafka_bootstrap, group=group)
    assert len(rows) == PARTITIONS and all(r.topic == topic for r in rows), rows
    assert [r.lag for r in rows] == [0] * PARTITIONS, rows
    # the offsets alone would say otherwise: every partition ends on a commit marker
    assert all(r.end - r.committed >= 1 for r in rows), rows

    produce_in_transactions(producer, topic, 2, per_transaction=1)
    producer.begin_transaction()  # aborted records are never read: not lag either
    producer.produce(topic, key=b"aborted", value=b"v", partition=0)
    producer.flush()  # in the log, then aborted (unsent records would just be dropped)
    producer.abort_transaction()
    # a transaction after it on the same partition: the abort marker is written by then
    producer.begin_transaction()
    producer.produce(topic, key=b"after", value=b"v", partition=0)
    producer.commit_transaction()
    rows = group_lags(settings, kafka_bootstrap, group=group)
    assert sum(r.lag for r in rows) == 3, rows

    cli = lag_cli("--group", "lag-check", "--json")
    assert cli.returncode == 0, cli.stderr[-2000:]
    shown = json.loads(cli.stdout)
    assert [(r["group"], r["topic"], r["partition"], r["lag"]) for r in shown] == [
        (r.group, r.topic, r.partition, r.lag) for r in rows
    ]
    table = lag_cli("--group", "lag-check")
    assert table.returncode == 0 and f"{group}: 3 behind" in table.stdout, table

    # a second group that read all of it, on the same partitions: nothing to read; the
    # dashboard lists both, worst first (not by name)
    caught_up = group_id("lag-a-caught-up")
    read_and_commit(settings, kafka_bootstrap, topic, caught_up, 33)
    shown_by_dashboard = Dashboard(settings, kafka_bootstrap)._lag()
    assert [(g["group"], g["lag"]) for g in shown_by_dashboard] == [(group, 3), (caught_up, 0)]
    assert [p["lag"] for p in shown_by_dashboard[0]["partitions"]] == sorted(
        (r.lag for r in rows), reverse=True
    )


def test_an_unknown_group_is_an_error(pipeline_env: Settings, kafka_bootstrap: str) -> None:
    with pytest.raises(UnknownGroup):
        group_lags(pipeline_env, kafka_bootstrap, group=group_id("no-such-group"))
    cli = lag_cli("--group", "no-such-group")
    assert cli.returncode == 1 and cli.stdout == "", cli
    assert f"no consumer group '{group_id('no-such-group')}'" in cli.stderr, cli.stderr


def test_a_processors_lag_gauge_counts_from_where_a_new_owner_resumes(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    """A partition handed to a worker that has delivered nothing yet has no position:
    its lag counts from the committed offset (0 when the group read everything), not the
    whole partition (which fired the lag alert after every rebalance)."""
    from streams.metrics import CONSUMER_LAG, LagTracker

    settings = pipeline_env
    topic = f"{namespace()}gauge"
    admin = clients.admin(settings, kafka_bootstrap)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result()
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(60):
        producer.produce(topic, key=f"k{n}".encode(), value=b"v")
    producer.flush(30)
    group = group_id("gauge-readers")
    read_and_commit(settings, kafka_bootstrap, topic, group, 60)
    for _ in range(3):  # not read by anyone: the only lag there is
        producer.produce(topic, key=b"later", value=b"v")
    producer.flush(30)

    consumer = clients.consumer(settings, kafka_bootstrap, group)
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    try:
        consumer.consume(1, timeout=0)  # fetches start; nothing is delivered yet
        deadline = time.monotonic() + 30
        while min(consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1]
                  for p in range(PARTITIONS)) < 0:  # fmt: skip
            assert time.monotonic() < deadline, "no watermarks cached"
            consumer.consume(1, timeout=0)
            time.sleep(0.1)
        positions = consumer.position([TopicPartition(topic, p) for p in range(PARTITIONS)])
        assert all(tp.offset < 0 for tp in positions), positions
        LagTracker(consumer, "gauge-test", every_s=0).maybe_update()
        lags = [CONSUMER_LAG.labels("gauge-test", topic, str(p))._value.get()
                for p in range(PARTITIONS)]  # fmt: skip
        assert sum(lags) == 3, lags
    finally:
        consumer.close()
