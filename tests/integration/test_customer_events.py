"""`streambill customer set` tells the rating processor too: a customer.updated event on
billing.subscriptions (what the rating contract's rule 16 reads), acknowledged before the
whole record goes to billing.customers."""

from __future__ import annotations

import os
import subprocess
import sys

from confluent_kafka import TopicPartition

from streams.config import Settings
from streams.domain.events import CustomerUpdated
from streams.kafka import clients
from streams.kafka.topics import CUSTOMERS, SUBSCRIPTIONS
from streams.rating_records import decode_input


def records(settings: Settings, bootstrap: str, topic: str) -> list:
    consumer = clients.consumer(settings, bootstrap, "customer-events-test",
                                **{"enable.partition.eof": True})  # fmt: skip
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        out, ended = [], set()
        while len(ended) < len(parts):
            for msg in consumer.consume(100, timeout=1):
                if msg.error():
                    ended.add(msg.partition())
                else:
                    out.append(msg)
        return out
    finally:
        consumer.close()


def test_customer_set_publishes_the_rating_event_first(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "streams.cli", "customer", "set", "acct-7", "--country", "NL",
         "--grace-hours", "5", "--payment-method", "tok_visa"],
        env={**os.environ}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    [event_msg] = records(pipeline_env, kafka_bootstrap, SUBSCRIPTIONS.name)
    [customer_msg] = records(pipeline_env, kafka_bootstrap, CUSTOMERS.name)
    event, account, error = decode_input(event_msg.value(), False, None, contract=2)
    assert error is None and account == "acct-7" and event_msg.key() == b"acct-7"
    assert event == CustomerUpdated(event.timestamp, "acct-7", "NL", False, 5)
    assert customer_msg.key() == b"acct-7"
    assert event_msg.timestamp()[1] <= customer_msg.timestamp()[1]
