"""`streambill api` (serve) and `streambill tenant` (API keys and limits)."""

from __future__ import annotations

import subprocess
import sys

import typer
from rich.console import Console
from rich.table import Table

from streams.config import API_WORKER_VARIABLE, child_environment, is_api_worker
from streams.config import settings as load_settings
from streams.logging import fatal_errors_as_json

tenant_app = typer.Typer(help="API tenants: keys (stored hashed) and limits, read live by the API.")
console = Console(stderr=True)
out = Console()


@fatal_errors_as_json
def api(
    host: str = typer.Option("127.0.0.1", envvar="STREAMBILL_API_HOST"),
    port: int = typer.Option(8000, envvar="STREAMBILL_API_PORT"),
    workers: int = typer.Option(
        1,
        min=1,
        help="processes sharing the port (SO_REUSEPORT); "
        "each enforces its share of every tenant's limits",
    ),
) -> None:
    """Serve the HTTP ingestion API (JSON -> Kafka) until SIGTERM."""
    from confluent_kafka import KafkaException

    from streams.api.server import serve
    from streams.kafka import clients
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import ensure_topics

    settings = load_settings()
    bootstrap = bootstrap_servers(settings)
    children = []
    if not is_api_worker():
        try:
            ensure_topics(clients.admin(settings, bootstrap), settings, timeout=5)
        except KafkaException as exc:  # serve anyway: writes get 503 until Kafka is back
            console.print(f"[yellow]Kafka unavailable at start-up ({exc}); serving 503s[/]")
        env = child_environment(**{API_WORKER_VARIABLE: "1"}, KAFKA_BOOTSTRAP_SERVERS=bootstrap)
        argv = [
            sys.executable,
            "-m",
            "streams.cli",
            "api",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        children = [subprocess.Popen(argv, env=env) for _ in range(workers - 1)]
    try:
        serve(settings, bootstrap, host, port, workers)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(30)


def _path():
    from streams.api.server import tenants_path

    return tenants_path(load_settings())


@tenant_app.command("add")
def tenant_add(
    tenant_id: str,
    account_prefix: str = typer.Option(..., help="the tenant owns accounts starting with it"),
    max_concurrency: int = typer.Option(256, min=1, help="requests in flight at most"),
    rate: float = typer.Option(5000, min=0.001, help="requests per second at most"),
    admin: bool = typer.Option(False, "--admin", help="an operator: may publish and retire plans"),
) -> None:
    """Add a tenant and print its first API key (shown once; only its hash is stored)."""
    from streams.api.tenants import Tenant, hash_key, load, new_key, save

    path = _path()
    tenants = load(path)
    if tenant_id in tenants:
        raise typer.BadParameter(f"tenant {tenant_id} exists; use `tenant key` for a new key")
    key = new_key(tenant_id)
    tenants[tenant_id] = Tenant(tenant_id, account_prefix, [hash_key(key)], max_concurrency, rate,
                                admin=admin)  # fmt: skip
    save(path, tenants)
    _show_new_key(key)


def _show_new_key(key: str) -> None:
    """The key alone on stdout (for `$(...)`), its id on stderr."""
    from streams.api.tenants import hash_key, key_id

    out.print(key, soft_wrap=True)
    console.print(f"key id {key_id(hash_key(key))} (shown by `tenant list`; revoke with "
                  "`tenant key --revoke ID`)")  # fmt: skip


@tenant_app.command("key")
def tenant_key(
    tenant_id: str | None = typer.Argument(None, help="the tenant (optional with --revoke)"),
    revoke_others: bool = typer.Option(False, help="the new key becomes the tenant's only one"),
    revoke: str | None = typer.Option(
        None, "--revoke", metavar="KEY_ID", help="revoke this key (its id, or the key itself)"
    ),
) -> None:
    """Print a new API key for a tenant (rotation: revoke the old ones once clients
    moved), or revoke a key with --revoke KEY_ID. Running API workers re-read the tenants
    within a second: from then on a revoked key gets 401."""
    from streams.api.tenants import TenantError, hash_key, load, new_key, save
    from streams.api.tenants import revoke as revoke_key

    path = _path()
    tenants = load(path)
    if revoke is not None:
        try:
            tenant = revoke_key(tenants, revoke, tenant_id)
        except TenantError as exc:
            console.print(f"[red]{exc}[/] (`streambill tenant list` shows the key ids)")
            raise typer.Exit(1) from None
        save(path, tenants)
        left = len(tenant.key_sha256)
        console.print(f"revoked {revoke} of tenant {tenant.tenant_id} ({left} key(s) left): "
                      "API workers refuse it within a second")  # fmt: skip
        return
    if tenant_id is None:
        raise typer.BadParameter("the tenant to make a key for (or --revoke KEY_ID)")
    if tenant_id not in tenants:
        raise typer.BadParameter(f"no tenant {tenant_id}")
    key = new_key(tenant_id)
    t = tenants[tenant_id]
    t.key_sha256 = [hash_key(key)] if revoke_others else [*t.key_sha256, hash_key(key)]
    save(path, tenants)
    _show_new_key(key)


@tenant_app.command("limits")
def tenant_limits(
    tenant_id: str,
    max_concurrency: int | None = typer.Option(None, min=1),
    rate: float | None = typer.Option(None, min=0.001),
) -> None:
    """Change a tenant's limits; running API workers apply them within a second."""
    from streams.api.tenants import load, save

    path = _path()
    tenants = load(path)
    if tenant_id not in tenants:
        raise typer.BadParameter(f"no tenant {tenant_id}")
    if max_concurrency is not None:
        tenants[tenant_id].max_concurrency = max_concurrency
    if rate is not None:
        tenants[tenant_id].rate_per_s = rate
    save(path, tenants)


@tenant_app.command("list")
def tenant_list() -> None:
    """Tenants, their account prefixes, limits and key ids."""
    from streams.api.tenants import key_id, load

    table = Table("tenant", "account prefix", "max concurrency", "rate/s", "key ids")
    for t in load(_path()).values():
        table.add_row(
            t.tenant_id,
            t.account_prefix,
            str(t.max_concurrency),
            f"{t.rate_per_s:g}",
            "\n".join(key_id(h) for h in t.key_sha256) or "(none: every request is a 401)",
        )
    out.print(table)
