"""Rating workers' identities on the real broker: `streambill scale` beside a running
worker fences nobody, a worker index held by a live process is refused, and a second
process with the same identity still fences the first (its zombie)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from streams.config import Settings
from streams.domain.catalog import Catalog
from streams.domain.invoice import invoice_to_dict
from streams.kafka import clients
from streams.kafka.lag import group_members
from streams.kafka.topics import INVOICES, SUBSCRIPTIONS, group_id
from streams.offline import rate_events, record_to_json_line
from streams.processors.rating import GROUP
from streams.publish import bill_run_done, issue_bill_run, publish
from streams.stack import ProcessorProcess
from streams.testbed.demo import DEMO_CATALOG
from streams.testbed.duplicates import committed_values, topic_copies
from streams.testbed.generator import Dataset, subscription_events
from tests.integration.helpers import Procs, wait_until

pytestmark = pytest.mark.kafka
CATALOG = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))


def workload(
    accounts: int, seed: int, until: datetime
) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """Two halves of subscription events and every invoice the offline rater makes of
    them up to `until` (at creation, and at each period end). They start within 5 days
    of a month far from today's day of the month: no period ends while a test runs."""
    first_day = 1 if datetime.now(UTC).day >= 12 else 15
    dataset = Dataset(accounts=accounts, seed=seed, base=datetime(2026, 1, first_day, tzinfo=UTC),
                      window=timedelta(days=5))  # fmt: skip
    subs = list(subscription_events(dataset, CATALOG))
    reference = rate_events(CATALOG, [record_to_json_line("sub", r) for r in subs], until)
    expected = {inv.invoice_id: invoice_to_dict(inv) for inv in reference.invoices}
    return subs[: accounts // 2], subs[accounts // 2 :], expected


def rating(settings: Settings, bootstrap: str, *args: str) -> ProcessorProcess:
    """`run rating` on the wall clock, as it runs by default."""
    return ProcessorProcess(settings, bootstrap, "rating", *args).start()


def members(settings: Settings, bootstrap: str) -> int:
    try:
        return len(group_members(clients.admin(settings, bootstrap), group_id(GROUP)))
    except Exception:  # the group does not exist yet
        return 0


def bill_all(
    settings: Settings, bootstrap: str, until: datetime, procs: list[ProcessorProcess]
) -> None:
    offsets = issue_bill_run(settings, bootstrap, until)
    wait_until(lambda: bill_run_done(settings, bootstrap, offsets) == len(offsets), 120,
               "the bill run", procs)  # fmt: skip


def test_scale_beside_a_running_worker_fences_nobody_and_bills_each_invoice_once(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, tmp_path: Path
) -> None:
    settings = pipeline_env
    now = datetime.now(UTC)
    first, second, expected = workload(300, 31, now)
    running = procs.add(rating(settings, kafka_bootstrap))
    producer = clients.producer(settings, kafka_bootstrap)
    publish(producer, SUBSCRIPTIONS, first)
    wait_until(lambda: members(settings, kafka_bootstrap) == 1, 60, "the worker", [running])

    shown = tmp_path / "scale.err"
    with shown.open("wb") as err:
        scale = subprocess.Popen([sys.executable, "-m", "streams.cli", "scale", "rating", "2"],
                                 stdout=subprocess.DEVNULL, stderr=err, env=os.environ)  # fmt: skip
    try:
        wait_until(lambda: members(settings, kafka_bootstrap) == 3 or scale.poll() is not None,
                   90, "three workers in the group", [running])  # fmt: skip
        assert scale.poll() is None, shown.read_text()[-3000:]
        # every worker takes part in transactions now: a fenced one fails its next
        publish(producer, SUBSCRIPTIONS, second)
        bill_all(settings, kafka_bootstrap, now, [running])
        assert running.alive, running.tail()
        assert scale.poll() is None, shown.read_text()[-3000:]  # none of its workers exited
    finally:
        scale.send_signal(signal.SIGTERM)
        code = scale.wait(90)
    assert code == 0, shown.read_text()[-3000:]
    assert "fenced" not in running.log_path.read_text().lower()
    on_topic = topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", expected)
    assert on_topic.ok, on_topic.summary()  # every invoice, each once


def test_a_held_worker_index_is_refused_and_the_same_identity_fences_its_zombie(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, tmp_path: Path
) -> None:
    """`--worker 0` while a live process of this installation holds index 0 is refused;
    the same identity elsewhere (another home on this host: a restarted pod while the old
    one still runs) fences the first process, which leaves without committing anything."""
    settings = pipeline_env
    now = datetime.now(UTC)
    first, second, expected = workload(200, 32, now)
    zombie = procs.add(rating(settings, kafka_bootstrap, "--worker", "0"))
    producer = clients.producer(settings, kafka_bootstrap)
    publish(producer, SUBSCRIPTIONS, first)
    wait_until(lambda: members(settings, kafka_bootstrap) == 1, 60, "the worker", [zombie])

    refused = rating(settings, kafka_bootstrap, "--worker", "0")
    assert refused.proc is not None and refused.proc.wait(60) == 2, refused.tail()
    assert "worker index 0 of rating is held by a running process" in refused.tail()
    assert zombie.alive

    elsewhere = dataclasses.replace(settings, home=tmp_path / "elsewhere")
    successor = procs.add(rating(elsewhere, kafka_bootstrap, "--worker", "0"))
    wait_until(lambda: members(settings, kafka_bootstrap) == 2, 60, "the successor", [successor])
    # records for both: the zombie's next transaction that writes anything is refused
    publish(producer, SUBSCRIPTIONS, second)
    wait_until(lambda: not zombie.alive, 90, "the zombie to be fenced", [successor])
    assert zombie.proc is not None and zombie.proc.returncode != 0
    assert "fenced" in zombie.tail(200).lower(), zombie.tail()
    bill_all(settings, kafka_bootstrap, now, [successor])
    on_topic = topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", expected)
    assert on_topic.ok, on_topic.summary()


def test_the_same_worker_identity_fences_the_older_producer(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    """A restarted worker (same host, same index) gets the transactional id of the one it
    replaces: its init_transactions fences the older producer, whose next transaction
    fails, and aborts what that one left open."""
    from confluent_kafka import KafkaException

    from streams.runtime.process import transactional_id

    settings = pipeline_env

    def producer() -> object:
        made = clients.producer(settings, kafka_bootstrap,
                                **{"transactional.id": transactional_id("rating", 0)})  # fmt: skip
        made.init_transactions(30)
        return made

    zombie = producer()
    zombie.begin_transaction()
    zombie.produce(INVOICES.name, key=b"a", value=b"left open")
    zombie.flush(30)
    successor = producer()  # the restart
    successor.begin_transaction()
    successor.produce(INVOICES.name, key=b"b", value=b"committed")
    successor.commit_transaction(30)
    with pytest.raises(KafkaException, match="fenced"):
        zombie.commit_transaction(30)
    # the zombie's open transaction was aborted: only the successor's record is readable
    values = list(committed_values(settings, kafka_bootstrap, INVOICES))
    assert values == [b"committed"]
