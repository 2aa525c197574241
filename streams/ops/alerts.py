"""Alerting: rules in a YAML file (``deploy/alerts/rules.yaml``), evaluated continuously
by ``streambill run alerts``; each firing and each resolution is recorded on
``billing.alerts`` (landed in ClickHouse by the sink) and sent once to every webhook
(JSON, or Slack's ``{"text"}``), retried until the receiver takes it.

A rule reads one number from a source and fires when it stays above its threshold for
``for`` seconds:

- ``warehouse``: a SQL query returning one number (e.g. the payment failure rate);
- ``metrics``: every advertised Prometheus endpoint, one metric with label filters
  (regular expressions), aggregated by ``max`` or ``sum``, or as a per-second ``rate``
  of a counter between evaluations; ``by: label`` takes the worst value of that label;
- ``lag``: the largest consumer-group lag (records), optionally of one group.

The state machine (``step``) is pure. After a restart the states are read back from
``billing.alerts``, so a rule that was firing does not notify again.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog
import yaml

from streams.config import Settings

if TYPE_CHECKING:
    from confluent_kafka import Producer
    from prometheus_client.samples import Sample

    from streams.kafka.lag import PartitionLag

log = structlog.get_logger(__name__)
_ALERT_NS = uuid.UUID("0b7a4f4e-2f8e-4d36-9a57-6a3c1f0e8d21")
SOURCES = ("warehouse", "metrics", "lag")


AGGREGATIONS = ("max", "min", "sum", "rate")


class RulesError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    name: str
    source: str
    threshold: float
    for_s: float = 0.0
    severity: str = "page"
    summary: str = ""
    query: str | None = None  # warehouse
    metric: str | None = None  # metrics
    labels: tuple[tuple[str, str], ...] = ()
    agg: str = "max"  # max | min | sum | rate
    by: str | None = None
    group: str | None = None  # lag
    below: bool = False  # breaching under the threshold (given as `below`, not `above`)

    def breached(self, value: float) -> bool:
        return value < self.threshold if self.below else value > self.threshold

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rule:
        if ("above" in d) == ("below" in d):
            raise RulesError(f"rule {d.get('name')!r}: exactly one of above or below")
        try:
            rule = cls(
                name=str(d["name"]), source=str(d["source"]),
                threshold=float(d["above"] if "above" in d else d["below"]), below="below" in d,
                for_s=_seconds(d.get("for", 0)), severity=str(d.get("severity", "page")),
                summary=str(d.get("summary", "")), query=d.get("query"), metric=d.get("metric"),
                labels=tuple(sorted((str(k), str(v)) for k, v in d.get("labels", {}).items())),
                agg=str(d.get("agg", "max")), by=d.get("by"), group=d.get("group"),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise RulesError(f"rule {d!r}: {exc}") from None
        if rule.source not in SOURCES:
            raise RulesError(f"rule {rule.name}: source must be one of {', '.join(SOURCES)}")
        if rule.source == "warehouse" and not rule.query:
            raise RulesError(f"rule {rule.name}: a warehouse rule needs a query")
        if rule.source == "metrics" and (not rule.metric or rule.agg not in AGGREGATIONS):
            wanted = "|".join(AGGREGATIONS)
            raise RulesError(f"rule {rule.name}: a metric and agg {wanted} are needed")
        return rule


def _seconds(v: Any) -> float:
    """30, "30s", "5m", "1h" -> seconds."""
    if isinstance(v, int | float):
        return float(v)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", str(v).strip())
    if not m:
        raise ValueError(f"not a duration: {v!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"  # json | slack


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    webhooks: tuple[Webhook, ...]
    every_s: float


def load_rules(path: Path, extra_webhooks: str = "") -> RuleSet:
    """The rules file; ``extra_webhooks`` ("json:URL,slack:URL") adds receivers."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RulesError(f"{path}: {exc}") from None
    rules = tuple(Rule.from_dict(d) for d in raw.get("rules", []))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise RulesError(f"{path}: rule names must be unique")
    hooks = [Webhook(str(h["url"]), str(h.get("format", "json"))) for h in raw.get("webhooks", [])]
    for spec in filter(None, (s.strip() for s in extra_webhooks.split(","))):
        fmt, _, url = spec.partition(":") if spec.split(":", 1)[0] in ("json", "slack") \
            else ("json", "", spec)  # fmt: skip
        hooks.append(Webhook(url, fmt))
    if any(h.format not in ("json", "slack") for h in hooks):
        raise RulesError("webhook format: json or slack")
    return RuleSet(rules, tuple(hooks), _seconds(raw.get("evaluate_every", "15s")))


# --- the state machine (pure) -----------------------------------------------------------


@dataclass
class RuleState:
    breaching_since: float | None = None
    firing_since: float | None = None  # wall-clock seconds; None: not firing


