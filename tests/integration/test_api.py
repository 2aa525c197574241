"""The ingestion API as a real process on the real broker, with the sink and the rating
processor behind it: authentication, tenancy, validation, idempotency, limits, Kafka
down, and an invoice read back from the warehouse."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import requests

from streams.api.server import KAFKA_DOWN_MESSAGE
from streams.api.tenants import Tenant, hash_key, save
from streams.config import Settings
from streams.domain.events import CouponApplied, CreditGranted, CustomerUpdated
from streams.invoice_record import INVOICE_FIELDS, LINE_FIELDS, PRIVATE_FIELDS
from streams.kafka import clients
from streams.kafka.topics import (
    CANCELLATIONS,
    CUSTOMERS,
    PAYMENT_RESULTS,
    REFUND_RESULTS,
    REFUNDS,
    SUBSCRIPTIONS,
    USAGE,
    TopicSpec,
)
from streams.publish import publish, read_topic
from streams.rating_records import decode_input
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
    # access is deactivated only when asked; the reason travels with the request
    assert landed["refund_id"] == "r-1" and landed["deactivate"] is False
    assert landed["reason"] is None
    asked = {**refund, "refund_id": "r-2", "reason": "goodwill", "deactivate": True}
    assert api.post("/v1/refunds", asked).status_code == 202
    second = read_topic(pipeline_env, kafka_bootstrap, REFUNDS)[1]
    assert (second["reason"], second["deactivate"]) == ("goodwill", True)
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
    # the public shape: the record's fields less the private ones (streams/invoice_record.py)
    assert tuple(invoice) == tuple(f for f in INVOICE_FIELDS if f not in PRIVATE_FIELDS)
    assert tuple(invoice["lines"][0]) == LINE_FIELDS
    # another tenant's invoice is not found, as if it did not exist: nothing names acme
    foreign = api.get(f"/v1/invoices/{invoice_id}", key=GLOBEX)
    assert foreign.status_code == 404 and "acme" not in foreign.text
    unknown = api.get("/v1/invoices/inv-unknown")
    assert (unknown.status_code, unknown.json()) == (404, foreign.json())

    # its document: HTML (suffix, or Accept), PDF; the customer record on it once given
    put = api.session.put(api.base + "/v1/customers/acme-1", json={
        "name": "Acme Ltd", "address": "1 Main Street\nSpringfield", "country": "DE",
    }, headers={"Authorization": f"Bearer {ACME}"}, timeout=10)  # fmt: skip
    assert put.status_code == 202
    wait_until(lambda: api.get("/v1/customers/acme-1").status_code == 200, 60, "the customer")
    total_de = f"{stored:.2f}".replace(".", ",") + "\xa0$"  # de_DE: 12,50 $
    html = api.get(f"/v1/invoices/{invoice_id}.html")
    assert html.status_code == 200 and html.headers["Content-Type"].startswith("text/html")
    assert "Acme Ltd" in html.text and "Springfield" in html.text and total_de in html.text
    by_accept = api.session.get(api.base + f"/v1/invoices/{invoice_id}", timeout=30, headers={
        "Authorization": f"Bearer {ACME}", "Accept": "application/pdf"})  # fmt: skip
    assert by_accept.headers["Content-Type"] == "application/pdf"
    assert by_accept.content.startswith(b"%PDF-")
    text = subprocess.run(["pdftotext", "-layout", "-", "-"], input=by_accept.content, check=True,
                          capture_output=True).stdout.decode()  # fmt: skip
    # (pdftotext gives the no-break space as a space)
    assert "Acme Ltd" in text and invoice_id in text and total_de.replace("\xa0", " ") in text
    assert api.get(f"/v1/invoices/{invoice_id}.pdf", key=GLOBEX).status_code == 404
    # the same document from the command line
    run = subprocess.run([sys.executable, "-m", "streams.cli", "invoice", "render", invoice_id],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Acme Ltd" in run.stdout and total_de in run.stdout


def usage_event(event_id: str, account: str = "acme-1", sub: str = "acme-1-s1",
                **over: Any) -> dict[str, Any]:  # fmt: skip
    return {"event_id": event_id, "timestamp": (AGO + timedelta(hours=1)).isoformat(),
            "account_id": account, "subscription_id": sub, "metric": "api_calls",
            "quantity": "3", **over}  # fmt: skip


def test_what_is_certain_to_be_refused_is_refused_at_once(
    api: Client, pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    assert api.post("/v1/subscriptions", signup(1)).status_code == 202  # pro-usd, monthly
    batch = [
        usage_event("u-ok"),
        usage_event("u-metric", metric="cpu_hours"),  # no plan bills it
        usage_event("u-foreign", account="acme-2"),  # acme-1-s1 is acme-1's
        usage_event("u-unknown", account="acme-2", sub="acme-2-s9"),  # not seen: accepted
        usage_event("u-bad", quantity="-1"),
    ]
    r = api.post("/v1/usage", {"events": batch})
    assert r.status_code == 207, r.text
    assert [(i["event_id"], i["status"], i.get("errors")) for i in r.json()["items"]] == [
        ("u-ok", "accepted", None),
        ("u-metric", "rejected", ["metric: no plan of the catalog bills 'cpu_hours'"]),
        ("u-foreign", "rejected",
         ["subscription_id: 'acme-1-s1' is not a subscription of account 'acme-2'"]),
        ("u-unknown", "accepted", None),
        ("u-bad", "rejected", ["quantity: must not be negative"]),  # echoes its event_id
    ]  # fmt: skip
    written = [e["event_id"] for e in read_topic(pipeline_env, kafka_bootstrap, USAGE)]
    assert sorted(written) == ["u-ok", "u-unknown"]

    change = {"type": "subscription.plan_changed", "account_id": "acme-1",
              "subscription_id": "acme-1-s1",
              "timestamp": (AGO + timedelta(hours=2)).isoformat()}  # fmt: skip
    for plan, error in [
        ("starter-eur", "plan_id: a change to another currency (USD -> EUR)"),
        ("scale-usd-yearly", "plan_id: a change to another interval (month -> year)"),
        ("pro-usd", "plan_id: the subscription is already on plan 'pro-usd'"),
    ]:
        r = api.post("/v1/subscriptions", {**change, "plan_id": plan})
        assert (r.status_code, r.json()["errors"]) == (422, [error])
    cancel = {"type": "subscription.cancelled", "account_id": "acme-2",
              "subscription_id": "acme-1-s1", "mode": "immediate"}  # fmt: skip
    r = api.post("/v1/subscriptions", cancel)
    assert r.status_code == 422 and "'acme-1-s1' is not a subscription" in r.json()["errors"][0]
    # a subscription whose creation the API has not seen may still be on its way: accepted
    unseen = {**change, "subscription_id": "acme-1-s2", "plan_id": "starter-eur"}
    assert api.post("/v1/subscriptions", unseen).status_code == 202
    subscription_events = read_topic(pipeline_env, kafka_bootstrap, SUBSCRIPTIONS)
    assert [e["subscription_id"] for e in subscription_events] == ["acme-1-s1", "acme-1-s2"]
    assert read_topic(pipeline_env, kafka_bootstrap, CANCELLATIONS) == []


def test_events_invoices_subscriptions_and_refunds_read_back_per_tenant(
    api: Client, pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    rating = procs.add(start_rating(settings, kafka_bootstrap))
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    at = {n: (AGO + timedelta(minutes=n)).isoformat() for n in range(10)}
    assert api.post("/v1/subscriptions", signup(1, timestamp=at[1])).status_code == 202
    assert api.post("/v1/subscriptions", signup(1, account="acme-2", timestamp=at[2])).ok
    assert api.post("/v1/subscriptions", signup(1, account="globex-1", timestamp=at[3]),
                    key=GLOBEX).ok  # fmt: skip
    # created around the API (a bulk publish): the API does not know acme-1-s8
    producer = clients.producer(settings, kafka_bootstrap)
    direct = signup(8, timestamp=at[4], event_id="e-direct", mode=None)
    direct["timestamp"] = AGO + timedelta(minutes=4)
    publish(producer, SUBSCRIPTIONS, [direct])
    sent = [usage_event("u-ok"), usage_event("u-ok"),  # the same event twice: one counts
            usage_event("u-foreign", account="acme-2", sub="acme-1-s8"),
            usage_event("u-nobody", sub="acme-1-s404")]  # fmt: skip
    for event in sent:
        assert api.post("/v1/usage", {"events": [event]}).status_code == 202

    def status(event_id: str, key: str = ACME) -> Any:
        return api.get(f"/v1/events/{event_id}", key=key)

    wait_until(lambda: status("u-ok").ok and status("u-ok").json()["status"] == "applied"
               and status("u-nobody").ok and status("u-foreign").ok, 60,
               "the events' fates", [rating, sink])  # fmt: skip
    ok = status("u-ok").json()
    assert [c["status"] for c in ok["copies"]] == ["applied", "ignored_repeat"]
    nobody = status("u-nobody").json()
    assert nobody["status"] == "dead_lettered"
    assert (nobody["copies"][0]["reason"], nobody["copies"][0]["detail"]) == (
        "rejected", "unknown subscription")  # fmt: skip
    foreign = status("u-foreign").json()["copies"][0]
    assert foreign["status"] == "dead_lettered" and foreign["reason"] == "account_mismatch"
    assert "belongs to another account than 'acme-2'" in foreign["detail"]
    assert status("u-ok", key=GLOBEX).status_code == 404  # another tenant's event
    assert status("u-never-sent").status_code == 404

    sub = api.get("/v1/subscriptions/acme-1-s1").json()
    assert sub == {"subscription_id": "acme-1-s1", "account_id": "acme-1", "plan_id": "pro-usd",
                   "currency": "USD", "interval": "month", "status": "active",
                   "created_at": at[1].replace("+00:00", "Z"), "cancelled_at": None,
                   "updated_at": at[1].replace("+00:00", "Z")}  # fmt: skip
    assert api.get("/v1/subscriptions/acme-1-s1", key=GLOBEX).status_code == 404
    assert api.get("/v1/subscriptions/acme-1-s404").status_code == 404

    # invoices: one per creation; acme-1-s1's paid, acme-1-s8's uncollectible
    wait_until(lambda: scalar(settings, "SELECT count() FROM invoices") >= 4, 60,
               "the creation invoices", [rating, sink])  # fmt: skip
    ids = dict(query_rows(settings, "SELECT subscription_id, invoice_id FROM invoices FINAL"))
    outcomes = [("acme-1-s1", "succeeded"), ("acme-1-s8", "declined"),
                ("acme-1-s8", "uncollectible")]  # fmt: skip
    publish(producer, PAYMENT_RESULTS, [
        {"payment_id": f"p-{n}", "invoice_id": ids[sub_id], "account_id": "acme-1",
         "attempt": n, "status": outcome, "amount": Decimal("10"), "currency": "USD",
         "gateway_account": "merchant-1", "gateway_reference": None, "decline_code": None,
         "latency_ms": 1.0, "completed_at": datetime.now(UTC)}
        for n, (sub_id, outcome) in enumerate(outcomes)
    ])  # fmt: skip
    wait_until(lambda: scalar(settings, "SELECT count() FROM payment_attempts") >= 3, 60,
               "the payment results", [sink])  # fmt: skip

    def listed(query: str, key: str = ACME) -> list[tuple[str, str]]:
        r = api.get(f"/v1/invoices{query}", key=key)
        assert r.status_code == 200, r.text
        return [(i["subscription_id"], i["status"]) for i in r.json()["invoices"]]

    everything = [("acme-1-s1", "paid"), ("acme-2-s1", "open"), ("acme-1-s8", "uncollectible")]
    assert listed("") == everything  # oldest first; globex's is not there
    first = api.get("/v1/invoices?limit=2").json()
    assert [i["subscription_id"] for i in first["invoices"]] == ["acme-1-s1", "acme-2-s1"]
    stored = scalar(settings, f"SELECT toString(total) FROM invoices WHERE invoice_id = "
                              f"'{ids['acme-1-s1']}'")  # fmt: skip
    assert first["invoices"][0]["total"] == f"{Decimal(stored):.2f}"  # USD: two digits
    rest = api.get(f"/v1/invoices?limit=2&cursor={first['next_cursor']}").json()
    assert [i["subscription_id"] for i in rest["invoices"]] == ["acme-1-s8"]
    assert rest["next_cursor"] is None
    assert listed("?status=paid") == [("acme-1-s1", "paid")]
    assert listed("?status=open&account=acme-2") == [("acme-2-s1", "open")]
    stamp = at[2].replace("+00:00", "Z")
    assert listed(f"?from={stamp}") == everything[1:]
    assert listed(f"?to={stamp}") == everything[:1]
    assert listed("", key=GLOBEX) == [("globex-1-s1", "open")]
    assert api.get("/v1/invoices?account=globex-1").status_code == 404
    bad = api.get("/v1/invoices?limit=0&status=late&cursor=nope&colour=red")
    assert bad.status_code == 422 and len(bad.json()["errors"]) == 4

    # a refund's result, with the reason given with its request
    publish(producer, REFUND_RESULTS, [
        {"refund_id": "r-1", "invoice_id": ids["acme-1-s1"], "account_id": "acme-1",
         "status": "refunded", "amount": Decimal("2.5"), "currency": "USD", "reason": None,
         "gateway_reference": "gw-1", "refund_reason": "goodwill", "requested_at": AGO,
         "completed_at": AGO}])  # fmt: skip
    wait_until(lambda: api.get("/v1/refunds/r-1").ok, 60, "the refund", [sink])
    refund = api.get("/v1/refunds/r-1").json()
    assert (refund["status"], refund["amount"], refund["reason"]) == ("refunded", "2.50",
                                                                      "goodwill")  # fmt: skip
    assert refund["rejection_reason"] is None
    assert api.get("/v1/refunds/r-1", key=GLOBEX).status_code == 404

    # landed, but the rating processor has not passed it (it is stopped): not applied
    assert rating.stop() == 0
    assert api.post("/v1/usage", {"events": [usage_event("u-late")]}).status_code == 202
    wait_until(lambda: status("u-late").ok, 60, "u-late landed", [sink])
    late = status("u-late").json()
    assert (late["status"], [c["status"] for c in late["copies"]]) == ("pending", ["pending"])


def raw_records(
    settings: Settings, bootstrap: str, topic: TopicSpec
) -> list[tuple[bytes, bytes, int]]:
    """(key, value, Kafka timestamp in ms) of every record of a topic, by partition and
    offset."""
    from confluent_kafka import KafkaError, TopicPartition

    from streams.kafka.topics import group_id
    from streams.publish import partition_count

    consumer = clients.consumer(settings, bootstrap, group_id(f"raw-{uuid.uuid4().hex}"),
                                **{"enable.partition.eof": True})  # fmt: skip
    out = []
    try:
        n = partition_count(consumer, topic.name)
        consumer.assign([TopicPartition(topic.name, p, 0) for p in range(n)])
        at_end: set[int] = set()
        while len(at_end) < n:
            for msg in consumer.consume(1000, timeout=1.0):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition())
                    continue
                out.append((msg.partition(), msg.offset(), msg.key(), msg.value(),
                            msg.timestamp()[1]))  # fmt: skip
    finally:
        consumer.close()
    return [(k, v, ts) for _, _, k, v, ts in sorted(out, key=lambda r: r[:2])]


def test_version_2_events_credits_and_properties_reach_rating_s_topics(
    api: Client, pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    """Pauses, resumes and coupons go with the subscription's other events, credits are
    granted on their own route, usage carries its properties: each lands on its topic,
    keyed by the account, as the record rating's version-2 decoding reads as the event."""
    assert api.post("/v1/subscriptions", signup(1)).status_code == 202
    sub = {"account_id": "acme-1", "subscription_id": "acme-1-s1"}
    at = {n: (AGO + timedelta(hours=n)).isoformat() for n in range(1, 6)}
    coupon = {**sub, "type": "coupon.applied", "coupon_id": "half", "percent_off": "50",
              "duration": "repeating", "periods": 2, "timestamp": at[1]}  # fmt: skip
    for body in (coupon, {**sub, "type": "subscription.paused", "timestamp": at[2]},
                 {**sub, "type": "subscription.resumed", "timestamp": at[3]}):  # fmt: skip
        r = api.post("/v1/subscriptions", body)
        assert r.status_code == 202 and r.json()["topic"] == SUBSCRIPTIONS.name, r.text
    r = api.post("/v1/subscriptions", {**coupon, "percent_off": "150", "amount_off": "5"})
    assert r.status_code == 422 and r.json()["errors"] == [
        "percent_off: exactly one of percent_off and amount_off"]  # fmt: skip
    r = api.post("/v1/subscriptions", {**sub, "type": "subscription.paused", "account_id":
                                       "acme-2"})  # fmt: skip
    assert r.status_code == 422 and "is not a subscription of account" in r.json()["errors"][0]
    r = api.post("/v1/subscriptions", {**sub, "type": "credit.granted"})
    assert r.status_code == 422 and r.json()["errors"][0].startswith("type: one of")

    credit = {"account_id": "acme-1", "currency": "EUR", "amount": "20.00"}
    first = api.post("/v1/credits", credit, **{"Idempotency-Key": "credit-1"})
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["topic"] == SUBSCRIPTIONS.name and body["credit_id"] == body["event_id"]
    again = api.post("/v1/credits", credit, **{"Idempotency-Key": "credit-1"})
    assert (again.status_code, again.json()) == (202, body)  # one credit, however retried
    named = api.post("/v1/credits", {**credit, "currency": "JPY", "amount": "500",
                                     "credit_id": "goodwill-1"})  # fmt: skip
    assert named.status_code == 202 and named.json()["credit_id"] == "goodwill-1"
    refused = api.post("/v1/credits", {**credit, "amount": "20.001", "colour": "red"})
    assert refused.status_code == 422 and refused.json()["errors"] == ["colour: unknown field"]
    refused = api.post("/v1/credits", {**credit, "amount": "20.001"})
    assert refused.json()["errors"] == ["amount: at most 2 decimal places in EUR"]
    refused = api.post("/v1/credits", {**credit, "amount": "0", "currency": "eur"})
    assert refused.json()["errors"] == ["currency: an ISO 4217 code such as EUR",
                                        "amount: must be greater than 0"]  # fmt: skip
    assert api.post("/v1/credits", {**credit, "account_id": "globex-1"}).status_code == 403
    assert api.post("/v1/credits", credit, key=GLOBEX).status_code == 403

    usage = usage_event("u-props", properties={"user": "ann", "seats": 3})
    assert api.post("/v1/usage", {"events": [usage]}).status_code == 202

    records = raw_records(pipeline_env, kafka_bootstrap, SUBSCRIPTIONS)
    assert {key for key, _, _ in records} == {b"acme-1"}
    got = [decode_input(value, False, ts, contract=2) for _, value, ts in records]
    assert [error for _, _, error in got] == [None] * 6
    events = [event for event, _, _ in got]
    assert [type(e).__name__ for e in events] == [
        "SubscriptionCreated", "CouponApplied", "Paused", "Resumed", "CreditGranted",
        "CreditGranted"]  # fmt: skip
    assert events[1] == CouponApplied(AGO + timedelta(hours=1), "acme-1-s1", "half",
                                      Decimal(50), None, "repeating", 2)  # fmt: skip
    assert events[4] == CreditGranted(events[4].timestamp, body["credit_id"], "acme-1",  # type: ignore[union-attr]
                                      "EUR", Decimal("20.00"))  # fmt: skip
    assert events[4].amount.as_tuple().exponent == -2  # type: ignore[union-attr]
    assert events[5].credit_id == "goodwill-1"  # type: ignore[union-attr]
    ((key, value, ts),) = raw_records(pipeline_env, kafka_bootstrap, USAGE)
    event, account, error = decode_input(value, True, ts, contract=2)
    assert error is None and account == "acme-1" and key == b"acme-1"
    assert event.properties == {"user": "ann", "seats": "\x003"}  # type: ignore[union-attr]
    assert decode_input(value, True, ts)[0].properties is None  # type: ignore[union-attr]


