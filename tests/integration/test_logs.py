"""Logs a person (and a log shipper) can read: one JSON object a line, whoever writes it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from streams.config import Settings
from streams.domain.catalog import Catalog
from streams.kafka import clients
from streams.kafka.topics import SUBSCRIPTIONS
from streams.publish import publish
from streams.stack import ProcessorProcess, wait_for_warehouse_endpoint
from streams.testbed.demo import DEMO_CATALOG
from streams.testbed.generator import Dataset, subscription_events
from tests.integration.helpers import Procs, wait_until


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as JSON (a line that is not fails the test, quoted)."""
    parsed = []
    for line in text.splitlines():
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def test_a_processor_log_is_json_lines_with_progress_and_batch_rows(
    pipeline_env: Settings, procs: Procs
) -> None:
    """The sink with librdkafka talking (a configuration warning, a bootstrap server on
    a closed port): its log holds JSON lines only, librdkafka's among them, a progress
    line, and batch lines counting rows per table for bulk-landed batches."""
    bootstrap = pipeline_env.bootstrap_servers
    assert bootstrap
    env = {"STREAMBILL_PROGRESS_SECONDS": "1", "KAFKA_SASL_USERNAME": "nobody"}
    talkative = f"127.0.0.1:{closed_port()},{bootstrap}"
    sink = procs.add(ProcessorProcess(pipeline_env, talkative, "sink", env=env).start())
    wait_for_warehouse_endpoint(pipeline_env, sink)
    catalog = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))
    published = publish(clients.producer(pipeline_env, bootstrap), SUBSCRIPTIONS,
                        subscription_events(Dataset(accounts=30), catalog))  # fmt: skip

    def landed() -> bool:
        lines = [json.loads(x) for x in sink.log_path.read_text().splitlines() if x[:1] == "{"]
        rows = [x["rows"] for x in lines if x.get("event") == "batch landed"]
        progress = [x for x in lines if x.get("event") == "progress"]
        return sum(r.get("subscription_events", 0) for r in rows) >= published and any(
            p["totals"].get("records", 0) >= published for p in progress
        )

    wait_until(landed, 60, "the batch and a progress line after it", [sink])
    sink.stop()
    lines = json_lines(sink.log_path.read_text())
    kafka = [x for x in lines if x.get("source") == "librdkafka"]
    assert kafka, "no librdkafka line"
    assert all({"facility", "client", "level", "timestamp"} <= x.keys() for x in kafka)
    batches = [x for x in lines if x.get("event") == "batch landed"]
    assert all(x["rows"] for x in batches), batches  # never `"rows": {}`
    assert sum(x["rows"].get("subscription_events", 0) for x in batches) == published
    assert sum(x["in_bulk"] for x in batches) == published  # the bulk path was taken
    progress = [x for x in lines if x.get("event") == "progress"]
    assert {"records", "lag"} <= progress[-1]["totals"].keys()
    assert progress[-1]["processor"] == "sink"


def run_with_bad_catalog(tmp_path: Path, level: str) -> subprocess.CompletedProcess[str]:
    catalog = tmp_path / "catalog.json"
    catalog.write_text('{"plans": [')
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", "run", "rating", "--catalog", str(catalog)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "STREAMBILL_LOG_LEVEL": level},
    )  # fmt: skip


def test_a_fatal_error_is_one_json_line(pipeline_env: Settings, tmp_path: Path) -> None:
    done = run_with_bad_catalog(tmp_path, "INFO")
    assert done.returncode == 1
    lines = json_lines(done.stderr)
    fatal = [x for x in lines if x["level"] == "critical"]
    assert len(fatal) == 1, done.stderr
    assert fatal[0]["event"] == "fatal error"
    assert fatal[0]["error"] == "JSONDecodeError"
    assert fatal[0]["message"].startswith("Expecting value")
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stdout == ""


def test_a_fatal_error_has_its_traceback_at_debug(pipeline_env: Settings, tmp_path: Path) -> None:
    done = run_with_bad_catalog(tmp_path, "DEBUG")
    assert done.returncode == 1
    fatal = [x for x in json_lines(done.stderr) if x["level"] == "critical"]
    assert len(fatal) == 1 and fatal[0]["error"] == "JSONDecodeError"
    assert fatal[0]["exception"].startswith("Traceback")


def test_the_api_fatal_error_is_one_json_line_too(pipeline_env: Settings, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.json"
    catalog.write_text('{"plans": [')
    done = subprocess.run(
        [sys.executable, "-m", "streams.cli", "api", "--port", "0"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "STREAMBILL_CATALOG": str(catalog)},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    fatal = [x for x in json_lines(done.stderr) if x["level"] == "critical"]
    assert len(fatal) == 1 and fatal[0]["event"] == "fatal error", done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
