"""The benchmark commands run end to end and write their JSON contract (small sizes:
the figures themselves come from the commands, not from tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka


def bench(tmp_path: Path, bootstrap: str, *args: str) -> dict:
    out = tmp_path / "bench.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "STREAMBILL_HOME": str(tmp_path)}
    env.pop("STREAMBILL_NAMESPACE", None)
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", *args, "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_billrun_contract(tmp_path: Path, kafka_bootstrap: str) -> None:
    report = bench(tmp_path, kafka_bootstrap, "billrun", "--subscriptions", "300",
                   "--usage-per-subscription", "2")  # fmt: skip
    assert report["scenario"] == "billrun"
    assert report["params"]["subscriptions"] == 300
    m = report["metrics"]
    assert m["invoices"] == 300 and m["duplicates"] == 0 and m["dead_letters"] == 0
    assert m["seconds"] > 0 and m["invoices_per_s"] > 0 and m["peak_rss_mb"] > 0


def test_bench_kafka_and_usage_contracts(tmp_path: Path, kafka_bootstrap: str) -> None:
    kafka = bench(tmp_path, kafka_bootstrap, "kafka", "--messages", "20000", "--runs", "2")
    assert kafka["scenario"] == "kafka" and len(kafka["runs"]) == 2
    assert kafka["metrics"]["messages"] == 20000 and kafka["metrics"]["msgs_per_s"] > 0
    usage = bench(tmp_path, kafka_bootstrap, "usage", "--events", "5000", "--workers", "1")
    assert usage["metrics"]["events"] == 5000 and usage["metrics"]["events_per_s"] > 0
