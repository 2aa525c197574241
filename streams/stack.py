"""Processor processes started by the CLI (demo, benchmarks, tests, `streambill up`): one
OS process each, so each can be stopped gracefully (SIGTERM) or killed (SIGKILL) on its
own; and the whole stack, started, described and stopped as one (`up`, `status`, `down`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.config import Settings, child_environment, environment
from streams.warehouse import endpoint_file


class ChildProcess:
    """A child OS process with its log file: stop (SIGTERM, then SIGKILL), kill, tail."""

    proc: subprocess.Popen | None
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc and self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        if not self.proc:
            return None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessorProcess(ChildProcess):
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        nice: int = 0,
        top_level: bool = False,
        detached: bool = False,
    ) -> None:
        """nice > 0: a lower CPU priority (bulk work), so that on shared cores the OS runs
        the priority lane's processes first. detached: the process outlives the one that
        started it, in a session of its own (`streambill up`; `down` stops it)."""
        self.settings = settings
        self.extra_env = env or {}
        self.nice = nice
        self.detached = detached
        self.bootstrap = bootstrap
        self.name = name
        self.args = [name, *args]
        # `streambill run <name> ...`, or `streambill <name> ...` (e.g. the API)
        self.argv = self.args if top_level else ["run", *self.args]
        self.proc: subprocess.Popen | None = None
        label = f"{name}-{args[0]}" if args and not args[0].startswith("-") else name
        self.log_path: Path = settings.home / "logs" / f"{label}.log"

    def start(self) -> ProcessorProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = child_environment(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            STREAMBILL_HOME=str(self.settings.home),
            **self.extra_env,
        )
        if self.settings.clickhouse_dsn:
            env["CLICKHOUSE_DSN"] = self.settings.clickhouse_dsn
        from streams.kafka.topics import namespace

        env["STREAMBILL_NAMESPACE"] = namespace()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=self._prepare_child,
            start_new_session=self.detached,
        )
        return self

    @property
    def command(self) -> list[str]:
        """The command line the process runs (as /proc/PID/cmdline shows it)."""
        return [sys.executable, "-m", "streams.cli", *self.argv]

    def _prepare_child(self) -> None:
        if not self.detached:
            _die_with_parent()
        if self.nice:
            os.nice(self.nice)


def _die_with_parent() -> None:
    """Linux: SIGTERM the processor when the process that started it dies, so a killed
    demo, benchmark or test run never leaves processors behind."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


class ProcessExited(RuntimeError):
    """A process that was waited on exited."""


