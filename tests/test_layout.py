"""The repository's deployable files: docker-compose, scripts, migrations."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from streams.config import REPO_ROOT
from streams.warehouse import migration_files, split_statements


def test_docker_compose_declares_the_stack() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "clickhouse", "rating", "sink"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name in ("rating", "sink"):
        env = services[name]["environment"]
        assert env["CLICKHOUSE_DSN"].startswith("http://clickhouse:")
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_docker_compose_config_when_the_client_has_compose() -> None:
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker compose is not installed here (the YAML is checked above)")
    subprocess.run([docker, "compose", "config", "--quiet"], cwd=REPO_ROOT, check=True)


def test_migrations_are_numbered_and_parse() -> None:
    files = migration_files()
    assert files, "deploy/clickhouse has no migrations"
    numbers = [int(f.name[:4]) for f in files]
    assert numbers == sorted(set(numbers))
    for f in files:
        assert split_statements(f.read_text()), f.name


def test_kafka_script_pins_a_4x_release() -> None:
    pom = (REPO_ROOT / "deploy" / "kafka" / "pom.xml").read_text()
    assert "<kafka.version>4." in pom and "kafka_2.13" in pom
    out = subprocess.run([REPO_ROOT / "deploy/kafka/kafka.sh"], capture_output=True, text=True)
    assert out.returncode == 2 and "start [--brokers N]" in out.stdout
