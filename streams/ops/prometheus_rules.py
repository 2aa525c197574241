"""deploy/prometheus/alerts.yaml, generated from the built-in rules (deploy/alerts/rules.yaml):
one source for both forms of every alert.

A rule's name (the Prometheus alert's is in its ``prometheus.alert``), threshold, ``for``,
severity and summary are stated once, in the built-in file. Its Prometheus expression:

- a ``metrics`` rule's is derived from its metric, label filters, ``agg`` and ``by``
  (the same measurement, taken by Prometheus instead of by scraping each endpoint);
- a ``warehouse`` or ``lag`` rule measures what Prometheus cannot query (ClickHouse, the
  consumer groups' committed offsets): its ``prometheus.expr`` states the same measure
  from the processors' metrics, in the rule's unit, compared with the same threshold.

Regenerate with ``python -m streams.ops.prometheus_rules``; tests/test_alert_rules.py
checks that the committed file is the generated one and that promtool accepts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from streams.config import DEPLOY_DIR
from streams.ops.alerts import RulesError, load_rules

BUILTIN_RULES = DEPLOY_DIR / "alerts" / "rules.yaml"
PROMETHEUS_RULES = DEPLOY_DIR / "prometheus" / "alerts.yaml"
# the built-in evaluator takes a counter's rate between two evaluations; Prometheus
# over this window (smoother; the same threshold)
RATE_WINDOW = "5m"
HEADER = f"""\
# Prometheus alert rules for streambill: GENERATED from deploy/alerts/rules.yaml (the
# built-in rules, `streambill run alerts`) by `python -m streams.ops.prometheus_rules`.
# Edit that file, not this one; tests/test_alert_rules.py checks they agree.
# Counter rates are over {RATE_WINDOW}."""


def metric_expression(metric: str, labels: dict[str, str], agg: str, by: str | None) -> str:
    """The PromQL of a built-in ``metrics`` rule: its label filters are regular
    expressions (matched whole, as PromQL's ``=~``); ``by`` keeps that label, whose worst
    value the rule compares."""
    matchers = ", ".join(f'{k}=~"{v}"' for k, v in sorted(labels.items()))
    selector = f"{{{matchers}}}" if matchers else ""
    operator = "sum" if agg == "rate" else agg  # the processes' rates add up
    if by:
        operator += f" by ({by}) "
    if agg == "rate":
        return f"{operator}(rate({metric}_total{selector}[{RATE_WINDOW}]))"
    return f"{operator}({metric}{selector})"


def prometheus_rule(raw: dict[str, Any]) -> dict[str, Any]:
    """One built-in rule (as written in its file) as a Prometheus alerting rule."""
    name = raw["name"]
    target = raw.get("prometheus") or {}
    if "alert" not in target:
        raise RulesError(f"rule {name}: prometheus.alert (its Prometheus name) is missing")
    if raw["source"] == "metrics":
        if "expr" in target:
            raise RulesError(f"rule {name}: a metrics rule's expression is derived, not given")
        measure = metric_expression(raw["metric"], raw.get("labels", {}),
                                    raw.get("agg", "max"), raw.get("by"))  # fmt: skip
    elif "expr" in target:
        measure = target["expr"].strip()
    else:
        raise RulesError(f"rule {name}: a {raw['source']} rule needs prometheus.expr")
    comparison = f"> {raw['above']}" if "above" in raw else f"< {raw['below']}"
    rule: dict[str, Any] = {"alert": target["alert"], "expr": f"{measure} {comparison}"}
    if "for" in raw:
        rule["for"] = raw["for"]
    rule["labels"] = {"severity": raw.get("severity", "page")}
    rule["annotations"] = {"summary": raw.get("summary", name)}
    return rule


class _Dumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(builtin: Path = BUILTIN_RULES) -> str:
    """The Prometheus rules file for the built-in rules file `builtin`."""
    load_rules(builtin)  # what the evaluator refuses is not translated either
    raw = yaml.safe_load(builtin.read_text())
    rules = [prometheus_rule(r) for r in raw["rules"]]
    body = yaml.dump({"groups": [{"name": "streambill", "rules": rules}]}, Dumper=_Dumper,
                     sort_keys=False, width=1000)  # fmt: skip
    return f"{HEADER}\n{body}"


if __name__ == "__main__":
    PROMETHEUS_RULES.write_text(render())
