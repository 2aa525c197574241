"""The health dashboard in headless Chromium (Debian's package, installed by
scripts/bootstrap) against a running stack: API -> rating -> payments (simulator) ->
refund through the priority lane -> sink. The figures the page shows must equal what
ClickHouse, Kafka and the API's own metrics say; a screenshot is saved."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from streams import metrics
from streams.config import REPO_ROOT, Settings
from streams.kafka.lag import group_lags
from streams.stack import ProcessorProcess, free_port, start_api
from tests.integration.helpers import Procs, scalar, start_rating, start_sink, wait_until
from tests.integration.test_api import ACME, signup, write_tenants
from tests.integration.test_payments import gateway_env, start_payments

pytestmark = pytest.mark.kafka
SCREENSHOT = REPO_ROOT / ".streambill" / "screenshots" / "dashboard.png"
CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--virtual-time-budget=10000"]  # fmt: skip


def browser() -> str:
    found = shutil.which("chromium")
    assert found, "chromium is installed by scripts/bootstrap (Debian package)"
    return found


def rendered_dom(url: str, profile: Path) -> str:
    """The page as Chromium rendered it (scripts run)."""
    command = [browser(), *CHROMIUM, f"--user-data-dir={profile}", "--dump-dom", url]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-loaded="true"' in dom, dom[-2000:]
    return dom


def figures_shown(dom: str) -> dict[str, str]:
    """data-figure name -> text."""
    return dict(re.findall(r'data-figure="(\w+)">([^<]*)<', dom))


def rendered(url: str, profile: Path) -> dict[str, str]:
    return figures_shown(rendered_dom(url, profile))


def refund_a_paid_invoice(
    settings: Settings, api: requests.Session, base: str, sink: ProcessorProcess
) -> None:
    """A refund of 1.00 on an invoice the stack has paid, through the API, landed."""
    paid = scalar(settings, "SELECT invoice_id FROM payment_attempts FINAL LIMIT 1")
    refund = {"refund_id": "r-1", "invoice_id": paid, "account_id": "acme-1",
              "amount": "1.00", "currency": "USD"}  # fmt: skip
    assert api.post(f"{base}/v1/refunds", json=refund).status_code == 202
    wait_until(lambda: scalar(settings, "SELECT count() FROM refunds FINAL") == 1, 60,
               "the refund", [sink])  # fmt: skip


def start_billing_stack(
    settings: Settings, bootstrap: str, procs: Procs, gateway_url: str
) -> tuple[ProcessorProcess, int]:
    """Sink, rating, payments, the priority lane and the API (tenants acme and globex):
    returns the sink and the API's port."""
    write_tenants(settings)
    sink = procs.add(start_sink(settings, bootstrap))
    procs.add(start_rating(settings, bootstrap))
    procs.add(start_payments(settings, bootstrap, gateway_url, "1d"))
    procs.add(ProcessorProcess(settings, bootstrap, "lane", "priority",
                               env=gateway_env(gateway_url)).start())  # fmt: skip
    api_proc, api_port = start_api(settings, bootstrap)
    procs.add(api_proc)
    return sink, api_port


def api_requests_now(settings: Settings) -> float:
    return sum(s.value for s in metrics.scrape(settings, "api")
               if s.name == "streambill_api_requests_total")  # fmt: skip


