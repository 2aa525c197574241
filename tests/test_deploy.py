"""The Kubernetes manifests, the Grafana dashboard and the Prometheus alert rules parse,
and reference only metrics, consumer groups and topics that the code declares."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import streams.api.server
import streams.metrics  # noqa: F401 - registers the processors' metrics
from streams.cli import SCALABLE
from streams.config import DEPLOY_DIR
from streams.kafka.topics import ALL_TOPICS
from streams.stack import consumer_group

METRIC = re.compile(r"\bstreambill_[a-z_]+\b")


def exposed_names() -> set[str]:
    """Every sample name our registry can expose (by metric type)."""
    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("streambill_"):
            continue
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum",
                    "_count", "_created"], "gauge": [""]}[family.type]  # fmt: skip
        names |= {family.name + s for s in suffixes}
    return names


def referenced(text: str) -> set[str]:
    return set(METRIC.findall(text))


def test_dashboard_and_alert_rules_use_only_existing_metrics() -> None:
    exposed = exposed_names()
    dashboard = json.loads((DEPLOY_DIR / "grafana" / "streambill.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY_DIR / "prometheus" / "alerts.yaml").read_text())
    alert_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = referenced("\n".join(exprs + alert_exprs))
    assert used and used <= exposed, sorted(used - exposed)
    assert len(dashboard["panels"]) >= 10 and len(alert_exprs) >= 7


def test_manifests_scale_the_real_consumer_groups_on_real_topics() -> None:
    docs = [d for f in sorted((DEPLOY_DIR / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]  # fmt: skip
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    topics = {t.name for t in ALL_TOPICS}
    groups = {consumer_group(p) for p in SCALABLE}
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    for obj in scaled:
        target = obj["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in kinds, target
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] == "kafka":
                assert trigger["metadata"]["consumerGroup"] in groups
                assert trigger["metadata"]["topic"] in topics
    processors = {n for n in SCALABLE} | {"api"}
    assert {o["metadata"]["name"].removeprefix("streambill-") for o in scaled} == processors
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            (container,) = d["spec"]["template"]["spec"]["containers"]
            assert container["args"][0] in ("run", "api"), container["args"]
            assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_every_declared_metric_is_documented_in_the_dashboard_or_rules() -> None:
    # a metric nobody looks at is either dead code or a missing panel
    files = [DEPLOY_DIR / "grafana" / "streambill.json", DEPLOY_DIR / "prometheus" / "alerts.yaml"]
    text = "\n".join(p.read_text() for p in files)
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in referenced(text)}
    declared = {f.name for f in REGISTRY.collect() if f.name.startswith("streambill_")}
    assert declared - used == set(), sorted(declared - used)
    assert Path(DEPLOY_DIR / "k8s" / "config.yaml").exists()
