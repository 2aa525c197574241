"""Alert rules: loading, the firing/resolved state machine, notification bodies."""

from __future__ import annotations

import itertools
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.samples import Sample

from streams.config import DEPLOY_DIR
from streams.kafka.lag import PartitionLag
from streams.kafka.topics import group_id
from streams.ops.alerts import (
    Alerting,
    Rule,
    RulesError,
    RuleSet,
    RuleState,
    Sources,
    alert_event,
    load_rules,
    step,
    webhook_body,
)

RULE = Rule(name="lag", source="lag", threshold=10, for_s=30)


def test_the_shipped_rules_load_and_cover_every_condition() -> None:
    ruleset = load_rules(DEPLOY_DIR / "alerts" / "rules.yaml", "slack:http://x/hook")
    names = {r.name for r in ruleset.rules}
    assert names == {"payment_failure_rate", "api_5xx_rate", "tenant_api_failures",
                     "consumer_lag", "dead_letter_growth", "gateway_circuit_open",
                     "refund_p99", "api_kafka_unavailable", "warehouse_unavailable",
                     "run_deadline_at_risk"}  # fmt: skip
    at_risk = next(r for r in ruleset.rules if r.name == "run_deadline_at_risk")
    assert (at_risk.below, at_risk.threshold, at_risk.agg) == (True, 0, "min")
    assert ruleset.every_s == 15 and ruleset.webhooks[-1].format == "slack"


def test_bad_rules_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules: [{name: a, source: warehouse, above: 1}]")
    with pytest.raises(RulesError, match="needs a query"):
        load_rules(path)
    path.write_text("rules: [{name: a, source: dice, above: 1}]")
    with pytest.raises(RulesError, match="source"):
        load_rules(path)


def test_a_below_rule_breaches_under_its_threshold_and_one_threshold_is_given() -> None:
    rule = Rule.from_dict({"name": "b", "source": "metrics", "metric": "m", "agg": "min",
                           "below": 0})  # fmt: skip
    state = RuleState()
    assert step(rule, state, 5, 0) is None and step(rule, state, 0, 10) is None
    assert step(rule, state, -1, 20) == "firing"
    assert step(rule, state, -math.inf, 30) is None
    assert step(rule, state, 0.5, 40) == "resolved"
    for both_or_none in ({"above": 1, "below": 0}, {}):
        with pytest.raises(RulesError, match="exactly one of above or below"):
            Rule.from_dict({"name": "b", "source": "metrics", "metric": "m", **both_or_none})


def test_fires_after_for_and_resolves_once() -> None:
    state = RuleState()
    assert step(RULE, state, 11, 0) is None  # breaching, not for 30 s yet
    assert step(RULE, state, None, 20) is None  # unknown: nothing changes
    assert step(RULE, state, 12, 30) == "firing"
    assert step(RULE, state, 50, 40) is None  # already firing: no second notification
    assert step(RULE, state, 3, 50) == "resolved"
    assert step(RULE, state, 3, 60) is None
    assert step(RULE, state, 11, 70) is None  # the clock of `for` starts again


@given(st.lists(st.one_of(st.none(), st.floats(0, 20)), max_size=60))
def test_notifications_alternate_and_firing_needs_a_full_breach(values: list) -> None:
    state, sent, breach_start = RuleState(), [], None
    for t, v in enumerate(values):
        now = t * 10.0
        if v is not None:
            breach_start = (breach_start if breach_start is not None else now) if v > 10 else None
        transition = step(RULE, state, v, now)
        if transition == "firing":
            assert breach_start is not None and now - breach_start >= RULE.for_s
        if transition:
            sent.append(transition)
    assert all(a != b for a, b in itertools.pairwise(sent))
    assert not sent or sent[0] == "firing"


def test_events_have_stable_ids_and_slack_bodies() -> None:
    a = alert_event(RULE, "firing", 12.0, 100.0, 130.0)
    assert a["alert_id"] == alert_event(RULE, "firing", 99.0, 100.0, 140.0)["alert_id"]
    assert a["alert_id"] != alert_event(RULE, "resolved", 1.0, 100.0, 140.0)["alert_id"]
    slack = orjson.loads(webhook_body(a, "slack"))
    assert slack["text"].startswith(":red_circle: FIRING lag") and "threshold 10" in slack["text"]
    plain = orjson.loads(webhook_body(a, "json"))
    assert plain["state"] == "firing" and plain["value"] == 12.0 and plain["at"].startswith("19")


# --- the sources, on in-memory parts -----------------------------------------------------


