"""Refund rules (streams.domain.refunds): the partition's ledger and the refusal of a
refund request."""

from __future__ import annotations

import gc
from decimal import Decimal
from typing import Any

import pytest

from streams.domain.cancellations import Subscription, SubscriptionBook
from streams.domain.refunds import Paid, RefundLedger, refund_idempotency_key, refund_refusal

D = Decimal


def ledger() -> RefundLedger:
    book = RefundLedger()
    book.record_paid("inv-1", Paid("ch_1", "merchant-1", D("30.00"), "EUR"))
    book.subscription_of.update({"inv-1": "sub-1", "inv-2": "sub-1"})  # inv-2: billed, unpaid
    return book


def request(invoice: str = "inv-1", amount: str = "10.00", currency: str = "EUR") -> dict:
    return {"refund_id": "r-1", "invoice_id": invoice, "account_id": "acct-1",
            "amount": D(amount), "currency": currency}  # fmt: skip


def result(refund_id: str, status: str, amount: str, invoice: str = "inv-1") -> dict[str, Any]:
    return {"refund_id": refund_id, "invoice_id": invoice, "status": status,
            "amount": D(amount)}  # fmt: skip


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (request(), None),
        (request(amount="30.00"), None),  # all of it
        (request(amount="30.01"), "amount_exceeds_paid"),
        (request(amount="0"), "amount_not_positive"),
        (request(amount="-1"), "amount_not_positive"),
        (request(currency="USD"), "currency_mismatch"),
        (request(invoice="inv-2"), "invoice_not_paid"),
        (request(invoice="inv-x"), "unknown_invoice"),
    ],
)
def test_refund_refusal(req: dict, reason: str | None) -> None:
    assert refund_refusal(ledger(), req) == reason


def test_what_was_refunded_already_is_not_refundable_again() -> None:
    book = ledger()
    book.record_result(result("r-0", "refunded", "25.00"))
    assert refund_refusal(book, request(amount="5.00")) is None
    assert refund_refusal(book, request(amount="5.01")) == "amount_exceeds_paid"


def test_the_first_result_of_a_refund_id_counts_and_a_rejection_refunds_nothing() -> None:
    book = ledger()
    book.record_result(result("r-1", "refunded", "10.00"))
    book.record_result(result("r-1", "refunded", "10.00"))  # the same result read again
    book.record_result(result("r-1", "rejected", "99.00"))
    book.record_result(result("r-2", "rejected", "5.00"))
    assert book.refunded["inv-1"] == D("10.00")
    assert book.results["r-1"]["status"] == "refunded"
    assert book.results["r-2"]["status"] == "rejected"


def test_the_gateway_key_is_the_refund_id() -> None:
    assert refund_idempotency_key("r-1") == "streambill-refund:r-1"
    assert refund_idempotency_key("r-1") != refund_idempotency_key("r-2")


def test_the_history_a_lane_keeps_is_invisible_to_the_cyclic_collector() -> None:
    """Millions of paid invoices and subscriptions live in a lane's memory; if the garbage
    collector had to walk them, each full collection would pause urgent requests."""
    refunds, subscriptions = RefundLedger(), SubscriptionBook()
    for i in range(1000):
        refunds.record_paid(f"inv-{i}", Paid(f"ch_{i}", "merchant-1", D("9.90"), "EUR"))
        subscriptions.record(f"sub-{i}", Subscription(f"acct-{i}"))
    cancelled = subscriptions.get("sub-1")._replace(cancelled_by="e-1")  # type: ignore[union-attr]
    subscriptions.record("sub-1", cancelled)
    gc.collect()
    entries = [*refunds.paid.values(), *subscriptions.known.values()]
    assert len(entries) == 2000 and not any(gc.is_tracked(e) for e in entries)
    # ... and read back as what they are
    assert refunds.paid_for("inv-7") == Paid("ch_7", "merchant-1", D("9.90"), "EUR")
    assert subscriptions.get("sub-1") == Subscription("acct-1", "e-1")
    assert refunds.paid_for("inv-x") is None and subscriptions.get("sub-x") is None
