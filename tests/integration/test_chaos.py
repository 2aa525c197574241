"""`streambill chaos --short`, the CI form of the fault suite, as an operator runs it: its
own three-broker cluster, the processors, the gateway simulator and chDB, with every fault
injected for real (SIGKILL of processors and of a broker, the simulator's outage switch)
except the warehouse outage, injected at the sink's client because chDB runs inside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.testbed.chaos import PROCESSORS, SCENARIOS

pytestmark = pytest.mark.kafka


@pytest.mark.timeout(900)
def test_short_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "STREAMBILL_NAMESPACE")}  # fmt: skip
    env["STREAMBILL_HOME"] = str(tmp_path / "home")
    env["PYTHONFAULTHANDLER"] = "1"  # a crash of the chaos process prints its stacks
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "chaos", "--short", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["scenario"] == "chaos"
    assert metrics["scenarios"] == len(SCENARIOS) == 4
    # 2 SIGKILLs for each of 4 processors, a broker, the warehouse, the gateway; each one
    # landed on work in progress (evidence measured from outside, see streams.testbed.chaos.landed)
    assert metrics["faults_injected"] == 2 * 4 + 3
    assert metrics["faults_effective"] == metrics["faults_injected"], _faults(result)
    assert metrics["invariants_held"] == metrics["invariants_checked"] == 4 * 9
    by_scenario = {r["scenario"]: r for r in result["results"]}
    assert list(by_scenario) == list(SCENARIOS)
    for r in by_scenario.values():
        assert all(r["invariants"].values()), r
        assert r["faults"] >= 1 and r["events"] > 300 * 2, r  # inputs, invoices, attempts
        assert len(r["fault_evidence"]) == r["faults"] == r["faults_effective"], r
        for fault in r["fault_evidence"]:
            assert fault["effective"] and fault["evidence"] and fault["at_progress"], fault
            assert "timed_out_waiting_for" not in fault["at_progress"], fault
        assert not r["notes"], r  # nothing skipped: the broker was ours to kill
    kills = [f for f in by_scenario["processor-kills"]["fault_evidence"] if f["kind"] == "sigkill"]
    assert sorted(f["target"] for f in kills) == sorted(PROCESSORS * 2)
    # each victim had been working (not a replacement still starting) and left work behind:
    # records written before the kill not committed, or gateway calls dying with it
    for kill in kills:
        evidence = kill["evidence"]
        assert evidence["partitions_held"] > 0, kill
        assert evidence["behind_at_kill"] > 0 or evidence["gateway_calls_in_flight"] > 0, kill
    (outage,) = by_scenario["gateway-outage"]["fault_evidence"]
    assert outage["evidence"]["calls_refused"] > 0, outage
    (warehouse,) = by_scenario["warehouse-outage"]["fault_evidence"]
    assert warehouse["evidence"]["insert_failures"] > 0, warehouse
    (broker,) = by_scenario["broker-loss"]["fault_evidence"]
    assert broker["evidence"]["led_before"] > 0 == broker["evidence"]["still_led"], broker
    assert result["params"]["brokers"] == 3
    # the table an operator reads
    for name in SCENARIOS:
        assert name in proc.stdout


def _faults(result: dict) -> list[dict]:
    return [f for r in result["results"] for f in r["fault_evidence"] if not f["effective"]]
