"""`streambill up`, `status`, `down` on the real broker, with the README's "Run it for
real" steps over the API: a tenant and its key, a subscription paid with the simulator's
test card, usage, the invoice listed and read back; `scale rating 2` beside the stack's
rating worker fences nobody and bills nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.lag import group_members
from streams.kafka.topics import INVOICES, group_id
from streams.processors.rating import GROUP
from streams.stack import free_port, read_stack, running
from streams.testbed.duplicates import topic_copies
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.kafka


def streambill(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ)  # fmt: skip


def call(url: str, key: str, body: dict | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_up_run_it_for_real_status_scale_and_down(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    settings = pipeline_env
    api_port, dashboard_port = free_port(), free_port()
    stack = None
    started = streambill("up", "--api-port", str(api_port), "--dashboard-port",
                         str(dashboard_port))  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr[-4000:]
        stack = read_stack(settings)
        assert stack is not None
        names = [p["name"] for p in stack["processes"]]
        assert sorted(names) == sorted(["gateway", "sink", "rating", "payments", "lane-priority",
                                        "lane-standard", "api", "alerts", "dashboard"])  # fmt: skip
        assert all(running(p) for p in stack["processes"])
        assert "the simulator at" in started.stderr  # no gateway configured: says so
        assert all((settings.home / "logs").glob("*.log"))

        # the same ports: were it not refused, its API could not start and it would stop
        again = streambill("up", "--api-port", str(api_port), "--dashboard-port",
                           str(dashboard_port))  # fmt: skip
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr

        # the README's "Run it for real", through the API
        api = f"http://127.0.0.1:{api_port}"
        tenant = streambill("tenant", "add", "acme", "--account-prefix", "acme-")
        assert tenant.returncode == 0, tenant.stderr
        key = tenant.stdout.strip()

        def subscribe(account: str, plan: str, card: str) -> None:
            status, body = call(f"{api}/v1/subscriptions", key, {
                "type": "subscription.created", "account_id": account,
                "subscription_id": f"{account}-main", "plan_id": plan, "payment_method": card,
            })  # fmt: skip
            assert status == 202, body

        def invoices(account: str) -> list[dict]:
            status, body = call(f"{api}/v1/invoices?account={account}", key)
            assert status == 200, body
            return body["invoices"]

        subscribe("acme-1", "starter-eur", "tok_ok_visa")
        status, body = call(f"{api}/v1/usage", key, {"events": [{
            "event_id": "acme-1-usage-1", "account_id": "acme-1",
            "subscription_id": "acme-1-main", "metric": "api_calls", "quantity": "1200",
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        }]})  # fmt: skip
        assert status == 202, body
        wait_until(lambda: [i["status"] for i in invoices("acme-1")] == ["paid"], 60,
                   "the first invoice, paid")  # fmt: skip
        (first,) = invoices("acme-1")
        status, invoice = call(f"{api}/v1/invoices/{first['invoice_id']}", key)
        assert status == 200 and invoice["total"] == "9.00", invoice
        assert invoice["lines"][0]["charge_id"] == "starter-fee"

        shown = streambill("status", "--json")
        assert shown.returncode == 0, shown.stderr
        lags = {p["name"]: p["lag"] for p in json.loads(shown.stdout)["processes"]}
        assert lags["rating"] == 0 and lags["api"] is None, lags

        # two more rating workers beside the stack's: nobody fenced, each invoice once
        scale = subprocess.Popen([sys.executable, "-m", "streams.cli", "scale", "rating", "2"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env=os.environ)  # fmt: skip
        admin = clients.admin(settings, kafka_bootstrap)

        def members() -> int:
            try:
                return len(group_members(admin, group_id(GROUP)))
            except Exception:  # rebalancing
                return 0

        try:
            wait_until(lambda: members() == 3 or scale.poll() is not None, 60, "3 workers")
            assert scale.poll() is None
            subscribe("acme-2", "pro-usd", "tok_decline_card")  # a rating transaction
            wait_until(lambda: [i["status"] for i in invoices("acme-2")] == ["open"], 60,
                       "the declined card's invoice, open")  # fmt: skip
            time.sleep(2)  # a fenced worker fails at its next transaction: give it one
            assert scale.poll() is None  # none of its workers exited
        finally:
            scale.send_signal(signal.SIGTERM)
            _, scale_err = scale.communicate(timeout=60)
        assert scale.returncode == 0, scale_err[-3000:]
        shown = streambill("status", "--json")
        assert shown.returncode == 0, shown.stdout  # the stack's rating worker still runs
        ids = {i["invoice_id"] for a in ("acme-1", "acme-2") for i in invoices(a)}
        on_topic = topic_copies(settings, kafka_bootstrap, INVOICES, "invoice_id", ids)
        assert on_topic.ok, on_topic.summary()
    finally:
        stopped = streambill("down", "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped 9 process(es)" in stopped.stderr, stopped.stderr
    assert stack is not None and not any(running(p) for p in stack["processes"])
    assert read_stack(settings) is None
    assert streambill("status").returncode == 1
