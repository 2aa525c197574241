"""Shared fixtures. Integration tests run against the real local Kafka broker (started
once by the suite through deploy/kafka/kafka.sh unless KAFKA_BOOTSTRAP_SERVERS is set)
and the real embedded ClickHouse engine (chDB); nothing is mocked."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from streams.config import Settings


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The configured cluster, or the local broker: reused if running, else started for
    the session and stopped after it."""
    import subprocess

    from streams.kafka.local import KAFKA_SH, start_local_kafka, stop_local_kafka

    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    status = subprocess.run([str(KAFKA_SH), "status"], capture_output=True, text=True).stdout
    already_running = "running" in status
    bootstrap = start_local_kafka()
    yield bootstrap
    if not already_running:
        stop_local_kafka()


@pytest.fixture
def pipeline_env(
    tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """An isolated pipeline on the shared broker: its own topic/group namespace, home
    directory (state, embedded warehouse) and 4 partitions. Processor subprocesses
    inherit it through the environment."""
    with isolated_pipeline(tmp_path / "home", kafka_bootstrap, monkeypatch) as settings:
        yield settings


@pytest.fixture(scope="module")
def module_pipeline_env(
    tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str
) -> Iterator[Settings]:
    """pipeline_env shared by the tests of one module (a stack started once)."""
    with (
        pytest.MonkeyPatch.context() as monkeypatch,
        isolated_pipeline(
            tmp_path_factory.mktemp("home"), kafka_bootstrap, monkeypatch
        ) as settings,
    ):
        yield settings


@contextmanager
def isolated_pipeline(
    home: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    from streams.kafka import clients
    from streams.kafka.topics import delete_namespace, ensure_topics, namespace, set_namespace

    ns = f"t{uuid.uuid4().hex[:10]}."
    previous = namespace()
    set_namespace(ns)
    monkeypatch.setenv("STREAMBILL_NAMESPACE", ns)
    monkeypatch.setenv("STREAMBILL_HOME", str(home))
    monkeypatch.setenv("STREAMBILL_PARTITIONS", "4")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.delenv("CLICKHOUSE_DSN", raising=False)
    settings = Settings()
    admin = clients.admin(settings, kafka_bootstrap)
    ensure_topics(admin, settings)
    try:
        yield settings
    finally:
        # a suite creates tens of thousands of partitions: a broker that kept them all
        # would run out of file handles (each partition's log is an open file)
        with suppress(Exception):
            delete_namespace(admin, ns)
        set_namespace(previous)
