"""One source of alert rules: deploy/prometheus/alerts.yaml is generated from
deploy/alerts/rules.yaml (streams/ops/prometheus_rules.py), and promtool accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streams.ops.alerts import RulesError, load_rules
from streams.ops.prometheus_rules import (
    BUILTIN_RULES,
    PROMETHEUS_RULES,
    metric_expression,
    prometheus_rule,
    render,
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: run scripts/bootstrap (Debian's prometheus package)"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False, cwd=cwd)


def test_the_prometheus_rules_are_generated_from_the_builtin_ones() -> None:
    assert PROMETHEUS_RULES.read_text() == render(), (
        "deploy/prometheus/alerts.yaml differs: run `python -m streams.ops.prometheus_rules`"
    )


def test_every_builtin_rule_is_one_prometheus_alert_with_its_threshold_and_severity() -> None:
    builtin = load_rules(BUILTIN_RULES).rules
    generated = yaml.safe_load(render())["groups"][0]["rules"]
    assert len(generated) == len(builtin) == len({r["alert"] for r in generated})
    for rule, alert in zip(builtin, generated, strict=True):
        sign = "<" if rule.below else ">"
        assert alert["expr"].endswith(f" {sign} {rule.threshold:g}"), rule.name
        assert alert["labels"] == {"severity": rule.severity}
        assert alert["annotations"] == {"summary": rule.summary}


def test_promtool_accepts_the_prometheus_rules() -> None:
    proc = promtool("check", "rules", str(PROMETHEUS_RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(load_rules(BUILTIN_RULES).rules)} rules found" in proc.stdout


def test_promtool_refuses_a_broken_expression(tmp_path: Path) -> None:
    broken = tmp_path / "alerts.yaml"
    broken.write_text(render().replace("max(streambill_api_kafka_unavailable)",
                                       "max(streambill_api_kafka_unavailable"))  # fmt: skip
    assert promtool("check", "rules", str(broken)).returncode != 0


# 15 s between samples: the circuit of m-1 opens at 30 s; tenant t1 gets 8 429s a second
# (t2's 404s are not failures the rule counts)
PROMTOOL_TEST = """
rule_files: [alerts.yaml]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - {series: 'streambill_circuit_open{processor="payments",account="m-1"}', values: 0 0 1x6}
      - {series: 'streambill_circuit_open{processor="payments",account="m-2"}', values: 0x8}
      - {series: 'streambill_api_tenant_errors_total{tenant="t1",status="429"}', values: 0+120x40}
      - {series: 'streambill_api_tenant_errors_total{tenant="t2",status="404"}', values: 0+120x40}
    alert_rule_test:
      - eval_time: 75s
        alertname: StreambillCircuitOpen
        exp_alerts: []
      - eval_time: 105s
        alertname: StreambillCircuitOpen
        exp_alerts:
          - exp_labels: {severity: page, account: m-1}
            exp_annotations: {summary: "A gateway account's circuit breaker is open"}
      - eval_time: 9m
        alertname: StreambillTenantApiFailures
        exp_alerts:
          - exp_labels: {severity: ticket, tenant: t1}
            exp_annotations: {summary: "A tenant's API calls keep failing or being throttled"}
"""


def test_a_derived_alert_fires_on_the_series_its_rule_watches(tmp_path: Path) -> None:
    """promtool's own rule tests: the circuit of one account open for a minute fires the
    generated alert, with the account named; a tenant's 429s above 5/s fire its alert."""
    shutil.copy(PROMETHEUS_RULES, tmp_path / "alerts.yaml")
    (tmp_path / "test.yaml").write_text(PROMTOOL_TEST)
    proc = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_metrics_rule_becomes_the_same_measure_in_promql() -> None:
    assert metric_expression("streambill_api_requests", {"status": "5.."}, "rate", None) == (
        'sum(rate(streambill_api_requests_total{status=~"5.."}[5m]))'
    )
    assert metric_expression("streambill_circuit_open", {}, "max", "account") == (
        "max by (account) (streambill_circuit_open)"
    )
    assert metric_expression("streambill_consumer_lag", {}, "sum", None) == (
        "sum(streambill_consumer_lag)"
    )


def test_a_rule_states_its_prometheus_form_once() -> None:
    metrics = {"name": "a", "source": "metrics", "metric": "m", "agg": "max", "above": 1}
    with pytest.raises(RulesError, match="derived"):
        prometheus_rule({**metrics, "prometheus": {"alert": "A", "expr": "max(m)"}})
    with pytest.raises(RulesError, match=r"prometheus\.alert"):
        prometheus_rule(metrics)
    warehouse = {"name": "w", "source": "warehouse", "query": "SELECT 1", "above": 1}
    with pytest.raises(RulesError, match=r"needs prometheus\.expr"):
        prometheus_rule({**warehouse, "prometheus": {"alert": "W"}})
    rule = prometheus_rule({**warehouse, "for": "1m", "prometheus": {"alert": "W", "expr": "x"}})
    assert rule == {"alert": "W", "expr": "x > 1", "for": "1m", "labels": {"severity": "page"},
                    "annotations": {"summary": "w"}}  # fmt: skip
