"""Alerting end to end: a real fault (the rating processor stopped while subscriptions
keep coming, so its consumer lag grows) fires the lag rule; restarting rating resolves
it. A local webhook receiver that fails its first call checks that each notification
is retried and arrives once; both land in ClickHouse."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from streams.config import Settings
from streams.kafka.topics import SUBSCRIPTIONS
from streams.stack import ProcessorProcess, free_port
from tests.integration.helpers import Procs, scalar, start_rating, start_sink, wait_until
from tests.integration.test_lanes import event, produce

pytestmark = pytest.mark.kafka


class Receiver:
    """A webhook receiver on loopback; its first request of each path gets a 500."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, list[Any]] = {"/json": [], "/slack": []}
        self.failed: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, request: web.Request) -> web.Response:
        if request.path not in self.failed:
            self.failed.add(request.path)
            return web.Response(status=500)
        self.received[request.path].append(orjson.loads(await request.read()))
        return web.Response(status=204)

    def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/json", self.handle)
        app.router.add_post("/slack", self.handle)
        runner = self.runner = web.AppRunner(app)

        async def setup() -> None:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()

        self.thread.start()
        asyncio.run_coroutine_threadsafe(setup(), self.loop).result(10)
        return self


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    asyncio.run_coroutine_threadsafe(r.runner.cleanup(), r.loop).result(10)
    r.loop.call_soon_threadsafe(r.loop.stop)


def test_a_lag_fault_fires_once_and_resolves_once(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, receiver: Receiver,
    tmp_path: Path,
) -> None:  # fmt: skip
    settings = pipeline_env
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "evaluate_every: 1s\nrules:\n"
        "  - {name: rating_lag, source: lag, group: streambill-rating, above: 20, for: 2s,"
        " summary: rating is behind}\n"
    )
    hooks = (
        f"json:http://127.0.0.1:{receiver.port}/json,slack:http://127.0.0.1:{receiver.port}/slack"
    )
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    rating = start_rating(settings, kafka_bootstrap)
    alerts = procs.add(ProcessorProcess(settings, kafka_bootstrap, "alerts", "--rules",
                                        str(rules), "--webhooks", hooks).start())  # fmt: skip
    produce(settings, kafka_bootstrap, SUBSCRIPTIONS,
            [event("created", "e-0", "acct-0", "sub-0", plan_id="pro-usd")])  # fmt: skip
    wait_until(lambda: scalar(settings, "SELECT count() FROM invoices") == 1, 60,
               "rating running", [rating, sink])  # fmt: skip

    rating.stop()  # the fault: rating is down while subscriptions keep coming
    produce(settings, kafka_bootstrap, SUBSCRIPTIONS,
            [event("created", f"e-{i}", f"acct-{i}", f"sub-{i}", plan_id="pro-usd")
             for i in range(1, 61)])  # fmt: skip
    wait_until(lambda: receiver.received["/json"], 60, "the firing notification", [alerts])
    (fired,) = receiver.received["/json"]
    assert fired["state"] == "firing" and fired["rule"] == "rating_lag"
    assert fired["value"] >= 60 - 1 and fired["threshold"] == 20

    rating = procs.add(start_rating(settings, kafka_bootstrap))  # repaired
    wait_until(lambda: len(receiver.received["/json"]) == 2, 90, "the resolution",
               [alerts, rating])  # fmt: skip
    assert [n["state"] for n in receiver.received["/json"]] == ["firing", "resolved"]
    wait_until(lambda: len(receiver.received["/slack"]) == 2, 30, "slack notifications")
    assert receiver.received["/slack"][0]["text"].startswith(":red_circle: FIRING rating_lag")
    assert receiver.failed == {"/json", "/slack"}  # each receiver failed once: retried

    landed = "SELECT groupArray(state) FROM (SELECT state FROM alerts FINAL ORDER BY at)"
    wait_until(lambda: scalar(settings, landed) == ["firing", "resolved"], 60,
               "the alerts in ClickHouse", [sink])  # fmt: skip
    assert alerts.alive
    # nothing is notified twice: a few more evaluations change nothing
    wait_until(lambda: scalar(settings, "SELECT count() FROM invoices") == 61, 60, "rated")
    assert len(receiver.received["/json"]) == 2


