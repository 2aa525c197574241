"""CLI commands refuse, before touching Kafka, what the pipeline would refuse later."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta


def test_a_bill_run_more_than_a_day_ahead_is_refused_at_once() -> None:
    # closing periods that have not ended would invoice early; rating dead-letters such a
    # run, so the command says so instead of waiting for a run that never completes
    until = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "bill-run", "--until", until],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "24 hours ahead" in result.stderr
