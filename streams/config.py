"""Settings, read once from the environment: one place for every knob."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = REPO_ROOT / "schemas"
DEPLOY_DIR = REPO_ROOT / "deploy"

# Kafka client settings passed through from the environment (TLS / SASL), so a secured
# cluster is one export away: KAFKA_SECURITY_PROTOCOL=SASL_SSL, KAFKA_SASL_MECHANISM=...
_KAFKA_SECURITY_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "KAFKA_SASL_USERNAME": "sasl.username",
    "KAFKA_SASL_PASSWORD": "sasl.password",
    "KAFKA_SSL_CA_LOCATION": "ssl.ca.location",
    "KAFKA_SSL_CERTIFICATE_LOCATION": "ssl.certificate.location",
    "KAFKA_SSL_KEY_LOCATION": "ssl.key.location",
}


def _home() -> Path:
    return Path(os.environ.get("STREAMBILL_HOME", REPO_ROOT / ".streambill")).resolve()


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=_home)
    bootstrap_servers: str | None = field(
        default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None
    )
    partitions: int = field(
        default_factory=lambda: int(os.environ.get("STREAMBILL_PARTITIONS", "12"))
    )
    replication: int = field(
        default_factory=lambda: int(os.environ.get("STREAMBILL_REPLICATION", "0"))
    )  # 0: as many as the cluster has brokers, at most 3
    clickhouse_dsn: str | None = field(default_factory=lambda: os.environ.get("CLICKHOUSE_DSN"))
    kafka_security: dict[str, str] = field(
        default_factory=lambda: {
            key: os.environ[env] for env, key in _KAFKA_SECURITY_ENV.items() if os.environ.get(env)
        }
    )

    @property
    def warehouse_dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{self.home / 'warehouse'}"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"


def settings() -> Settings:
    return Settings()