def test_a_payment_run_that_will_miss_its_deadline_alerts_while_in_flight(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, receiver: Receiver,
    tmp_path: Path,
) -> None:  # fmt: skip
    """400 invoices held until a payment run, a gateway slowed to about 20 charges a
    second, and a deadline 8 s after the run is issued: the run's measured pace projects
    a finish past the deadline, so the shipped rule run_deadline_at_risk fires while the
    run is still in flight (its webhook arrives once, the receiver's first try failing),
    and resolves once the run is over."""
    import subprocess
    import sys
    from datetime import UTC, datetime, timedelta

    import yaml

    from streams.config import DEPLOY_DIR
    from tests.integration.test_payments import (
        invoice,
        publish_invoices,
        slowed_gateway,
        start_payments,
    )

    settings = pipeline_env
    shipped = yaml.safe_load((DEPLOY_DIR / "alerts" / "rules.yaml").read_text())["rules"]
    (rule,) = [r for r in shipped if r["name"] == "run_deadline_at_risk"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"evaluate_every": "1s", "rules": [rule]}))
    sim = slowed_gateway(settings, latency_ms=200, seed=1)
    try:
        sink = procs.add(start_sink(settings, kafka_bootstrap))
        payer = procs.add(start_payments(settings, kafka_bootstrap, sim.url, "1d"))
        alerts = procs.add(ProcessorProcess(settings, kafka_bootstrap, "alerts", "--rules",
                                            str(rules), "--webhooks",
                                            f"json:http://127.0.0.1:{receiver.port}/json"
                                            ).start())  # fmt: skip
        tomorrow = datetime.now(UTC) + timedelta(days=1)  # held until the payment run
        publish_invoices(
            settings,
            kafka_bootstrap,
            [{**invoice(i, f"tok_ok_{i}"), "issued_at": tomorrow} for i in range(400)],
        )
        wait_until(lambda: scalar(settings, "SELECT count() FROM invoices FINAL") == 400, 60,
                   "the invoices landed", [sink, payer])  # fmt: skip
        until = (tomorrow + timedelta(hours=1)).isoformat()
        deadline = (datetime.now(UTC) + timedelta(seconds=8)).isoformat()
        log = (tmp_path / "run.out").open("w+")
        run = subprocess.Popen([sys.executable, "-m", "streams.cli", "payment-run", "--until",
                                until, "--deadline", deadline, "--timeout", "120"],
                               stdout=log, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        wait_until(lambda: receiver.received["/json"], 60, "the firing notification", [alerts])
        assert run.poll() is None, "the alert came after the run ended"
        # the dashboard's view of it, from the run's own metrics endpoint
        from streams.ops.dashboard import runs_in_flight

        (shown,) = runs_in_flight(settings)
        assert shown["kind"] == "payment-run" and shown["margin_s"] < 0 < shown["eta_s"]
        (fired,) = receiver.received["/json"]
        assert fired["rule"] == "run_deadline_at_risk" and fired["state"] == "firing"
        assert fired["value"] is None or fired["value"] < 0  # (None: -inf, no progress yet)
        assert run.wait(timeout=120) == 0, (tmp_path / "run.out").read_text()
        assert "will miss its deadline" in (tmp_path / "run.out").read_text()  # its own log
        wait_until(lambda: len(receiver.received["/json"]) == 2, 30, "the resolution", [alerts])
        assert [n["state"] for n in receiver.received["/json"]] == ["firing", "resolved"]
        assert receiver.failed == {"/json"}  # the first try failed: retried, arrived once
        assert payer.alive and alerts.alive
    finally:
        sim.stop()