def query_rows(settings: Settings, sql: str) -> list[list[Any]]:
    from streams.warehouse import query

    return query(settings, sql)["rows"]


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
        # a fixed message: librdkafka's error text goes to the log, not to the client
        assert r.json() == {"error": "kafka_unavailable", "message": KAFKA_DOWN_MESSAGE,
                            "retry_after": 1}  # fmt: skip
    ready = api.get("/readyz", key=None)
    assert ready.status_code == 503 and "Kafka" not in ready.text
    assert proc.alive


def test_the_api_process_stops_gracefully(pipeline_env: Settings, kafka_bootstrap: str) -> None:
    write_tenants(pipeline_env)
    proc, _ = start_api(pipeline_env, kafka_bootstrap)
    assert isinstance(proc, ProcessorProcess) and proc.stop() == 0


def test_a_customer_record_is_replaced_by_put_and_read_back_per_tenant(
    api: Client, pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    procs.add(start_sink(pipeline_env, kafka_bootstrap))
    path = "/v1/customers/acme-7"
    headers = {"Authorization": f"Bearer {ACME}"}
    put = api.session.put(api.base + path, json={"country": "DE", "grace_hours": 48,
                          "payment_method": "tok_ok_7", "email": "billing@acme.test"},
                          headers=headers, timeout=10)  # fmt: skip
    assert put.status_code == 202, put.text
    assert put.json()["topic"] == CUSTOMERS.name
    assert put.json()["customer"]["grace_hours"] == 48
    # PUT replaces: the fields left out take their defaults
    put = api.session.put(api.base + path, json={"payment_method": "tok_ok_8"},
                          headers=headers, timeout=10)  # fmt: skip
    assert put.status_code == 202
    refused = api.session.put(api.base + path, json={"payment_method": "4242424242424242",
                              "country": "Deutschland"}, headers=headers, timeout=10)  # fmt: skip
    assert refused.status_code == 422
    assert refused.json()["errors"] == [
        "country: an ISO 3166-1 alpha-2 code such as FR",
        "payment_method: card numbers are refused; send a gateway token",
    ]
    foreign = api.session.put(api.base + "/v1/customers/globex-1", json={},
                              headers=headers, timeout=10)  # fmt: skip
    assert foreign.status_code == 403
    on_topic = [r for r in read_topic(pipeline_env, kafka_bootstrap, CUSTOMERS)]
    assert [(r["account_id"], r["payment_method"], r["country"]) for r in on_topic] == [
        ("acme-7", "tok_ok_7", "DE"), ("acme-7", "tok_ok_8", None),
    ]  # fmt: skip
    # each accepted PUT was a customer.updated event for rating first, keyed by the account
    events = raw_records(pipeline_env, kafka_bootstrap, SUBSCRIPTIONS)
    customers = raw_records(pipeline_env, kafka_bootstrap, CUSTOMERS)
    decoded = [decode_input(value, False, ts, contract=2) for _, value, ts in events]
    at, at2 = (c["timestamp"] for c in on_topic)
    assert decoded == [
        (CustomerUpdated(at, "acme-7", "DE", False, 48), "acme-7", None),
        (CustomerUpdated(at2, "acme-7", None, False, 0), "acme-7", None),
    ] and at < at2  # fmt: skip
    assert [key for key, _, _ in events] == [b"acme-7", b"acme-7"]
    assert all(e[2] <= c[2] for e, c in zip(events, customers, strict=True))  # produced first

    def landed() -> bool:
        return api.get(path).status_code == 200 and api.get(path).json()["payment_method"] == \
            "tok_ok_8"  # fmt: skip

    wait_until(landed, 60, "the customer read back")
    got = api.get(path).json()
    assert got | {"updated_at": None} == {
        "account_id": "acme-7", "name": None, "email": None, "address": None,
        "country": None,
        "tax_exempt": False, "grace_hours": 0, "payment_method": "tok_ok_8", "updated_at": None,
    }  # fmt: skip
    assert api.get(path, key=GLOBEX).status_code == 404  # another tenant's customer
    assert api.get("/v1/customers/acme-unknown").status_code == 404
    # the warehouse keeps every version
    assert (
        scalar(pipeline_env, "SELECT count() FROM customers FINAL WHERE account_id = 'acme-7'") == 2
    )
