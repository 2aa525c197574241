"""runtime.table against the real broker: a compacted topic read whole into a dict, the
latest value per key; kept current while it runs; catch_up waits for everything
published before it; a tombstone deletes its key; a record that does not decode leaves
the key's previous value and is counted."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from streams.codec import codec
from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import CUSTOMERS, ensure_topics
from streams.runtime.table import TopicTable

pytestmark = pytest.mark.kafka


def customer(account: str, token: str | None) -> bytes:
    return codec(CUSTOMERS.schema).encode({
        "account_id": account, "timestamp": datetime.now(UTC), "name": None, "email": None,
        "address": None, "country": None, "tax_exempt": False, "grace_hours": 0,
        "payment_method": token,
    })  # fmt: skip


def test_a_table_holds_the_latest_value_of_each_key_and_follows_the_topic(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    ensure_topics(clients.admin(pipeline_env, kafka_bootstrap), pipeline_env)
    producer = clients.producer(pipeline_env, kafka_bootstrap)

    def publish(account: str, value: bytes | None) -> None:
        producer.produce(CUSTOMERS.name, key=account.encode(), value=value)
        assert producer.flush(30) == 0

    for i in range(40):
        publish(f"acct-{i % 10}", customer(f"acct-{i % 10}", f"tok_{i}"))
    decode = codec(CUSTOMERS.schema).decode
    table = TopicTable(pipeline_env, kafka_bootstrap, CUSTOMERS.name,
                       lambda v: decode(v)["payment_method"], "table-test").start()  # fmt: skip
    try:
        table.catch_up(30)
        assert len(table) == 10
        assert {table.get(f"acct-{k}") for k in range(10)} == {f"tok_{30 + k}" for k in range(10)}

        publish("acct-3", customer("acct-3", "tok_changed"))
        publish("acct-4", None)  # a tombstone
        publish("acct-5", b"\x00not avro")
        table.catch_up(30)
        assert table.get("acct-3") == "tok_changed"
        assert table.get("acct-4") is None and len(table) == 9
        assert table.get("acct-5") == "tok_35"  # the record that does not decode is skipped
        skipped = REGISTRY.get_sample_value(
            "streambill_table_records_total",
            {"processor": "table-test", "topic": CUSTOMERS.name, "outcome": "undecodable"},
        )
        assert skipped == 1
    finally:
        table.close()
