"""The ingestion API as a real process on the real broker, with the sink and the rating
processor behind it: authentication, tenancy, validation, idempotency, limits, Kafka
down, and an invoice read back from the warehouse."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import requests

from streams.api.tenants import Tenant, hash_key, save
from streams.config import Settings
from streams.kafka.topics import CANCELLATIONS, REFUNDS, SUBSCRIPTIONS, USAGE
from streams.publish import read_topic
from streams.stack import ProcessorProcess, start_api
from tests.integration.helpers import Procs, scalar, start_rating, start_sink, wait_until

pytestmark = pytest.mark.kafka
ACME, GLOBEX = "sb_acme_test-key", "sb_globex_test-key"
AGO = (datetime.now(UTC) - timedelta(days=10)).replace(microsecond=0)


def write_tenants(settings: Settings, acme_limits: tuple[int, float] = (64, 1000)) -> None:
    save(settings.home / "api" / "tenants.json", {
        "acme": Tenant("acme", "acme-", [hash_key(ACME)], *acme_limits),
        "globex": Tenant("globex", "globex-", [hash_key(GLOBEX)]),
    })  # fmt: skip


class Client:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = requests.Session()

    def post(self, path: str, body: Any, key: str | None = ACME, **headers: str) -> Any:
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return self.session.post(self.base + path, json=body, headers=headers, timeout=10)

    def get(self, path: str, key: str | None = ACME) -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.session.get(self.base + path, headers=headers, timeout=10)


def signup(n: int, account: str = "acme-1", **over: Any) -> dict[str, Any]:
    return {"type": "subscription.created", "account_id": account,
            "subscription_id": f"{account}-s{n}", "plan_id": "pro-usd",
            "payment_method": "tok_ok_1", "timestamp": AGO.isoformat(), **over}  # fmt: skip


@pytest.fixture
def api(pipeline_env: Settings, kafka_bootstrap: str, procs: Procs) -> Iterator[Client]:
    write_tenants(pipeline_env)
    proc, port = start_api(pipeline_env, kafka_bootstrap)
    procs.add(proc)
    yield Client(port)
    assert proc.alive, proc.tail()


def test_requests_are_checked_before_anything_is_written(api: Client, pipeline_env: Settings,
                                                         kafka_bootstrap: str) -> None:  # fmt: skip
    assert api.get("/healthz", key=None).status_code == 200
    assert api.get("/readyz", key=None).json() == {"status": "ready"}
    assert api.get("/openapi.json", key=None).json()["openapi"] == "3.1.0"
    r = api.post("/v1/subscriptions", signup(1), key=None)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.post("/v1/subscriptions", signup(1), key="sb_acme_wrong").status_code == 401
    r = api.post("/v1/subscriptions", signup(1, account="globex-1"))
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = api.session.post(api.base + "/v1/subscriptions", data=b"type=created",
                         headers={"Authorization": f"Bearer {ACME}",
                                  "Content-Type": "text/plain"})  # fmt: skip
    assert r.status_code == 415
    r = api.session.post(api.base + "/v1/subscriptions", data=b'{"type": ',
                         headers={"Authorization": f"Bearer {ACME}",
                                  "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    r = api.post("/v1/usage", {"events": [{"event_id": "x" * 200}] * 6000})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r = api.post("/v1/subscriptions", {**signup(1), "colour": "red", "plan_id": "gold"})
    assert r.status_code == 422 and r.json()["errors"] == ["colour: unknown field"]
    r = api.post("/v1/subscriptions", signup(1, plan_id="gold"))
    assert r.json()["errors"] == ["plan_id: unknown plan 'gold'"]
    assert api.get("/v1/nothing").status_code == 404
    assert read_topic(pipeline_env, kafka_bootstrap, SUBSCRIPTIONS) == []


def test_writes_are_durable_idempotent_and_routed(api: Client, pipeline_env: Settings,
                                                  kafka_bootstrap: str) -> None:  # fmt: skip
    first = api.post("/v1/subscriptions", signup(1), **{"Idempotency-Key": "k-1"})
    assert first.status_code == 202, first.text
    again = api.post("/v1/subscriptions", signup(1), **{"Idempotency-Key": "k-1"})
    assert (again.status_code, again.json()) == (202, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    reused = api.post("/v1/subscriptions", signup(2), **{"Idempotency-Key": "k-1"})
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"
    events = read_topic(pipeline_env, kafka_bootstrap, SUBSCRIPTIONS)
    assert [e["event_id"] for e in events] == [first.json()["event_id"]]
    assert first.json()["offset"] == 0 and first.json()["topic"] == SUBSCRIPTIONS.name

    cancel = {"type": "subscription.cancelled", "account_id": "acme-1",
              "subscription_id": "acme-1-s1", "mode": "immediate"}  # fmt: skip
    assert api.post("/v1/subscriptions", cancel).json()["topic"] == CANCELLATIONS.name
    assert len(read_topic(pipeline_env, kafka_bootstrap, CANCELLATIONS)) == 1

    usage = {"event_id": "u-1", "timestamp": AGO.isoformat(), "account_id": "acme-1",
             "subscription_id": "acme-1-s1", "metric": "api_calls", "quantity": "3"}  # fmt: skip
    batch = [usage, {**usage, "event_id": "u-2", "quantity": "-1"},
             {**usage, "event_id": "u-3", "unit": "calls"}]  # fmt: skip
    r = api.post("/v1/usage", {"events": batch})
    assert r.status_code == 207
    assert [(i["index"], i["status"]) for i in r.json()["items"]] == [
        (0, "accepted"), (1, "rejected"), (2, "rejected")]  # fmt: skip
    assert r.json()["items"][1]["errors"] == ["quantity: must not be negative"]
    foreign = api.post("/v1/usage", {"events": [{**usage, "event_id": "u-4"},
                                                {**usage, "account_id": "globex-1"}]})  # fmt: skip
    assert foreign.status_code == 403  # and nothing of that batch was written:
    assert [e["event_id"] for e in read_topic(pipeline_env, kafka_bootstrap, USAGE)] == ["u-1"]

    refund = {"refund_id": "r-1", "invoice_id": "inv-1", "account_id": "acme-1",
              "amount": "5.00", "currency": "USD"}  # fmt: skip
    assert api.post("/v1/refunds", refund).status_code == 202
    (landed,) = read_topic(pipeline_env, kafka_bootstrap, REFUNDS)
    assert landed["refund_id"] == "r-1" and landed["deactivate"] is True
    assert "streambill_api_requests_total" in api.get("/metrics", key=None).text


def test_an_invoice_reads_back_for_its_tenant_only(
    api: Client, pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    procs.add(start_rating(pipeline_env, kafka_bootstrap))
    sink = procs.add(start_sink(pipeline_env, kafka_bootstrap))
    assert api.post("/v1/subscriptions", signup(7)).status_code == 202
    wait_until(lambda: scalar(pipeline_env, "SELECT count() FROM invoices") >= 1, 60,
               "the creation invoice", [sink])  # fmt: skip
    invoice_id = scalar(pipeline_env, "SELECT invoice_id FROM invoices")
    r = api.get(f"/v1/invoices/{invoice_id}")
    assert r.status_code == 200, r.text
    invoice = r.json()
    assert invoice["account_id"] == "acme-1" and invoice["subscription_id"] == "acme-1-s7"
    assert invoice["issued_at"] == AGO.isoformat().replace("+00:00", "Z")
    stored = Decimal(scalar(pipeline_env, "SELECT toString(total) FROM invoices"))
    assert invoice["total"] == f"{stored:.2f}" and stored > 0  # USD: two digits
    assert [line["kind"] for line in invoice["lines"]] == ["flat"]
    assert api.get(f"/v1/invoices/{invoice_id}", key=GLOBEX).status_code == 403
    assert api.get("/v1/invoices/inv-unknown").status_code == 404


def test_over_the_limit_is_refused_at_once_and_limits_change_live(
    api: Client, pipeline_env: Settings
) -> None:
    write_tenants(pipeline_env, acme_limits=(64, 1))  # one request a second
    time.sleep(1.5)  # the API re-reads the file within a second
    codes = []
    for n in range(5):
        started = time.perf_counter()
        r = api.post("/v1/subscriptions", signup(n))
        codes.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert time.perf_counter() - started < 0.1  # refused fast, never a time-out
    assert codes.count(202) == 1 and codes.count(429) == 4
    # globex is not affected by acme's limit
    assert api.post("/v1/subscriptions", signup(1, account="globex-1"), key=GLOBEX).ok


def test_kafka_down_means_503_with_retry_after_never_a_hang(
    pipeline_env: Settings, procs: Procs
) -> None:
    write_tenants(pipeline_env)
    env = {"STREAMBILL_API_KAFKA_TIMEOUT": "1"}
    proc, port = start_api(pipeline_env, "127.0.0.1:1", env=env)  # nothing listens there
    procs.add(proc)
    api = Client(port)
    for _ in range(3):
        started = time.perf_counter()
        r = api.post("/v1/subscriptions", signup(1))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert time.perf_counter() - started < 2.5
    assert api.get("/readyz", key=None).status_code == 503
    assert proc.alive


def test_the_api_process_stops_gracefully(pipeline_env: Settings, kafka_bootstrap: str) -> None:
    write_tenants(pipeline_env)
    proc, _ = start_api(pipeline_env, kafka_bootstrap)
    assert isinstance(proc, ProcessorProcess) and proc.stop() == 0
