"""The benchmark commands run end to end and write their JSON contract (small sizes:
the figures themselves come from the commands, not from tests): the same figures, by
name, as the published results in docs/benchmarks/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.config import REPO_ROOT

pytestmark = pytest.mark.kafka
PUBLISHED = REPO_ROOT / "docs" / "benchmarks"
KEYED_BY_VALUE = {"first_attempt_outcomes", "status_counts"}  # keys: the outcomes seen


def figure_names(metrics: dict, prefix: str = "") -> set[str]:
    """Every figure's dotted name; a list of records contributes its records' keys."""
    names = set()
    for key, value in metrics.items():
        if isinstance(value, dict) and key not in KEYED_BY_VALUE:
            names |= figure_names(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            names |= {f"{prefix}{key}[].{k}" for item in value for k in item}
        else:
            names.add(prefix + key)
    return names


def assert_figures_as_published(report: dict, published: str) -> None:
    doc = json.loads((PUBLISHED / f"{published}.json").read_text())
    assert figure_names(report["metrics"]) == figure_names(doc["metrics"]), published


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
    assert_figures_as_published(report, "billrun-100k")


def test_bench_billrun_of_the_version_2_rater_with_unique_count_charges(
    tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third of the subscriptions on a plan with a unique_count charge, its usage naming
    users: every one invoiced once, none refused."""
    monkeypatch.setenv("STREAMBILL_RATING_CONTRACT", "2")
    report = bench(tmp_path, kafka_bootstrap, "billrun", "--subscriptions", "300",
                   "--usage-per-subscription", "2", "--unique-count-every", "3")  # fmt: skip
    assert report["params"]["unique_count_every"] == 3
    assert report["params"]["rating_contract"] == 2
    m = report["metrics"]
    assert m["invoices"] == 300 and m["duplicates"] == 0 and m["dead_letters"] == 0
    assert_figures_as_published(report, "billrun-100k")


def test_bench_kafka_and_usage_contracts(tmp_path: Path, kafka_bootstrap: str) -> None:
    kafka = bench(tmp_path, kafka_bootstrap, "kafka", "--messages", "20000", "--runs", "2")
    assert kafka["scenario"] == "kafka" and len(kafka["runs"]) == 2
    assert kafka["metrics"]["messages"] == 20000 and kafka["metrics"]["msgs_per_s"] > 0
    assert_figures_as_published(kafka, "kafka")
    usage = bench(tmp_path, kafka_bootstrap, "usage", "--events", "5000", "--workers", "1")
    assert usage["metrics"]["events"] == 5000 and usage["metrics"]["events_per_s"] > 0
    assert_figures_as_published(usage, "usage")


def test_bench_sink_and_payment_run_contracts(tmp_path: Path, kafka_bootstrap: str) -> None:
    sink = bench(tmp_path, kafka_bootstrap, "sink", "--rows", "5000")
    m = sink["metrics"]
    assert sink["scenario"] == "sink" and m["rows"] == 5000 and m["invoices"] == 1000
    assert m["rows_per_s"] > 0 and m["seconds"] > 0
    assert_figures_as_published(sink, "sink")
    pay = bench(tmp_path, kafka_bootstrap, "payment-run", "--payments", "1500")
    m = pay["metrics"]
    assert pay["scenario"] == "payment-run" and m["payments"] == 1500
    assert m["double_charges"] == 0 and m["reconciled"] is True and m["differences"] == 0
    assert sum(m["first_attempt_outcomes"].values()) == 1500
    assert m["payments_per_min"] > 0 and 0 < m["ceiling_ratio"] < 1
    assert m["gateway_ceiling_per_min"] == pytest.approx(200_956, rel=0.01)
    assert_figures_as_published(pay, "payment-run")


def test_bench_refund_latency_contract(tmp_path: Path, kafka_bootstrap: str) -> None:
    report = bench(tmp_path, kafka_bootstrap, "refund-latency", "--seconds", "2",
                   "--payments", "500", "--subscriptions", "500")  # fmt: skip
    m = report["metrics"]
    assert report["scenario"] == "refund-latency"
    # one request every 50 ms for 2 s per phase: about 40 each, every one answered
    assert 35 <= m["refunds"] <= 41 and m["lost"] == 0 and m["doubled"] == 0
    # half of them partial (a repeated one would be accepted), each recorded once
    assert m["partial_refunds"] >= 35
    assert m["ledger_refunds"] == m["refunds"] + m["bulk_off"]["refunds"]
    assert m["bulk_off"]["refunds"] == m["bulk_off"]["sent"] >= 35
    assert 0 < m["p50_ms"] <= m["p99_ms"] <= m["max_ms"]
    assert m["gateway_p99_ms"] == 300
    # where the time went, per stage of the lane, for every phase; and the stalls
    for phase in (m["busy"], m["bulk_off"]):
        stages = phase["lane_stages"]
        assert set(stages) == {f"{s}_p99_ms" for s in
                               ("queued", "decide", "slot", "gateway", "publish")}  # fmt: skip
        # a refund's gateway call takes at least the simulator's fastest refund
        assert 0 < stages["gateway_p99_ms"] <= phase["p99_ms"]
    assert m["simulator_gc"]["collections"][0] > 0
    # the slowest refunds each with their stages (the lane's header on the result)
    assert_figures_as_published(report, "refund-latency")


def test_bench_signup_spike_contract_with_a_binding_limit(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    # a limit far below the offered load: many 429s, and still every signup lands once
    report = bench(tmp_path, kafka_bootstrap, "signup-spike", "--signups", "3000",
                   "--clients", "64", "--rate", "1000", "--max-concurrency", "32")  # fmt: skip
    assert report["scenario"] == "signup-spike"
    m = report["metrics"]
    assert m["signups"] == 3000 and m["lost"] == 0 and m["duplicates_in_kafka"] == 0
    assert m["errors_5xx"] == 0 and m["timeouts"] == 0 and m["gave_up"] == 0
    assert m["rejected_429"] > 0 and m["status_counts"]["202"] == 3000
    assert m["seconds"] > 0 and m["signups_per_s"] > 0 and m["p99_ms"] >= m["p50_ms"] > 0
    assert_figures_as_published(report, "signup-spike")
