"""The lanes on the real broker and chDB: cancellations through the priority lane
(entitlement at once, then rating's proration credit), their bad requests, and the
routing of a workflow to the standard lane by configuration."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from streams.codec import codec
from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import CANCELLATIONS, DEAD_LETTER, ENTITLEMENTS, INVOICES, SUBSCRIPTIONS
from streams.publish import read_topic
from streams.stack import ProcessorProcess
from tests.integration.helpers import Procs, scalar, start_rating, start_sink, wait_until

pytestmark = pytest.mark.kafka
START = datetime.now(UTC).replace(microsecond=0) - timedelta(days=10)


def event(kind: str, event_id: str, account: str, sub: str, **extra: Any) -> dict[str, Any]:
    return {"event_id": event_id, "type": f"subscription.{kind}", "account_id": account,
            "subscription_id": sub, "timestamp": extra.pop("at", START), "plan_id": None,
            "mode": None, "payment_method": None, **extra}  # fmt: skip


def produce(settings: Settings, bootstrap: str, topic: Any, records: list[dict]) -> None:
    producer = clients.producer(settings, bootstrap)
    encode = codec(topic.schema).encode
    for r in records:
        producer.produce(topic.name, key=r["account_id"].encode(), value=encode(r))
        producer.flush()  # in order: a repeat comes after its first


def start_lane(settings: Settings, bootstrap: str, lane: str, urgent: str) -> ProcessorProcess:
    env = {"STREAMBILL_URGENT_WORKFLOWS": urgent}
    return ProcessorProcess(settings, bootstrap, "lane", lane, env=env).start()


def deactivations(settings: Settings, bootstrap: str) -> list[tuple[str, str]]:
    return sorted((e["subscription_id"], e["entitlement_id"])
                  for e in read_topic(settings, bootstrap, ENTITLEMENTS))  # fmt: skip


def test_cancellations_in_the_priority_lane(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    rating = procs.add(start_rating(settings, kafka_bootstrap))
    lane = procs.add(start_lane(settings, kafka_bootstrap, "priority", "refund,cancellation"))
    created = [event("created", f"e-new-{i}", "acct-1", f"sub-{i}", plan_id="pro-usd")
               for i in range(4)]  # fmt: skip
    produce(settings, kafka_bootstrap, SUBSCRIPTIONS, created)
    at = START + timedelta(days=3)
    cancel = [
        event("cancelled", "c-1", "acct-1", "sub-0", mode="immediate", at=at),
        event("cancelled", "c-1", "acct-1", "sub-0", mode="immediate", at=at),  # repeat
        event("cancelled", "c-2", "acct-1", "sub-1", mode="end_of_period", at=at),
        event("cancelled", "c-3", "acct-1", "sub-0", mode="immediate", at=at),  # again
        event("cancelled", "c-4", "acct-1", "sub-404", mode="immediate", at=at),
        event("cancelled", "c-5", "acct-2", "sub-2", mode="immediate", at=at),
        event("cancelled", "c-6", "acct-1", "sub-2", mode="someday", at=at),
        event("plan_changed", "c-7", "acct-1", "sub-3", plan_id="starter-eur", at=at),
    ]
    t0 = time.monotonic()
    produce(settings, kafka_bootstrap, CANCELLATIONS, cancel)
    wait_until(lambda: deactivations(settings, kafka_bootstrap), 30, "a deactivation",
               [lane])  # fmt: skip
    assert time.monotonic() - t0 < 10
    lettered = "SELECT count() FROM dead_letters FINAL WHERE processor = 'lane'"
    wait_until(lambda: scalar(settings, lettered) == 5, 60, "the lane's dead letters",
               [lane, sink])  # fmt: skip
    # the immediate one deactivated (its repeat again, under the same id); end_of_period not
    assert (
        deactivations(settings, kafka_bootstrap) == [("sub-0", "cancellation:c-1:deactivate")] * 2
    )
    assert scalar(settings, "SELECT count() FROM entitlements FINAL") == 1
    letters = {d["dead_letter_id"]: d for d in read_topic(settings, kafka_bootstrap, DEAD_LETTER)}
    reasons = sorted(codec(CANCELLATIONS.schema).decode(d["value"])["event_id"] + ":" + d["reason"]
                     for d in letters.values() if d["processor"] == "lane")  # fmt: skip
    assert reasons[0] == "c-3:already_cancelled"
    assert reasons[1] == "c-4:unknown_subscription"
    # acct-2 claims acct-1's subscription: refused whichever partition its key lands on
    assert reasons[2] in ("c-5:account_mismatch", "c-5:unknown_subscription")
    assert reasons[3:] == ["c-6:invalid_mode", "c-7:not_a_cancellation"]
    # forwarded once each to billing.subscriptions, where rating credits the rest of sub-0's period
    forwarded = [e["event_id"] for e in read_topic(settings, kafka_bootstrap, SUBSCRIPTIONS)
                 if e["type"] == "subscription.cancelled"]  # fmt: skip
    assert sorted(forwarded) == ["c-1", "c-2"]

    def credits() -> list[dict]:
        return [line for inv in read_topic(settings, kafka_bootstrap, INVOICES)
                if inv["subscription_id"] == "sub-0" for line in inv["lines"]
                if line["kind"] == "proration_credit"]  # fmt: skip

    wait_until(lambda: credits(), 60, "sub-0's proration credit", [rating])
    assert credits()[0]["amount"] < 0
    assert lane.alive and rating.alive


def test_a_workflow_not_urgent_runs_in_the_standard_lane(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    urgent = "refund"  # cancellations demoted to the standard lane
    priority = procs.add(start_lane(settings, kafka_bootstrap, "priority", urgent))
    produce(settings, kafka_bootstrap, SUBSCRIPTIONS,
            [event("created", "e-new", "acct-1", "sub-0", plan_id="pro-usd")])  # fmt: skip
    cancel = event("cancelled", "c-1", "acct-1", "sub-0", mode="immediate")
    produce(settings, kafka_bootstrap, CANCELLATIONS, [cancel])
    time.sleep(4)  # the priority lane does not serve it
    assert deactivations(settings, kafka_bootstrap) == []
    assert priority.alive
    standard = procs.add(start_lane(settings, kafka_bootstrap, "standard", urgent))
    wait_until(lambda: deactivations(settings, kafka_bootstrap), 30, "the deactivation",
               [standard])  # fmt: skip
    assert deactivations(settings, kafka_bootstrap) == [("sub-0", "cancellation:c-1:deactivate")]
    assert "cancellation" in standard.log_path.read_text()
