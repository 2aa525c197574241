"""Processor processes started by the CLI (demo, benchmarks, tests): one OS process each,
so each can be stopped gracefully (SIGTERM) or killed (SIGKILL) on its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from streams.config import Settings
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
    ) -> None:
        """nice > 0: a lower CPU priority (bulk work), so that on shared cores the OS runs
        the priority lane's processes first."""
        self.settings = settings
        self.extra_env = env or {}
        self.nice = nice
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
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMBILL_HOME": str(self.settings.home),
            **self.extra_env,
        }
        if self.settings.clickhouse_dsn:
            env["CLICKHOUSE_DSN"] = self.settings.clickhouse_dsn
        from streams.kafka.topics import namespace

        env["STREAMBILL_NAMESPACE"] = namespace()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", *self.argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=self._prepare_child,
        )
        return self

    def _prepare_child(self) -> None:
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
    under `parent`, for a benchmark or a chaos run; its topics are deleted afterwards,
    its home too unless `keep_home`. Processes started meanwhile inherit it."""
    from streams.kafka import clients
    from streams.kafka.topics import ALL_TOPICS, ensure_topics, namespace, set_namespace

    previous = namespace()
    ns = f"{prefix}{uuid.uuid4().hex[:8]}."
    set_namespace(ns)
    home = parent / ns.rstrip(".")
    names = ("STREAMBILL_HOME", "STREAMBILL_PARTITIONS", "STREAMBILL_NAMESPACE")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(STREAMBILL_HOME=str(home), STREAMBILL_PARTITIONS=str(partitions),
                      STREAMBILL_NAMESPACE=ns)  # fmt: skip
    settings = Settings(home=home, partitions=partitions)
    admin = clients.admin(settings, bootstrap)
    ensure_topics(admin, settings)
    try:
        yield settings
    finally:
        with suppress(Exception):  # best effort clean-up: the broker may be going away
            for future in admin.delete_topics([t.name for t in ALL_TOPICS]).values():
                with suppress(Exception):
                    future.result()
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)
        set_namespace(previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