def step(rule: Rule, state: RuleState, value: float | None, now: float) -> str | None:
    """Advance one rule with a new measurement; returns "firing" or "resolved" when a
    notification is due, else None. An unknown value (source down) changes nothing."""
    if value is None:
        return None
    if rule.breached(value):
        if state.breaching_since is None:
            state.breaching_since = now
        if state.firing_since is None and now - state.breaching_since >= rule.for_s:
            state.firing_since = now
            return "firing"
        return None
    state.breaching_since = None
    if state.firing_since is not None:
        state.firing_since = None
        return "resolved"
    return None


def alert_event(rule: Rule, transition: str, value: float | None, since: float,
                now: float) -> dict[str, Any]:  # fmt: skip
    """The record of a transition; its id is the same whoever computes it again."""
    return {
        "alert_id": str(uuid.uuid5(_ALERT_NS, f"{rule.name}|{transition}|{since:.6f}")),
        "rule": rule.name,
        "state": transition,
        "severity": rule.severity,
        "value": _exact(value),
        "threshold": _exact(rule.threshold),
        "summary": rule.summary or rule.name,
        "at": datetime.fromtimestamp(now, UTC),
    }


def _exact(value: float | None) -> Decimal | None:
    """A measurement as the topic's decimal (9 fraction digits; no float on Kafka)."""
    if value is None or not math.isfinite(value):
        return None
    return Decimal(f"{value:.9f}")


def webhook_body(event: dict[str, Any], fmt: str) -> bytes:
    numbers = {k: None if event[k] is None else float(event[k]) for k in ("value", "threshold")}
    plain = {**event, **numbers, "at": event["at"].isoformat()}
    if fmt == "slack":
        icon = ":red_circle:" if event["state"] == "firing" else ":large_green_circle:"
        value = "unknown" if event["value"] is None else f"{event['value']:g}"
        return orjson.dumps({"text": f"{icon} {event['state'].upper()} {event['rule']}: "
                                     f"{event['summary']} (value {value}, threshold "
                                     f"{event['threshold']:g})"})  # fmt: skip
    return orjson.dumps(plain)


# --- sources ----------------------------------------------------------------------------


class Sources:
    def __init__(
        self,
        warehouse: Callable[[str], list[list[Any]]],
        lags: Callable[[], Iterable[PartitionLag]],
        samples: Callable[[], Iterable[Sample]],
    ) -> None:
        """warehouse: SQL -> rows; lags: every partition's lag of this installation's
        groups; samples: every sample of every metrics endpoint (``from_settings``
        builds them)."""
        self.warehouse = warehouse
        self.lags = lags
        self.samples = samples
        self.previous: dict[str, tuple[float, dict[str, float]]] = {}  # rate: last totals

    @classmethod
    def from_settings(cls, settings: Settings, bootstrap: str) -> Sources:
        from streams.kafka.lag import group_lags
        from streams.metrics import scrape
        from streams.warehouse import query

        # (open_here=False: a long-running process must not take chDB from the sink)
        return cls(lambda sql: query(settings, sql, open_here=False)["rows"],
                   lambda: group_lags(settings, bootstrap), lambda: scrape(settings))  # fmt: skip

    def measure(self, rule: Rule) -> float | None:
        try:
            if rule.source == "warehouse":
                return self._warehouse(rule)
            if rule.source == "lag":
                return self._lag(rule)
            return self._metrics(rule)
        except Exception as exc:  # a source that cannot answer is "unknown", not a crash
            log.warning("alert source unavailable", rule=rule.name, error=str(exc)[:300])
            return None

    def _warehouse(self, rule: Rule) -> float | None:
        rows = self.warehouse(str(rule.query))
        value = rows[0][0] if rows and rows[0] else None
        return None if value is None else float(value)

    def _lag(self, rule: Rule) -> float | None:
        from streams.kafka.topics import group_id

        per_group: dict[str, int] = defaultdict(int)
        for r in self.lags():
            per_group[r.group] += r.lag
        if rule.group:
            return float(per_group.get(group_id(rule.group), 0))
        return float(max(per_group.values(), default=0))

    def _metrics(self, rule: Rule) -> float | None:
        wanted = [(k, re.compile(v)) for k, v in rule.labels]
        totals: dict[str, float] = defaultdict(float)
        peaks: dict[str, float] = {}
        lows: dict[str, float] = {}
        found = False
        for s in self.samples():
            if s.name not in (rule.metric, f"{rule.metric}_total"):
                continue
            if not all(rx.fullmatch(s.labels.get(k, "")) for k, rx in wanted):
                continue
            found = True
            key = s.labels.get(rule.by, "") if rule.by else ""
            totals[key] += s.value
            peaks[key] = max(peaks.get(key, s.value), s.value)
            lows[key] = min(lows.get(key, s.value), s.value)
        if rule.agg == "max":
            return max(peaks.values()) if found else 0.0
        if rule.agg == "min":  # (no sample: 0, as for the others)
            return min(lows.values()) if found else 0.0
        if rule.agg == "sum":
            return max(totals.values()) if found else 0.0
        # rate: per-second increase since the last evaluation (a reset counts as zero)
        now = time.monotonic()
        before = self.previous.get(rule.name)
        self.previous[rule.name] = (now, dict(totals))
        if before is None:
            return None
        dt = max(1e-6, now - before[0])
        rates = [max(0.0, v - before[1].get(k, 0.0)) / dt for k, v in totals.items()]
        return max(rates, default=0.0)


