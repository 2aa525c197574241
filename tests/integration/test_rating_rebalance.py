"""The rating processor's liveness across rebalances and broker hiccups, on the real
broker: a worker driven turn by turn (RatingProcessor.turn), so that a rebalance (another
member joining its group, then leaving) or an unanswered request meets it at a chosen
point of its work."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from streams.config import Settings
from streams.domain.catalog import Catalog
from streams.domain.invoice import invoice_to_dict
from streams.kafka import clients
from streams.kafka.topics import CONTROL, INVOICES, SUBSCRIPTIONS, USAGE, group_id
from streams.offline import rate_events, record_to_json_line
from streams.processors.rating import GROUP, RatingProcessor, make_rating
from streams.publish import bill_run_done, issue_bill_run, publish
from streams.testbed.demo import DEMO_CATALOG
from streams.testbed.duplicates import topic_copies
from streams.testbed.generator import DEFAULT_UNTIL, Dataset, subscription_events

pytestmark = pytest.mark.kafka
CATALOG = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))


@pytest.fixture
def rating_worker(
    pipeline_env: Settings, kafka_bootstrap: str
) -> Iterator[Callable[..., RatingProcessor]]:
    """Makes subscribed rating workers in this process (their stop flag left out of the
    test run's signal handling), closed at the end."""
    made: list[RatingProcessor] = []

    def make(**options: Any) -> RatingProcessor:
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            worker = make_rating(pipeline_env, kafka_bootstrap, CATALOG, **options)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        worker.subscribe()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close()


def turn_until(worker: RatingProcessor, done: Callable[[], bool], timeout: float, what: str,
               pause: float = 0.0) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        worker.turn()
        time.sleep(pause)


class IdleAdmin(AdminClient):
    """A Kafka client's length is its queue's: an idle one is falsy (as this one always
    is), and must still be the one used when it is given."""

    def __len__(self) -> int:
        return 0


def committed_lag(settings: Settings, bootstrap: str, topics: list[str]) -> int:
    """Records of `topics` the rating group has not committed yet."""
    from streams.testbed.bench.harness import Env
    from streams.testbed.bench.harness import committed_lag as lag

    return lag(Env(settings, bootstrap), group_id(GROUP), topics)


def test_a_bill_run_interrupted_by_rebalances_completes_after_them(
    pipeline_env: Settings, kafka_bootstrap: str, rating_worker: Callable[..., RatingProcessor]
) -> None:
    """A bill run pauses its partition's control topic until the run is done. A rebalance
    in the middle drops the run (it starts again from its uncommitted control record), and
    the consumer keeps a paused partition paused through revocation and reassignment: the
    worker must resume it, or the run never restarts there."""
    settings = pipeline_env
    ds = Dataset(accounts=600, seed=11)
    subs = list(subscription_events(ds, CATALOG))
    reference = rate_events(CATALOG, [record_to_json_line("sub", r) for r in subs], DEFAULT_UNTIL)
    expected = {inv.invoice_id: invoice_to_dict(inv) for inv in reference.invoices}

    # one period closed per partition and transaction: the run outlasts the rebalances
    worker = rating_worker(close_chunk=1)
    partitions = set(range(settings.partitions))
    turn_until(worker, lambda: set(worker.states.stores) == partitions, 60, "the assignment")
    publish(clients.producer(settings, kafka_bootstrap), SUBSCRIPTIONS, subs)
    turn_until(
        worker,
        lambda: committed_lag(settings, kafka_bootstrap, [SUBSCRIPTIONS.name]) == 0,
        60,
        "the subscriptions",
    )
    offsets = issue_bill_run(settings, kafka_bootstrap, DEFAULT_UNTIL)
    turn_until(worker, lambda: set(worker.jobs.running) == partitions, 60, "the bill run to start")

    # a second member joins: every partition is revoked, half of them come back
    other = clients.consumer(
        settings, kafka_bootstrap, group_id(GROUP), **{"partition.assignment.strategy": "range"}
    )
    try:
        other.subscribe([SUBSCRIPTIONS.name, USAGE.name, CONTROL.name])

        def split() -> bool:
            other.consume(100, timeout=0.1)
            return 0 < len(worker.states.stores) < len(partitions) and bool(other.assignment())

        turn_until(worker, split, 60, "the rebalance", pause=0.1)
        # the run was cut short: no partition has finished it
        assert bill_run_done(settings, kafka_bootstrap, offsets) == 0
    finally:
        other.close()  # ... and leaves: the worker gets every partition back
    turn_until(worker, lambda: set(worker.states.stores) == partitions, 60, "the reassignment")

    turn_until(
        worker,
        lambda: bill_run_done(settings, kafka_bootstrap, offsets) == len(offsets),
        60,
        "the bill run to complete on every partition",
    )
    # every invoice the offline rater makes, once
    on_topic = topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", expected)
    assert on_topic.ok, on_topic.summary()


def test_records_held_back_while_the_broker_cannot_say_go_on_without_more_input(
    pipeline_env: Settings, kafka_bootstrap: str, rating_worker: Callable[..., RatingProcessor]
) -> None:
    """A subscription record waits for usage until usage is known to be caught up; when
    the broker cannot say (here its end offsets are asked of an address where no broker
    answers), it waits max_idle seconds and then goes on. That must not take another
    record: the input may have ended (as before a bill run, which waits for it)."""
    settings = pipeline_env
    dead = IdleAdmin({"bootstrap.servers": "127.0.0.1:9", "log_level": 0})
    worker = rating_worker(admin=dead)
    assert worker.alignment.admin is dead  # the given one, though falsy
    partitions = set(range(settings.partitions))
    turn_until(worker, lambda: set(worker.states.stores) == partitions, 60, "the assignment")
    publish(clients.producer(settings, kafka_bootstrap), SUBSCRIPTIONS,
            list(subscription_events(Dataset(accounts=8, seed=12), CATALOG)))  # fmt: skip
    turn_until(worker, lambda: worker.alignment.waiting, 60, "the records to be held back")
    turn_until(
        worker,
        lambda: committed_lag(settings, kafka_bootstrap, [SUBSCRIPTIONS.name]) == 0,
        60,
        "the subscriptions, the last input",
    )
    assert worker.alignment.blocked_since == {}  # nothing waits: the loop goes idle again
