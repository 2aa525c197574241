"""Settings, read once from the environment: one place for every knob.

This is the only module of the package that touches ``os.environ`` (tests/test_config.py
checks): everything else reads ``Settings``, one of the functions below, or a typer
option's ``envvar`` (the variables in ``CLI_OPTION_VARIABLES``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = REPO_ROOT / "schemas"
DEPLOY_DIR = REPO_ROOT / "deploy"
DEFAULT_CATALOG = DEPLOY_DIR / "demo" / "catalog.json"

# Kafka client settings passed through from the environment (TLS / SASL) to every
# producer, consumer and admin client (streams/kafka/clients.py), so a secured cluster is
# one export away: KAFKA_SECURITY_PROTOCOL=SASL_SSL, KAFKA_SASL_MECHANISM=SCRAM-SHA-512, ...
# Values are librdkafka's (security.protocol: PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL).
_KAFKA_SECURITY_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KAFKA_SASL_MECHANISM": "sasl.mechanism",  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    "KAFKA_SASL_USERNAME": "sasl.username",
    "KAFKA_SASL_PASSWORD": "sasl.password",
    "KAFKA_SSL_CA_LOCATION": "ssl.ca.location",  # CA bundle (PEM) to verify the brokers
    "KAFKA_SSL_CERTIFICATE_LOCATION": "ssl.certificate.location",  # client cert (mTLS)
    "KAFKA_SSL_KEY_LOCATION": "ssl.key.location",
    "KAFKA_SSL_KEY_PASSWORD": "ssl.key.password",
    # "https" (the default: check the broker's host name) or "none"
    "KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM": "ssl.endpoint.identification.algorithm",
}


# read by typer as the defaults of command-line options (streams/cli.py, streams/api/cli.py)
CLI_OPTION_VARIABLES = frozenset({
    "STREAMBILL_LOG_LEVEL", "STREAMBILL_CATALOG", "STREAMBILL_ALERT_RULES",
    "STREAMBILL_ALERT_WEBHOOKS", "STREAMBILL_DASHBOARD_HOST", "STREAMBILL_DASHBOARD_PORT",
    "STREAMBILL_API_HOST", "STREAMBILL_API_PORT",
})  # fmt: skip

# set in the API's extra worker processes (`streambill api --workers N`): they serve only
API_WORKER_VARIABLE = "STREAMBILL_API_CHILD"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


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
    # each processor's metrics endpoint (streams/metrics.py serve); port 0: any free port
    metrics_host: str = field(
        default_factory=lambda: os.environ.get("STREAMBILL_METRICS_HOST", "127.0.0.1")
    )
    metrics_port: int = field(default_factory=lambda: int(_env("STREAMBILL_METRICS_PORT", "0")))
    # the local broker's data and logs (deploy/kafka/kafka.sh reads the same variable)
    kafka_dir: Path = field(
        default_factory=lambda: Path(
            _env("STREAMBILL_KAFKA_DIR", str(REPO_ROOT / ".streambill" / "kafka"))
        ).resolve()
    )
    kafka_security: dict[str, str] = field(
        default_factory=lambda: {
            key: os.environ[env] for env, key in _KAFKA_SECURITY_ENV.items() if os.environ.get(env)
        }
    )

    # payments: which gateway, its merchant accounts and limits, the dunning schedule
    gateway: str = field(default_factory=lambda: _env("STREAMBILL_GATEWAY", "simulator"))
    gateway_url: str = field(
        default_factory=lambda: _env("STREAMBILL_GATEWAY_URL", "http://127.0.0.1:18080")
    )
    # whether gateway_url was given (`streambill up` then uses that simulator, not its own)
    gateway_url_configured: bool = field(
        default_factory=lambda: bool(os.environ.get("STREAMBILL_GATEWAY_URL"))
    )
    # STREAMBILL_GATEWAY=stripe (streams/payments/stripe_gateway.py): the secret or
    # restricted key, the merchant accounts' Connect ids (JSON), another API base
    stripe_api_key: str = field(default_factory=lambda: _env("STRIPE_API_KEY", "").strip())
    stripe_accounts: str = field(default_factory=lambda: _env("STRIPE_ACCOUNTS", "").strip())
    stripe_api_base: str = field(default_factory=lambda: _env("STRIPE_API_BASE", "").strip())
    merchant_accounts: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            a.strip()
            for a in _env(
                "STREAMBILL_MERCHANT_ACCOUNTS", "merchant-1,merchant-2,merchant-3,merchant-4"
            ).split(",")
            if a.strip()
        )
    )
    gateway_max_concurrency: int = field(
        default_factory=lambda: int(_env("STREAMBILL_GATEWAY_MAX_CONCURRENCY", "250"))
    )  # per merchant account, as the gateway allows
    priority_reserve: int = field(
        default_factory=lambda: int(_env("STREAMBILL_PRIORITY_RESERVE", "10"))
    )  # slots per merchant account that bulk payments never take
    urgent_workflows: str = field(
        default_factory=lambda: _env("STREAMBILL_URGENT_WORKFLOWS", "refund,cancellation")
    )  # served by the priority lane; see streams/lanes.py
    dunning: str = field(default_factory=lambda: _env("STREAMBILL_DUNNING", "1d,3d,7d"))
    gateway_timeout_s: float = field(
        default_factory=lambda: float(_env("STREAMBILL_GATEWAY_TIMEOUT", "5"))
    )  # per call; a timed-out call is retried with the same idempotency key

    # ingestion API
    api_tenants: Path | None = field(
        default_factory=lambda: (
            Path(os.environ["STREAMBILL_API_TENANTS"])
            if os.environ.get("STREAMBILL_API_TENANTS")
            else None
        )
    )  # default: $STREAMBILL_HOME/api/tenants.json
    api_kafka_timeout_s: float = field(
        default_factory=lambda: float(_env("STREAMBILL_API_KAFKA_TIMEOUT", "3"))
    )  # longest a write waits for Kafka before its 503
    api_max_body: int = field(
        default_factory=lambda: int(_env("STREAMBILL_API_MAX_BODY", str(1024 * 1024)))
    )  # bytes; a larger body gets 413
    catalog: Path = field(
        default_factory=lambda: Path(_env("STREAMBILL_CATALOG", str(DEFAULT_CATALOG)))
    )

    # rating: what a worker's memory mostly is, beside what librdkafka's threads hold for
    # fetched batches (see rating.FETCH_SIZES): decoded states, about 2.5 KB each with a
    # period's event ids, in the cache and in the open transaction (up to one per record,
    # with their changelog bytes and RocksDB batch)
    # which version of the rating contract the streaming rater implements: 1 (the fast
    # rater of version 1, which dead-letters the events of version 2) or 2 (every rule)
    rating_contract: int = field(
        default_factory=lambda: int(_env("STREAMBILL_RATING_CONTRACT", "1"))
    )
    rating_state_cache: int = field(
        default_factory=lambda: int(_env("STREAMBILL_RATING_STATE_CACHE", "50000"))
    )  # committed states kept decoded per worker, shared by its partitions
    rating_transaction_records: int = field(
        default_factory=lambda: int(_env("STREAMBILL_RATING_TRANSACTION_RECORDS", "20000"))
    )  # input records per transaction at most (one poll)
    # ... except while a transaction holds nothing but usage: it goes on polling up to
    # this many records, touching at most rating_state_cache subscriptions. Usage costs
    # mostly per subscription touched (its state, changelog record and RocksDB entry), so
    # more of it per transaction is cheaper per event, and a usage record weighs a few
    # hundred bytes until its transaction ends.
    rating_usage_transaction_records: int = field(
        default_factory=lambda: int(_env("STREAMBILL_RATING_USAGE_TRANSACTION_RECORDS", "100000"))
    )

    # every bill run and payment run must be done within this of its issue (5h; empty:
    # no deadline unless the command gives one): its ETA and margin are watched, alerted on
    run_deadline: str = field(default_factory=lambda: _env("STREAMBILL_RUN_DEADLINE", ""))
    # who issues the invoices: printed on every invoice document
    issuer_name: str = field(default_factory=lambda: _env("STREAMBILL_ISSUER_NAME", "streambill"))
    issuer_address: str = field(
        default_factory=lambda: _env("STREAMBILL_ISSUER_ADDRESS", "").replace("\\n", "\n")
    )  # lines separated by newlines (or a literal \n in the variable)
    issuer_tax_id: str = field(default_factory=lambda: _env("STREAMBILL_ISSUER_TAX_ID", ""))
    issuer_email: str = field(default_factory=lambda: _env("STREAMBILL_ISSUER_EMAIL", ""))

    # every processor logs a progress line this often (records, invoices, charges, lag); 0: never
    progress_seconds: float = field(
        default_factory=lambda: float(_env("STREAMBILL_PROGRESS_SECONDS", "10"))
    )

    # `streambill chaos`: its own three brokers' first port and heap
    chaos_kafka_port_base: str | None = field(
        default_factory=lambda: os.environ.get("STREAMBILL_CHAOS_KAFKA_PORT_BASE")
    )
    kafka_heap_mb: str = field(default_factory=lambda: os.environ.get("KAFKA_HEAP_MB", "512"))

    @property
    def warehouse_dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{self.home / 'warehouse'}"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def demo_dir(self) -> Path:
        """Where `streambill demo` keeps the home of each run (named after its namespace)."""
        return self.home / "demo"


def settings() -> Settings:
    return Settings()


def log_level() -> str:
    """Read before any settings, by streams/logging.py."""
    return _env("STREAMBILL_LOG_LEVEL", "INFO")


def environment_namespace() -> str:
    """The topic and group prefix a process starts with (streams/kafka/topics.py)."""
    return os.environ.get("STREAMBILL_NAMESPACE", "")


def clickhouse_credentials() -> dict[str, str]:
    """For a ClickHouse server (CLICKHOUSE_DSN); chDB takes none."""
    return {
        "username": os.environ.get("CLICKHOUSE_USER", "default"),
        "password": os.environ.get("CLICKHOUSE_PASSWORD", ""),
    }


def is_api_worker() -> bool:
    return os.environ.get(API_WORKER_VARIABLE) == "1"


def child_environment(**overrides: str | None) -> dict[str, str]:
    """This process's environment for a child process, with `overrides` (None: unset)."""
    env = dict(os.environ)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """`values` in this process's environment (for the processes it starts meanwhile),
    the previous ones back afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