def sources(
    rows: list[list[Any]] | None = None,
    lags: list[PartitionLag] | None = None,
    samples: list[Sample] | None = None,
) -> Sources:
    def warehouse(sql: str) -> list[list[Any]]:
        if rows is None:
            raise ConnectionError("warehouse down")
        return rows

    return Sources(warehouse, lambda: lags or [], lambda: samples or [])


def sample(name: str, value: float, **labels: str) -> Sample:
    return Sample(name, labels, value)


def test_a_warehouse_rule_reads_the_first_cell_and_an_outage_is_unknown() -> None:
    rule = Rule(name="w", source="warehouse", threshold=0.1, query="SELECT 1")
    assert sources([[0.25, 9]]).measure(rule) == 0.25
    assert sources([]).measure(rule) is None
    assert sources([[None]]).measure(rule) is None
    assert sources(None).measure(rule) is None  # unknown, not a crash


def test_a_lag_rule_takes_the_worst_group_or_the_one_named() -> None:
    def lag(group: str, n: int) -> PartitionLag:
        return PartitionLag(group_id(group), "t", 0, 0, n, n)

    lags = [lag("streambill-sink", 5), lag("streambill-sink", 7), lag("streambill-rating", 9)]
    assert sources(lags=lags).measure(Rule(name="l", source="lag", threshold=1)) == 12
    one = Rule(name="l", source="lag", threshold=1, group="streambill-rating")
    assert sources(lags=lags).measure(one) == 9
    gone = Rule(name="l", source="lag", threshold=1, group="streambill-nobody")
    assert sources(lags=lags).measure(gone) == 0


def test_a_metrics_rule_filters_labels_and_aggregates_by_one() -> None:
    samples = [
        sample("streambill_dead_letters_total", 3, processor="rating", reason="rejected"),
        sample("streambill_dead_letters_total", 4, processor="rating", reason="invalid_event"),
        sample("streambill_dead_letters_total", 5, processor="sink", reason="out_of_range"),
        sample("streambill_records_total", 100, processor="rating"),
    ]
    rule = Rule(name="m", source="metrics", threshold=1, metric="streambill_dead_letters")
    assert sources(samples=samples).measure(rule) == 5  # max of one sample
    summed = Rule(name="m", source="metrics", threshold=1, metric="streambill_dead_letters",
                  agg="sum", by="processor")  # fmt: skip
    assert sources(samples=samples).measure(summed) == 7  # rating's 3 + 4
    filtered = Rule(name="m", source="metrics", threshold=1, metric="streambill_dead_letters",
                    agg="sum", labels=(("reason", "rej.*|out_of_range"),))  # fmt: skip
    assert sources(samples=samples).measure(filtered) == 8
    prefix = Rule(name="m", source="metrics", threshold=1, metric="streambill_dead_letters",
                  labels=(("reason", "rej"),))  # fmt: skip
    assert sources(samples=samples).measure(prefix) == 0  # the whole label value must match
    absent = Rule(name="m", source="metrics", threshold=1, metric="streambill_nothing")
    assert sources(samples=samples).measure(absent) == 0
    lowest = Rule(name="m", source="metrics", threshold=1, metric="streambill_dead_letters",
                  agg="min")  # fmt: skip
    assert sources(samples=samples).measure(lowest) == 3


def test_a_rate_rule_needs_two_evaluations_and_a_reset_is_no_increase() -> None:
    counts = [10.0]
    src = Sources(lambda sql: [], lambda: [], lambda: [sample("c_total", counts[0])])
    rule = Rule(name="r", source="metrics", threshold=1, metric="c", agg="rate")
    assert src.measure(rule) is None  # nothing to compare with yet
    counts[0] = 30.0
    time.sleep(0.01)
    rate = src.measure(rule)
    assert rate is not None and 0 < rate <= 20 / 0.01
    counts[0] = 2.0  # the process restarted: its counter began again
    assert src.measure(rule) == 0


def test_a_rule_firing_before_a_restart_does_not_fire_again() -> None:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    history = [
        {"rule": "lag", "state": "firing", "at": at},
        {"rule": "other", "state": "firing", "at": at},
        {"rule": "other", "state": "resolved", "at": at + timedelta(minutes=1)},
    ]
    other = Rule(name="other", source="lag", threshold=10)
    ruleset = RuleSet((RULE, other), (), 15.0)
    alerting = Alerting(ruleset, producer=None, sources=sources(), history=history)
    now = at.timestamp() + 600
    assert step(RULE, alerting.states["lag"], 50, now) is None  # still firing: no repeat
    assert step(RULE, alerting.states["lag"], 1, now) == "resolved"
    assert step(other, alerting.states["other"], 50, now) == "firing"