def wait_while_running(
    done: Callable[[], bool],
    procs: Iterable[ProcessorProcess],
    timeout: float,
    what: str,
    every: float = 0.3,
) -> None:
    """Until done(): ProcessExited (with the end of its log) as soon as one of procs has
    exited, TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        for proc in procs:
            if not proc.alive:
                raise ProcessExited(f"{proc.name} exited:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)


def wait_for_warehouse_endpoint(
    settings: Settings, sink: ProcessorProcess, timeout: float = 60
) -> None:
    """The sink owns chDB; wait until it answers queries (its endpoint file names its pid)."""
    if not settings.warehouse_dsn.startswith("chdb://"):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sink.alive:
            raise RuntimeError(f"sink exited during start-up:\n{sink.tail()}")
        try:
            info = json.loads(endpoint_file(settings).read_text())
            if sink.proc and info.get("pid") == sink.proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError("the sink did not open the warehouse in time")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(
    settings: Settings, bootstrap: str, workers: int = 1, env: dict[str, str] | None = None
) -> tuple[ProcessorProcess, int]:
    """`streambill api` on a free port, once it answers /healthz."""
    import urllib.request

    port = free_port()
    api = ProcessorProcess(settings, bootstrap, "api", "--port", str(port), "--workers",
                           str(workers), env=env, top_level=True).start()  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return api, port
        except OSError:
            if not api.alive or time.monotonic() > deadline:
                api.stop()
                raise RuntimeError(f"the API did not start:\n{api.tail()}") from None
            time.sleep(0.1)


@contextmanager
def isolated_namespace(
    parent: Path, bootstrap: str, partitions: int, prefix: str, keep_home: bool = False
) -> Iterator[Settings]:
    """A fresh topic/group namespace with its own home (state, logs, embedded warehouse)
    under `parent`, for a benchmark, a chaos run or the demo; its topics (and so its
    consumer groups) are deleted afterwards, its home too unless `keep_home`. Processes
    started meanwhile inherit it."""
    from streams.kafka import clients
    from streams.kafka.topics import delete_namespace, ensure_topics, namespace, set_namespace

    previous = namespace()
    ns = f"{prefix}{uuid.uuid4().hex[:8]}."
    set_namespace(ns)
    home = parent / ns.rstrip(".")
    with environment(STREAMBILL_HOME=str(home), STREAMBILL_PARTITIONS=str(partitions),
                     STREAMBILL_NAMESPACE=ns):  # fmt: skip
        settings = Settings(home=home, partitions=partitions)
        admin = clients.admin(settings, bootstrap)
        ensure_topics(admin, settings)
        try:
            yield settings
        finally:
            with suppress(Exception):  # best effort clean-up: the broker may be going away
                delete_namespace(admin, ns)
            if not keep_home:
                shutil.rmtree(home, ignore_errors=True)
            set_namespace(previous)


# --- `streambill up` / `status` / `down`: the whole stack as detached processes ---------


def consumer_group(processor: str) -> str:
    """The consumer group a processor's workers share (the processors' own names)."""
    from streams.processors import payments, rating, sink
    from streams.processors.lane import lane_group

    if processor.startswith("lane-"):
        return lane_group(processor.removeprefix("lane-"))
    return {"rating": rating.GROUP, "payments": payments.GROUP, "sink": sink.GROUP}[processor]


OPTIONAL_PARTS = ("alerts", "dashboard")  # what `up --with` may leave out


@dataclass(frozen=True)
class Part:
    """One process of the stack: `streambill ARGV`, healthy when `health` says so."""

    name: str
    argv: tuple[str, ...]  # after `streambill` (top level) or `streambill run`
    health: str  # metrics (its endpoint advertised) | warehouse | readyz | page | ready-file
    top_level: bool = False
    grouped: bool = False  # has a consumer group (whose lag `status` shows)


class StackError(RuntimeError):
    pass


def stack_file(settings: Settings) -> Path:
    return settings.home / "stack.json"


def read_stack(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(stack_file(settings).read_text())
    except (OSError, ValueError):
        return None


def running(entry: dict[str, Any]) -> bool:
    """The recorded process still runs: its pid is alive (not a zombie) and runs the
    recorded command (a pid reused by another program is not it)."""
    proc = Path("/proc") / str(entry["pid"])
    try:
        cmdline = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and cmdline == entry["command"]


def running_stack(settings: Settings) -> list[dict[str, Any]]:
    """The processes of the stack recorded under this home that still run."""
    stack = read_stack(settings)
    return [e for e in (stack or {}).get("processes", []) if running(e)]


def stack_parts(settings: Settings, with_parts: set[str], gateway_url: str | None,
                api_port: int, dashboard_port: int) -> list[list[Part]]:  # fmt: skip
    """The stack in start-up order, as stages: each stage starts once every process of
    the one before is healthy (the sink owns the warehouse the others query; the gateway
    is up before payments call it; the API's readiness needs only Kafka)."""
    first = [Part("sink", ("sink",), "warehouse", grouped=True)]
    if gateway_url is None:  # none configured: the simulator, started here
        first.append(Part("gateway", ("gateway", "serve", "--port", "0", "--ready-file",
                                      str(settings.home / "gateway-ready.json")),
                          "ready-file", top_level=True))  # fmt: skip
    processors = [
        Part("rating", ("rating",), "metrics", grouped=True),
        Part("payments", ("payments",), "metrics", grouped=True),
        Part("lane-priority", ("lane", "priority"), "metrics", grouped=True),
        Part("lane-standard", ("lane", "standard"), "metrics", grouped=True),
        Part("api", ("api", "--port", str(api_port)), "readyz", top_level=True),
    ]
    extras = []
    if "alerts" in with_parts:
        extras.append(Part("alerts", ("alerts",), "metrics"))
    if "dashboard" in with_parts:
        extras.append(Part("dashboard", ("dashboard", "--port", str(dashboard_port)), "page",
                           top_level=True))  # fmt: skip
    return [stage for stage in (first, processors, extras) if stage]


def _healthy(settings: Settings, part: Part, proc: ProcessorProcess) -> tuple[int, str] | None:
    """(port, url) once the process answers as `part.health` says, else None."""
    import urllib.request

    from streams import metrics

    pid = proc.proc.pid if proc.proc else -1
    if part.health == "ready-file":
        try:
            info = json.loads(Path(part.argv[-1]).read_text())
        except (OSError, ValueError):
            return None
        return (int(info["url"].rsplit(":", 1)[1].split("/")[0]), info["url"]) if (
            info.get("pid") == pid) else None  # fmt: skip
    if part.health in ("readyz", "page"):
        port = int(part.argv[part.argv.index("--port") + 1])
        url = f"http://127.0.0.1:{port}/"
        try:
            with urllib.request.urlopen(url + ("readyz" if part.health == "readyz" else ""),
                                        timeout=2):  # fmt: skip
                return port, url
        except OSError:
            return None
    if part.health == "warehouse" and settings.warehouse_dsn.startswith("chdb://"):
        try:
            info = json.loads(endpoint_file(settings).read_text())
        except (OSError, ValueError):
            return None
        if info.get("pid") != pid:
            return None
    endpoint = next((e for e in metrics.endpoints(settings) if e["pid"] == pid), None)
    if endpoint is None:
        return None
    url = endpoint["url"]
    return int(url.rsplit(":", 1)[1].split("/")[0]), url


def start_stack(
    settings: Settings,
    with_parts: set[str],
    api_port: int,
    dashboard_port: int,
    say: Callable[[str], None],
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Start the stack (see stack_parts) as detached processes, each healthy before the
    next stage starts; record them in $STREAMBILL_HOME/stack.json. On a failure what was
    started is stopped again and StackError says which process failed and why."""
    from streams.kafka import clients
    from streams.kafka.local import KAFKA_SH, bootstrap_servers
    from streams.kafka.topics import ensure_topics, namespace

    if live := running_stack(settings):
        raise StackError(
            f"a stack is already running ({len(live)} processes recorded in "
            f"{stack_file(settings)}): `streambill status` shows it, `streambill down` stops it"
        )
    broker_started = False
    if settings.bootstrap_servers:
        say(f"Kafka: {settings.bootstrap_servers} (configured)")
    else:
        status = subprocess.run([str(KAFKA_SH), "status"], capture_output=True, text=True,
                                check=False).stdout  # fmt: skip
        broker_started = "running" not in status
    bootstrap = bootstrap_servers(settings)
    if not settings.bootstrap_servers:
        say(f"Kafka: local broker at {bootstrap} "
            f"({'started' if broker_started else 'already running'})")  # fmt: skip
    ensure_topics(clients.admin(settings, bootstrap), settings)
    gateway_url = None
    if settings.gateway != "simulator":
        say(f"gateway: {settings.gateway} (configured)")
    elif settings.gateway_url_configured:
        gateway_url = settings.gateway_url
        say(f"gateway: the simulator at {gateway_url} (configured)")
    stack: dict[str, Any] = {
        "started_at": _now(), "home": str(settings.home), "namespace": namespace(),
        "bootstrap": bootstrap, "broker_started": broker_started,
        "gateway_url": gateway_url, "processes": [],
    }  # fmt: skip
    started: list[ProcessorProcess] = []
    env: dict[str, str] = {}
    try:
        for stage in stack_parts(settings, with_parts, gateway_url, api_port, dashboard_port):
            pending = {}
            for part in stage:
                proc = ProcessorProcess(settings, bootstrap, *part.argv, env=env,
                                        top_level=part.top_level, detached=True)  # fmt: skip
                if part.name == "gateway":
                    Path(part.argv[-1]).unlink(missing_ok=True)
                pending[part] = proc.start()
                started.append(proc)
            deadline = time.monotonic() + timeout
            while pending:
                for part, proc in list(pending.items()):
                    if not proc.alive:
                        raise StackError(f"{part.name} exited during start-up "
                                         f"(log {proc.log_path}):\n{proc.tail()}")  # fmt: skip
                    if (found := _healthy(settings, part, proc)) is None:
                        continue
                    del pending[part]
                    port, url = found
                    assert proc.proc is not None
                    stack["processes"].append({
                        "name": part.name, "pid": proc.proc.pid, "command": proc.command,
                        "port": port, "url": url, "log": str(proc.log_path),
                        "group": consumer_group(part.name) if part.grouped else None,
                        "started_at": _now(),
                    })  # fmt: skip
                    _write_stack(settings, stack)
                    say(f"{part.name}: pid {proc.proc.pid}, {url} (log {proc.log_path})")
                    if part.name == "gateway":
                        stack["gateway_url"] = url
                        env = {"STREAMBILL_GATEWAY": "simulator", "STREAMBILL_GATEWAY_URL": url}
                        say(f"gateway: the simulator at {url}, started for payments and "
                            "the lanes (no STREAMBILL_GATEWAY_URL configured)")  # fmt: skip
                if pending and time.monotonic() > deadline:
                    names = ", ".join(p.name for p in pending)
                    raise StackError(f"not healthy after {timeout:.0f} s: {names}")
                time.sleep(0.2)
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        stack_file(settings).unlink(missing_ok=True)
        raise
    _write_stack(settings, stack)
    return stack


def stop_stack(
    settings: Settings, say: Callable[[str], None], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """SIGTERM each recorded process that still runs, in reverse start order, waiting
    `timeout` seconds for it (then SIGKILL); the local broker too if `up` started it.
    Returns the processes stopped, each with how ("stopped" or "killed")."""
    from streams.kafka.local import stop_local_kafka

    stack = read_stack(settings)
    if stack is None:
        return []
    stopped = []
    for entry in reversed(stack["processes"]):
        if not running(entry):
            say(f"{entry['name']}: pid {entry['pid']} was not running")
            continue
        os.kill(entry["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while running(entry) and time.monotonic() < deadline:
            time.sleep(0.1)
        how = "stopped"
        if running(entry):
            with suppress(ProcessLookupError):
                os.kill(entry["pid"], signal.SIGKILL)
            how = f"killed (no exit {timeout:.0f} s after SIGTERM)"
        say(f"{entry['name']}: pid {entry['pid']} {how}")
        stopped.append({**entry, "how": how})
    if stack.get("broker_started"):
        stop_local_kafka()
        say("Kafka: the local broker `up` started, stopped")
    stack_file(settings).unlink(missing_ok=True)
    return stopped


def stack_status(settings: Settings, timeout: float = 10.0) -> dict[str, Any] | None:
    """The recorded stack, each process with `alive` and its consumer group's lag (None
    when it has no group, the group has not committed yet or the broker does not answer)."""
    from streams.kafka.lag import group_lags
    from streams.kafka.topics import group_id

    stack = read_stack(settings)
    if stack is None:
        return None
    lags: dict[str, int] | None = {}
    try:
        for row in group_lags(settings, stack["bootstrap"], timeout):
            lags[row.group] = lags.get(row.group, 0) + row.lag
    except Exception:  # the broker is down or unreachable: lag unknown, not zero
        lags = None
    processes = []
    for entry in stack["processes"]:
        group = entry.get("group")
        lag = None if lags is None or not group else lags.get(group_id(group))
        processes.append({**entry, "alive": running(entry), "lag": lag})
    return {**stack, "processes": processes}


def _write_stack(settings: Settings, stack: dict[str, Any]) -> None:
    path = stack_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stack, indent=2) + "\n")
    tmp.replace(path)


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")
