"""The refund workflow of the priority lane on the real broker, chDB and the simulator:
refunds, entitlement deactivations, every kind of bad request, and duplicates."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from streams.codec import codec
from streams.config import Settings
from streams.domain.payments import parse_schedule
from streams.kafka import clients
from streams.kafka.topics import ENTITLEMENTS, REFUND_RESULTS, REFUNDS
from streams.payments.http_gateway import fetch_ledger
from streams.payments.reconcile import collect, reconcile
from streams.publish import read_topic
from streams.stack import ProcessorProcess
from tests.integration.helpers import Procs, scalar, start_sink, wait_until
from tests.integration.test_payments import (
    gateway_env,
    invoice,
    publish_invoices,
    start_payments,
)

pytestmark = pytest.mark.kafka


def start_refunds(settings: Settings, bootstrap: str, url: str) -> ProcessorProcess:
    return ProcessorProcess(settings, bootstrap, "lane", "priority", env=gateway_env(url)).start()


def request(refund_id: str, inv: dict, amount: str, currency: str = "USD") -> dict:
    return {"refund_id": refund_id, "invoice_id": inv["invoice_id"],
            "account_id": inv["account_id"], "amount": Decimal(amount), "currency": currency,
            "reason": "customer asked", "deactivate": True,
            "requested_at": datetime.now(UTC)}  # fmt: skip


def test_refunds_deactivate_entitlements_and_refuse_bad_requests(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, simulator: Any
) -> None:
    settings = pipeline_env
    sink = procs.add(start_sink(settings, kafka_bootstrap))
    payer = procs.add(start_payments(settings, kafka_bootstrap, simulator.url, "1d"))
    a, b, c = (invoice(i, f"tok_ok_{i}", "40.00") for i in range(3))
    unpaid = invoice(3, "tok_decline_3", "40.00")
    publish_invoices(settings, kafka_bootstrap, [a, b, c, unpaid])
    wait_until(lambda: scalar(settings, "SELECT count() FROM payment_attempts FINAL") >= 4,
               60, "payments", [sink, payer])  # fmt: skip
    refunds = procs.add(start_refunds(settings, kafka_bootstrap, simulator.url))

    requests = [
        request("r-full", a, "40.00"),
        request("r-full", a, "40.00"),  # the same request again
        request("r-part-1", b, "15.00"),
        request("r-part-2", b, "25.00"),  # exactly what is left
        request("r-part-3", b, "0.01"),  # nothing left
        request("r-over", c, "40.01"),
        request("r-currency", c, "1.00", currency="EUR"),
        request("r-zero", c, "0.00"),
        request("r-unpaid", unpaid, "1.00"),
        request("r-unknown", {"invoice_id": "inv-nope", "account_id": "acct-00000"}, "1.00"),
    ]
    producer = clients.producer(settings, kafka_bootstrap)
    encode = codec(REFUNDS.schema).encode
    for r in requests:
        producer.produce(REFUNDS.name, key=r["account_id"].encode(), value=encode(r))
        producer.flush()  # in order: the duplicate comes after the first
        time.sleep(0.05)

    def results() -> list[dict]:
        return read_topic(settings, kafka_bootstrap, REFUND_RESULTS)

    wait_until(lambda: len(results()) >= len(requests), 60, "refund results",
               [sink, payer, refunds])  # fmt: skip
    got = {}
    for r in results():
        got.setdefault(r["refund_id"], []).append((r["status"], r["reason"]))
    assert got == {
        "r-full": [("refunded", None)] * 2,  # the first result, returned again
        "r-part-1": [("refunded", None)],
        "r-part-2": [("refunded", None)],
        "r-part-3": [("rejected", "amount_exceeds_paid")],
        "r-over": [("rejected", "amount_exceeds_paid")],
        "r-currency": [("rejected", "currency_mismatch")],
        "r-zero": [("rejected", "amount_not_positive")],
        "r-unpaid": [("rejected", "invoice_not_paid")],
        "r-unknown": [("rejected", "unknown_invoice")],
    }
    entitlements = read_topic(settings, kafka_bootstrap, ENTITLEMENTS)
    assert sorted((e["subscription_id"], e["action"], e["cause"]) for e in entitlements) == [
        ("sub-00000", "deactivate", "refund:r-full"),
        ("sub-00001", "deactivate", "refund:r-part-1"),
        ("sub-00001", "deactivate", "refund:r-part-2"),
    ]
    ledger = asyncio.run(fetch_ledger(simulator.url))
    refunded = [(e["invoice_id"], e["amount"]) for e in ledger
                if e["kind"] == "refund" and e["status"] == "refunded"]  # fmt: skip
    assert sorted(refunded) == [("inv-00000", "40.00"), ("inv-00001", "15.00"),
                                ("inv-00001", "25.00")]  # fmt: skip
    landed = "SELECT count() FROM refunds FINAL"
    wait_until(lambda: scalar(settings, landed) == 9, 30, "refunds in ClickHouse", [sink])
    # the reason given with each request lands beside the outcome's own reason
    assert scalar(settings, "SELECT countIf(refund_reason = 'customer asked') "
                            "FROM refunds FINAL") == 9  # fmt: skip
    # refunds within what was charged, charges of the amounts due
    report = reconcile(*collect(settings, kafka_bootstrap, simulator.url),
                       schedule=parse_schedule("1d"))  # fmt: skip
    assert report.reconciled, report.differences[:10]
    assert report.invoices == {"paid": 3, "open": 1}
    assert scalar(settings, "SELECT count() FROM entitlements FINAL") == 3
    assert refunds.alive