# --- the processor ----------------------------------------------------------------------


class Alerting:
    def __init__(
        self,
        ruleset: RuleSet,
        producer: Producer,
        sources: Sources,
        history: Iterable[dict[str, Any]] = (),
    ) -> None:
        """producer: to billing.alerts; history: billing.alerts so far (``make_alerting``
        reads it), from which the states are recovered."""
        self.ruleset = ruleset
        self.producer = producer
        self.sources = sources
        self.states: dict[str, RuleState] = {}
        self.pending: set[asyncio.Task[None]] = set()
        self.recover(list(history))

    def recover(self, history: list[dict[str, Any]]) -> None:
        """States from billing.alerts: a rule whose last record is "firing" is firing."""
        last = {e["rule"]: e for e in sorted(history, key=lambda e: e["at"])}
        for rule in self.ruleset.rules:
            state = self.states.setdefault(rule.name, RuleState())
            event = last.get(rule.name)
            if event is not None and event["state"] == "firing":
                state.firing_since = state.breaching_since = event["at"].timestamp()

    async def run(self, stop: Callable[[], bool]) -> None:
        import aiohttp

        from streams.codec import codec
        from streams.kafka.topics import ALERTS

        producer, encode = self.producer, codec(ALERTS.schema).encode
        log.info("alerting", rules=len(self.ruleset.rules), webhooks=len(self.ruleset.webhooks))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not stop():
                started = time.monotonic()
                for rule in self.ruleset.rules:
                    value = await asyncio.to_thread(self.sources.measure, rule)
                    log.debug("measured", rule=rule.name, value=value)
                    state = self.states.setdefault(rule.name, RuleState())
                    since = state.firing_since
                    now = time.time()
                    transition = step(rule, state, value, now)
                    if transition is None:
                        continue
                    began = now if transition == "firing" else since or now
                    event = alert_event(rule, transition, value, began, now)
                    log.warning("alert", rule=rule.name, state=transition, value=value)
                    # recorded first (durable), then notified
                    producer.produce(ALERTS.name, key=rule.name.encode(), value=encode(event))
                    if producer.flush(30):
                        raise RuntimeError("billing.alerts did not acknowledge an alert")
                    for hook in self.ruleset.webhooks:
                        task = asyncio.get_running_loop().create_task(
                            deliver(http, hook, event, stop)
                        )
                        self.pending.add(task)
                        task.add_done_callback(self.pending.discard)
                await asyncio.sleep(max(0.0, self.ruleset.every_s - (time.monotonic() - started)))
            if self.pending:
                await asyncio.wait(self.pending, timeout=10)


def make_alerting(settings: Settings, bootstrap: str, ruleset: RuleSet) -> Alerting:
    """The evaluator with its clients built from the settings (the CLI's); reads
    billing.alerts to its end first."""
    from streams.kafka import clients
    from streams.kafka.topics import ALERTS
    from streams.publish import read_topic

    history = read_topic(settings, bootstrap, ALERTS)
    producer = clients.producer(settings, bootstrap, **{"linger.ms": 0})
    return Alerting(ruleset, producer, Sources.from_settings(settings, bootstrap), history)


async def deliver(http: Any, hook: Webhook, event: dict[str, Any], stop: Callable[[], bool],
                  attempts: int = 12) -> None:  # fmt: skip
    """POST until a 2xx, with exponential backoff and jitter (about 10 minutes at most)."""
    body = webhook_body(event, hook.format)
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            headers = {"Content-Type": "application/json"}
            async with http.post(hook.url, data=body, headers=headers) as response:
                if 200 <= response.status < 300:
                    log.info("alert delivered", rule=event["rule"], state=event["state"],
                             url=hook.url, attempt=attempt)  # fmt: skip
                    return
                reason = f"HTTP {response.status}"
        except Exception as exc:  # any failure of the receiver is retried
            reason = str(exc) or type(exc).__name__
        log.warning("alert delivery failed, retrying", url=hook.url, attempt=attempt,
                    reason=reason)  # fmt: skip
        if stop():
            return
        await asyncio.sleep(delay * random.uniform(1.0, 1.5))
        delay = min(delay * 2, 120)
    log.error("alert not delivered", rule=event["rule"], state=event["state"], url=hook.url)
