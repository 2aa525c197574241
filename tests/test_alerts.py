"""Alert rules: loading, the firing/resolved state machine, notification bodies."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.config import DEPLOY_DIR
from streams.ops.alerts import (
    Rule,
    RulesError,
    RuleState,
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
                     "refund_p99", "api_kafka_unavailable"}  # fmt: skip
    assert ruleset.every_s == 15 and ruleset.webhooks[-1].format == "slack"


def test_bad_rules_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules: [{name: a, source: warehouse, above: 1}]")
    with pytest.raises(RulesError, match="needs a query"):
        load_rules(path)
    path.write_text("rules: [{name: a, source: dice, above: 1}]")
    with pytest.raises(RulesError, match="source"):
        load_rules(path)


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
