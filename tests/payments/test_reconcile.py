"""Reconciliation on hand-made sources: agreement, and each kind of difference found."""

from __future__ import annotations

import copy
from decimal import Decimal

from streams.domain.payments import idempotency_key, payment_id
from streams.payments.reconcile import reconcile


def charge(inv: str, attempt: int, status: str, amount: str = "10.00", n: int = 0) -> dict:
    return {"kind": "charge", "id": f"ch_{inv}_{attempt}_{n}", "merchant_account": "m1",
            "idempotency_key": idempotency_key(inv, attempt), "invoice_id": inv,
            "amount": amount, "currency": "EUR", "status": status}  # fmt: skip


def result(inv: str, attempt: int, status: str, amount: str = "10.00") -> dict:
    pid = f"{inv}:uncollectible" if status == "uncollectible" else payment_id(inv, attempt)
    return {"payment_id": pid, "invoice_id": inv, "attempt": attempt, "status": status,
            "amount": Decimal(amount), "currency": "EUR"}  # fmt: skip


def sources() -> tuple[list, list, list]:
    ledger = [charge("a", 1, "succeeded"), charge("b", 1, "declined"),
              charge("b", 2, "succeeded"), charge("c", 1, "declined"),
              charge("d", 1, "declined"), charge("d", 2, "declined")]  # fmt: skip
    results = [result("a", 1, "succeeded"), result("b", 1, "declined"),
               result("b", 2, "succeeded"), result("c", 1, "declined"),
               result("d", 1, "declined"), result("d", 2, "declined"),
               result("d", 2, "uncollectible"),
               result("a", 1, "succeeded")]  # a replayed attempt publishes twice  # fmt: skip
    warehouse = [
        dict(r, amount=str(r["amount"])) for r in {r["payment_id"]: r for r in results}.values()
    ]
    return ledger, results, warehouse


def test_consistent_sources_reconcile() -> None:
    report = reconcile(*sources())
    assert report.reconciled, report.differences
    assert report.invoices == {"paid": 2, "open": 1, "uncollectible": 1}
    assert report.totals == {"EUR": dict.fromkeys(("gateway", "results", "warehouse"),
                                                  Decimal("20.00"))}  # fmt: skip
    assert report.double_charges == 0


def kinds(report) -> set[str]:
    return {d["kind"] for d in report.differences}


def test_a_double_charge_is_found() -> None:
    ledger, results, warehouse = sources()
    ledger.append(charge("a", 2, "succeeded", n=1))  # a second attempt charged again
    report = reconcile(ledger, results, warehouse)
    assert report.double_charges == 1
    assert {"double_charge", "gateway_charge_without_result", "totals_differ"} <= kinds(report)


def test_a_charge_nobody_published_is_found() -> None:
    ledger, results, warehouse = sources()
    ledger.append(charge("c", 2, "succeeded"))
    assert "gateway_charge_without_result" in kinds(reconcile(ledger, results, warehouse))


def test_a_result_without_a_charge_and_a_wrong_amount_are_found() -> None:
    ledger, results, warehouse = sources()
    results.append(result("e", 1, "succeeded"))
    warehouse.append(dict(result("e", 1, "succeeded"), amount="10.00"))
    ledger[0] = charge("a", 1, "succeeded", amount="10.01")
    found = kinds(reconcile(ledger, results, warehouse))
    assert {"result_without_gateway_charge", "amount_mismatch"} <= found


def test_warehouse_gaps_are_found() -> None:
    ledger, results, warehouse = sources()
    missing = copy.deepcopy(warehouse)
    missing.pop(0)
    assert "missing_in_warehouse" in kinds(reconcile(ledger, results, missing))
    changed = copy.deepcopy(warehouse)
    changed[1]["status"] = "succeeded"
    assert "warehouse_differs" in kinds(reconcile(ledger, results, changed))
    extra = [*warehouse, dict(warehouse[0], payment_id="zzz:1")]
    assert "warehouse_row_without_result" in kinds(reconcile(ledger, results, extra))


def test_uncollectible_but_charged_is_found() -> None:
    ledger, results, warehouse = sources()
    ledger.append(charge("d", 3, "succeeded"))
    assert "uncollectible_but_charged" in kinds(reconcile(ledger, results, warehouse))
