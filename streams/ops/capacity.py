"""Capacity answers from measured figures: can N payments (invoices, signups) fit a window?

A rate measured on this installation is the basis, never a constant: the latest run
recorded here (``streambill payment-run`` and ``bill-run`` write what they did, how long
it took and with how many workers to ``$STREAMBILL_HOME/runs/``), else the committed benchmark
figures (``docs/benchmarks/*.json``: measured on this project's reference machine, and
said so). From the rate per worker it answers how long the work takes with today's
workers, how many it needs to fit the window, and the bound that limits it first:
partitions (a consumer group uses at most one worker per partition), CPU (workers past
the host's cores add nothing on one host), the payment gateway's measured ceiling, or
the API tenant's rate limit. ``answer`` is pure.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streams.config import REPO_ROOT, Settings

KINDS = ("payments", "invoices", "signups")
BENCHMARKS = {  # kind -> (benchmark file, items, seconds, workers, ceiling per second or None)
    "payments": ("payment-run.json", "payments", "seconds", "workers", "gateway_ceiling_per_min"),
    "invoices": ("billrun-1m.json", "invoices", "seconds", "workers", None),
    "signups": ("signup-spike.json", "signups", "seconds", "api_workers", None),
}
RUN_KINDS = {"payment-run": "payments", "bill-run": "invoices"}


@dataclass(frozen=True)
class Measurement:
    kind: str  # payments | invoices | signups
    items: int
    seconds: float
    workers: int
    source: str  # where the figure comes from
    ceiling_per_s: float | None = None  # the payment gateway's measured ceiling

    @property
    def per_worker_per_s(self) -> float:
        return self.items / self.seconds / max(self.workers, 1)


def runs_dir(settings: Settings) -> Path:
    return settings.home / "runs"


def record_run(settings: Settings, kind: str, items: int, seconds: float, workers: int) -> Path:
    """What a run did (`kind`: payment-run or bill-run), for later capacity answers."""
    at = datetime.now(UTC)
    path = runs_dir(settings) / f"{kind}-{at:%Y%m%dT%H%M%S%fZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": kind, "items": items, "seconds": round(seconds, 3),
                                "workers": workers, "finished_at": at.isoformat()}))  # fmt: skip
    return path


def latest_measurement(settings: Settings, kind: str) -> Measurement | None:
    """The latest run of `kind` recorded here (with work worth timing), else the benchmark."""
    recorded = []
    for path in sorted(runs_dir(settings).glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if RUN_KINDS.get(run.get("kind")) == kind and run["items"] > 0 and run["seconds"] > 0:
            recorded.append((run["finished_at"], run, path))
    if recorded:
        _, run, path = max(recorded, key=lambda r: r[0])
        return Measurement(kind, int(run["items"]), float(run["seconds"]), int(run["workers"]),
                           f"run recorded {run['finished_at']} ({path.name})")  # fmt: skip
    name, items, seconds, workers, ceiling = BENCHMARKS[kind]
    bench = REPO_ROOT / "docs" / "benchmarks" / name
    if not bench.exists():
        return None
    metrics = json.loads(bench.read_text())["metrics"]
    return Measurement(
        kind,
        int(metrics[items]),
        float(metrics[seconds]),
        int(metrics.get(workers) or 1),
        f"benchmark docs/benchmarks/{name} (the reference machine)",
        float(metrics[ceiling]) / 60 if ceiling and metrics.get(ceiling) else None,
    )


@dataclass(frozen=True)
class Answer:
    kind: str
    items: int
    window_s: float
    measured: dict[str, Any]
    workers_now: int
    rate_now_per_s: float
    seconds_now: float
    fits_now: bool
    needed_per_s: float
    workers_needed: int
    partitions: int
    cores: int
    bound: str  # what limits it first: workers, partitions, cpu, gateway ceiling, api limit
    advice: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def answer(
    m: Measurement,
    items: int,
    window_s: float,
    workers_now: int,
    partitions: int,
    cores: int,
    api_limit_per_s: float | None = None,
) -> Answer:
    """How long `items` take with `workers_now` workers at the measured rate per worker,
    and what fitting `window_s` needs."""
    per_worker = m.per_worker_per_s
    if per_worker <= 0:
        raise ValueError(f"{m.source}: no progress measured, no rate to answer from")
    ceilings = [c for c in (m.ceiling_per_s, api_limit_per_s) if c]
    rate_now = per_worker * min(workers_now, partitions)
    rate_now = min([rate_now, *ceilings])
    needed = items / window_s
    workers_needed = max(1, math.ceil(needed / per_worker))
    if m.ceiling_per_s and needed > m.ceiling_per_s:
        bound = "gateway ceiling"
        advice = (f"the gateway takes at most {m.ceiling_per_s:,.0f}/s here: raise its "
                  f"concurrency about {needed / m.ceiling_per_s:.1f}x (more merchant "
                  "accounts or a higher cap), or spread the work over more days")  # fmt: skip
    elif api_limit_per_s and needed > api_limit_per_s:
        bound = "api limit"
        advice = f"raise the tenant's rate limit above {needed:,.0f}/s"
    elif workers_needed > partitions:
        bound = "partitions"
        advice = (f"{workers_needed} workers need {workers_needed} partitions (today "
                  f"{partitions}): streambill topics --partitions {workers_needed}")  # fmt: skip
    elif workers_needed > cores:
        bound = "cpu"
        hosts = math.ceil(workers_needed / cores)
        advice = (f"{workers_needed} workers need about {workers_needed} cores (this host "
                  f"has {cores}): run them on {hosts} hosts")  # fmt: skip
    else:
        bound = "workers"
        advice = (f"run {workers_needed} worker(s) (streambill scale)"
                  if workers_needed > workers_now else "today's workers are enough")  # fmt: skip
    seconds_now = items / rate_now if rate_now > 0 else math.inf
    return Answer(
        m.kind, items, window_s,
        {**asdict(m), "per_worker_per_s": round(per_worker, 3)},
        workers_now, round(rate_now, 3), round(seconds_now, 3), seconds_now <= window_s,
        round(needed, 3), workers_needed, partitions, cores, bound, advice,
    )  # fmt: skip


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
