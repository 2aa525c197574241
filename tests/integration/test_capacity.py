"""`streambill bill-run` records its pace (the invoices the rating workers emitted while
it ran, its time and its workers) and `streambill capacity --invoices` answers from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import SUBSCRIPTIONS
from streams.publish import publish_in_time_order
from streams.testbed.generator import DEFAULT_UNTIL, Dataset, subscription_events
from tests.integration.helpers import Procs, scalar, start_rating, start_sink, wait_until
from tests.integration.test_pipeline import CATALOG

pytestmark = pytest.mark.kafka


def test_a_bill_run_records_the_invoices_it_issued_for_capacity_answers(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, tmp_path: Path
) -> None:
    settings = pipeline_env
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    rating = procs.add(start_rating(settings, kafka_bootstrap))
    subs = list(subscription_events(Dataset(accounts=600, seed=5), CATALOG))
    publish_in_time_order(clients.producer(settings, kafka_bootstrap), [(SUBSCRIPTIONS, subs)])
    wait_until(lambda: scalar(settings, "SELECT count() FROM invoices FINAL") == len(subs), 90,
               "the creation invoices", [sink, rating])  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "streams.cli", "bill-run", "--until",
                          DEFAULT_UNTIL.isoformat()], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    (recorded,) = (settings.home / "runs").glob("bill-run-*.json")
    record = json.loads(recorded.read_text())
    assert record["items"] > 0 and record["seconds"] > 0 and record["workers"] == 1
    # every invoice the run issued, and only those: the period closes
    closed = "SELECT count() FROM invoices FINAL WHERE reason != 'created'"
    wait_until(lambda: scalar(settings, closed) >= record["items"], 60, "the run's invoices",
               [sink])  # fmt: skip
    assert scalar(settings, closed) == record["items"]

    out = tmp_path / "capacity.json"
    answer = subprocess.run([sys.executable, "-m", "streams.cli", "capacity", "--invoices",
                             "1000000", "--window", "1h", "--json", str(out)],
                            capture_output=True, text=True)  # fmt: skip
    assert answer.returncode == 0, answer.stdout + answer.stderr
    got = json.loads(out.read_text())
    assert got["measured"]["source"].startswith("run recorded")
    assert got["measured"]["items"] == record["items"] and got["workers_now"] == 1
