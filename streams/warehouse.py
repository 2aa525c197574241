"""ClickHouse access (clickhouse-connect only): connection, migrations, the query endpoint.

The DSN picks the engine: ``chdb:///path`` is chDB, ClickHouse in this process (the
embedded default), ``http(s)://host:8123`` a real server. chDB storage belongs to one
process at a time, so the process that lands data (the sink) also answers queries for
everyone else over a small HTTP endpoint, advertised in ``<home>/warehouse.endpoint``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import clickhouse_connect
import structlog
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from streams.config import DEPLOY_DIR, Settings, clickhouse_credentials

log = structlog.get_logger(__name__)
MIGRATIONS_DIR = DEPLOY_DIR / "clickhouse"
DATABASE = "streambill"

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def connect(dsn: str) -> Any:
    """One client per DSN and process (chDB allows only one owner of a data directory)."""
    with _clients_lock:
        if dsn not in _clients:
            if dsn.startswith("chdb://"):
                Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
                client = clickhouse_connect.get_client(dsn=dsn)
                client.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
                client.command(f"USE {DATABASE}")  # the chDB session keeps it
            else:
                credentials = clickhouse_credentials()
                clickhouse_connect.get_client(dsn=dsn, **credentials).command(
                    f"CREATE DATABASE IF NOT EXISTS {DATABASE}"
                )
                client = clickhouse_connect.get_client(dsn=dsn, database=DATABASE, **credentials)
            _clients[dsn] = client
        return _clients[dsn]


def disconnect(dsn: str) -> None:
    """Close this process's client of `dsn` (for chDB: release the data directory)."""
    with _clients_lock:
        client = _clients.pop(dsn, None)
    if client is not None:
        client.close()


def migration_files() -> list[Path]:
    return sorted(p for p in MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def split_statements(sql: str) -> list[str]:
    body = re.sub(r"--[^\n]*", "", sql)
    return [s.strip() for s in body.split(";") if s.strip()]


def migrate(client: Any, files: list[Path] | None = None) -> list[str]:
    """Apply the migrations (default: all of deploy/clickhouse) not yet recorded;
    idempotent. Returns the versions applied."""
    client.command(
        f"CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations "
        "(version String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {
        r[0] for r in client.query(f"SELECT version FROM {DATABASE}.schema_migrations").result_rows
    }
    applied = []
    for path in migration_files() if files is None else files:
        version = path.stem
        if version in done:
            continue
        for statement in split_statements(path.read_text()):
            client.command(statement)  # the client's database is streambill
        client.insert(f"{DATABASE}.schema_migrations", [[version]], column_names=["version"])
        applied.append(version)
        log.info("migration applied", version=version)
    return applied


def open_warehouse(settings: Settings) -> Any:
    client = connect(settings.warehouse_dsn)
    migrate(client)
    return client


# --- the query endpoint of the warehouse-owning process -------------------------------


def endpoint_file(settings: Settings) -> Path:
    return settings.home / "warehouse.endpoint"


def run_query(client: Any, sql: str) -> dict[str, Any]:
    result = client.query(sql)
    rows = [[_readable(v) for v in r] for r in result.result_rows]
    return {"columns": list(result.column_names), "rows": rows}


def _readable(value: Any) -> Any:
    """Raw bytes (e.g. a dead letter's original value) as text, escaped where not UTF-8."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def as_text(value: Any) -> str:
    """A value as a person or a spreadsheet reads it: decimals in plain notation at their
    column's scale (str() of a Decimal(38, 9) zero is '0E-9'), NULL as nothing."""
    if value is None:
        return ""
    return format(value, "f") if isinstance(value, Decimal) else str(value)


class QueryError(ValueError):
    """The warehouse refused a query (its SQL, not its availability), in one line."""


def _one_line(exc: Exception) -> str:
    """ClickHouse's message without the driver's `FORMAT Native` suffix it quotes, nor the
    list of every token a syntax error could have had, on one line."""
    text = re.sub(r"\s+FORMAT Native\b", "", str(exc))
    text = re.sub(r" Expected one of: .*?(?= \(\w+\)$)", "", text, flags=re.S)
    return " ".join(text.split())


class QueryServer:
    """HTTP endpoint answering SQL for other processes while this one owns chDB."""

    def __init__(self, client: Any, settings: Settings, port: int = 0) -> None:
        self.client = client
        self.settings = settings
        self.lock = threading.Lock()
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                sql = self.rfile.read(length).decode()
                try:
                    with server_self.lock:
                        payload = run_query(server_self.client, sql)
                    body, status = json.dumps(payload, default=as_text).encode(), 200
                except Exception as exc:
                    body, status = json.dumps({"error": _one_line(exc)}).encode(), 400
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # structured logs only
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> QueryServer:
        self.thread.start()
        endpoint_file(self.settings).parent.mkdir(parents=True, exist_ok=True)
        endpoint_file(self.settings).write_text(json.dumps({"url": self.url, "pid": os.getpid()}))
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        try:
            if json.loads(endpoint_file(self.settings).read_text())["pid"] == os.getpid():
                endpoint_file(self.settings).unlink()
        except (OSError, ValueError, KeyError):
            pass


def _live_endpoint(settings: Settings) -> str | None:
    try:
        info = json.loads(endpoint_file(settings).read_text())
        os.kill(info["pid"], 0)
        return info["url"]
    except (OSError, ValueError, KeyError):
        return None


class WarehouseUnavailable(RuntimeError):
    pass


# errors that mean "the warehouse is not there now", not "this data is wrong": retry later
WAREHOUSE_DOWN = (WarehouseUnavailable, OperationalError)


def query(
    settings: Settings, sql: str, timeout: float = 60.0, open_here: bool = True
) -> dict[str, Any]:
    """Run SQL wherever the warehouse is: a server DSN, the owning process, or chDB here
    (unless ``open_here`` is false: a long-running process must not take the embedded
    warehouse from the sink)."""
    dsn = settings.warehouse_dsn
    if dsn.startswith("chdb://"):
        url = _live_endpoint(settings)
        if url:
            request = urllib.request.Request(url, data=sql.encode(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                raise QueryError(json.loads(exc.read()).get("error", str(exc))) from None
            except OSError as exc:
                raise WarehouseUnavailable(f"warehouse endpoint {url}: {exc}") from exc
        if not open_here:
            raise WarehouseUnavailable("the embedded warehouse has no running sink to ask")
    client = open_warehouse(settings)
    try:
        return run_query(client, sql)
    except OperationalError:
        raise  # the server went away: WAREHOUSE_DOWN, not the query's fault
    except DatabaseError as exc:
        raise QueryError(_one_line(exc)) from None