def test_the_dashboard_shows_what_the_warehouse_and_kafka_say(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, simulator: Any, tmp_path: Path
) -> None:
    settings = pipeline_env
    sink, api_port = start_billing_stack(settings, kafka_bootstrap, procs, simulator.url)
    port = free_port()
    dash = procs.add(ProcessorProcess(settings, kafka_bootstrap, "dashboard", "--port",
                                      str(port), top_level=True).start())  # fmt: skip
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {ACME}"
    base = f"http://127.0.0.1:{api_port}"
    for n in range(6):
        r = api.post(f"{base}/v1/subscriptions", json=signup(n, payment_method=f"tok_ok_{n}"))
        assert r.status_code == 202, r.text
    assert api.post(f"{base}/v1/subscriptions", json={"type": "nope"}).status_code == 422
    usage = {"event_id": "u-late", "timestamp": "2001-01-01T00:00:00Z", "account_id": "acme-1",
             "subscription_id": "acme-1-s404", "metric": "api_calls", "quantity": "1"}  # fmt: skip
    assert api.post(f"{base}/v1/usage", json={"events": [usage]}).status_code == 202
    paid_sql = "SELECT count() FROM payment_attempts FINAL WHERE status = 'succeeded'"
    wait_until(lambda: scalar(settings, paid_sql) >= 6, 90, "6 payments", [sink])
    refund_a_paid_invoice(settings, api, base, sink)
    wait_until(lambda: scalar(settings, "SELECT count() FROM dead_letters FINAL") >= 1, 60,
               "the late usage's dead letter", [sink])  # fmt: skip
    time.sleep(12)  # the dashboard samples the API every 5 s; nothing moves meanwhile

    dom = rendered_dom(f"http://127.0.0.1:{port}/", tmp_path / "profile")
    shown = figures_shown(dom)
    assert dash.alive, dash.tail()
    # all of it happened within minutes: the page opens on the range that shows it
    assert shown["range"] == "15 min", shown["range"]
    window = "INTERVAL 15 MINUTE"
    expect = {
        "invoices": scalar(settings, "SELECT uniqExact(invoice_id) FROM invoices "
                           f"WHERE _landed_at >= now() - {window}"),
        "payments": scalar(settings, "SELECT uniqExact(payment_id) FROM payment_attempts "
                           f"WHERE completed_at >= now() - {window}"),
        "refunds": 1,
        "refund_p99_ms": scalar(settings, "SELECT dateDiff('millisecond', requested_at, "
                                "completed_at) FROM refunds FINAL"),
        "dead_letters": scalar(settings, "SELECT count() FROM dead_letters FINAL"),
        "api_requests": int(api_requests_now(settings)),
        "lag_groups": len({r.group for r in group_lags(settings, kafka_bootstrap)}),
    }  # fmt: skip
    assert expect["invoices"] >= 6 and expect["payments"] >= 6 and expect["dead_letters"] >= 1
    for name, value in expect.items():
        assert shown[name] == f"{int(value):,}", (name, shown[name], value)
    assert shown["payment_success_rate"] == "100.0 %"
    assert int(shown["api_refused_4xx"]) >= 1 and shown["api_errors_5xx"] == "0"
    # every group, one row each, worst first; caught up, each has nothing left to read
    # (the commit markers of the rating processor's transactions are not records)
    lags = group_lags(settings, kafka_bootstrap)
    groups = sorted({r.group for r in lags})
    assert len(groups) >= 3 and sum(r.lag for r in lags) == 0, lags
    assert re.findall(r'<details data-group="([^"]+)" data-lag="(\d+)"', dom) == [
        (g, "0") for g in groups
    ]
    # the load calendar: the 6 subscriptions' next period end (a month after their
    # creation, 10 days ago), a payment each
    next_end = scalar(settings, "SELECT toString(toDate(min(due_at))) FROM upcoming_invoices")
    assert re.search(rf"<tr><td>{next_end}</td><td>USD</td><td class=\"n\">6</td>"
                     r"<td class=\"n\">6</td><td class=\"n\">0</td></tr>", dom), dom  # fmt: skip
    # a range chosen in the address is the one shown
    shown = rendered(f"http://127.0.0.1:{port}/#minutes=1440", tmp_path / "profile-24h")
    assert shown["range"] == "24 h" and shown["invoices"] == f"{int(expect['invoices']):,}"

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser(), *CHROMIUM, f"--user-data-dir={tmp_path / 'shot'}",
                    "--window-size=1400,1500", f"--screenshot={SCREENSHOT}",
                    f"http://127.0.0.1:{port}/"],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert SCREENSHOT.stat().st_size > 20_000
