"""The project's local Kafka cluster (deploy/kafka/kafka.sh), started on demand."""

from __future__ import annotations

import subprocess

from streams.config import DEPLOY_DIR, Settings, child_environment

KAFKA_SH = DEPLOY_DIR / "kafka" / "kafka.sh"


def _script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """kafka.sh's environment: ours with `extra`, less a configured cluster's address."""
    return child_environment(KAFKA_BOOTSTRAP_SERVERS=None, **(extra or {}))


def start_local_kafka(brokers: int = 1, env: dict[str, str] | None = None) -> str:
    """Start (or reuse) the local cluster; returns its bootstrap servers. `env` may name
    another cluster (STREAMBILL_KAFKA_DIR, STREAMBILL_KAFKA_PORT_BASE), as chaos does."""
    proc = subprocess.run(
        [str(KAFKA_SH), "start", "--brokers", str(brokers)],
        check=False,
        capture_output=True,
        text=True,
        env=_script_env(env),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"local Kafka did not start:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


def stop_local_kafka(node: int | None = None, env: dict[str, str] | None = None) -> None:
    args = [str(KAFKA_SH), "stop"] + ([str(node)] if node else [])
    subprocess.run(args, check=True, capture_output=True, env=_script_env(env))


def start_local_node(node: int, env: dict[str, str] | None = None) -> None:
    """Start one stopped node of the running local cluster again (fault tests)."""
    subprocess.run([str(KAFKA_SH), "start-node", str(node)], check=True, capture_output=True,
                   env=_script_env(env))  # fmt: skip


def local_kafka_running() -> bool:
    """Whether a node of the local cluster runs (whoever started it)."""
    proc = subprocess.run([str(KAFKA_SH), "status"], capture_output=True, text=True,
                          check=False, env=_script_env())  # fmt: skip
    return ": running " in proc.stdout


def bootstrap_servers(settings: Settings) -> str:
    """The configured cluster, or the local one (started if needed): its SASL/SCRAM
    listeners when the configuration asks for SASL, its plaintext ones otherwise."""
    if settings.bootstrap_servers:
        return settings.bootstrap_servers
    plaintext = start_local_kafka()
    if settings.kafka_security.get("security.protocol", "").upper() != "SASL_PLAINTEXT":
        return plaintext
    proc = subprocess.run([str(KAFKA_SH), "bootstrap-sasl"], check=True, capture_output=True,
                          text=True, env=_script_env())  # fmt: skip
    return proc.stdout.strip().splitlines()[-1]
