"""`streambill reset`: wipe a local installation — $STREAMBILL_HOME (state, logs, the
embedded warehouse, API tenants, demo homes), the local broker's data after stopping
it, or, on a configured cluster, the topics and consumer groups of this namespace and
of demos that did not finish."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from streams.config import REPO_ROOT, Settings
from streams.metrics import endpoints


class RefusedReset(RuntimeError):
    """Not a directory reset may wipe."""


@dataclass(frozen=True)
class ResetPlan:
    home: Path
    entries: list[Path]  # what $STREAMBILL_HOME holds (the broker's data aside)
    kafka_dir: Path | None  # the local broker's data, deleted after it is stopped
    bootstrap: str | None  # the configured cluster, whose namespaces lose their topics
    namespaces: list[str]  # this one, and those of demos that did not finish

    def describe(self) -> list[str]:
        lines = [f"{self.home}/{p.name}" for p in self.entries]
        if self.kafka_dir:
            lines.append(f"{self.kafka_dir} (the local Kafka broker's data; stopped first)")
        if self.bootstrap:
            for ns in self.namespaces:
                lines.append(f"on {self.bootstrap}: the topics and consumer groups of "
                             f"namespace {ns or '(default)'!r}")  # fmt: skip
        return lines


def live_processes(settings: Settings) -> dict[int, str]:
    """pid -> name of the processes of this installation that run: those `streambill up`
    recorded, and any other with a metrics endpoint here (`streambill run ...`, a demo)."""
    from streams.stack import running_stack

    found = {e["pid"]: e["name"] for e in running_stack(settings)}
    for home in [settings.home, *sorted(settings.demo_dir.glob("*/"))]:
        for e in endpoints(replace(settings, home=home)):
            found.setdefault(e["pid"], e["processor"])
    return found


def plan_reset(settings: Settings, namespace: str) -> ResetPlan:
    home = settings.home
    if home in (Path("/"), Path.home()) or REPO_ROOT.is_relative_to(home):
        raise RefusedReset(f"STREAMBILL_HOME is {home}: not a directory of streambill's own")
    local = not settings.bootstrap_servers
    kafka_dir = settings.kafka_dir if local and settings.kafka_dir.exists() else None
    entries = sorted(p for p in home.iterdir() if p != kafka_dir) if home.is_dir() else []
    demos = sorted(settings.demo_dir.glob("demo-*/")) if not local else []
    return ResetPlan(home, entries, kafka_dir, settings.bootstrap_servers,
                     [namespace, *(f"{d.name}." for d in demos)])  # fmt: skip


def wipe(settings: Settings, plan: ResetPlan) -> None:
    if plan.kafka_dir:
        from streams.kafka.local import stop_local_kafka

        stop_local_kafka(env={"STREAMBILL_KAFKA_DIR": str(plan.kafka_dir)})
        shutil.rmtree(plan.kafka_dir)
    if plan.bootstrap:
        from streams.kafka import clients
        from streams.kafka.topics import delete_namespace

        admin = clients.admin(settings, plan.bootstrap)
        for ns in plan.namespaces:
            delete_namespace(admin, ns)
    for path in plan.entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
