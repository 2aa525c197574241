"""Reconciliation on hand-made sources: agreement, and each kind of difference found."""

from __future__ import annotations

import copy
from datetime import timedelta
from decimal import Decimal

import pytest

from streams.domain.payments import idempotency_key, payment_id
from streams.payments.http_gateway import decline_code_for
from streams.payments.reconcile import Report, reconcile

SCHEDULE = (timedelta(days=1), timedelta(days=3))  # attempts 1, 2, 3, then uncollectible
RATES = {"m1": 0.0}  # tok_ok_* always succeeds, tok_decline_* always declines
DUE = {"a": "10.00", "b": "12.50", "c": "7.00", "d": "30.00"}
TOKENS = {"a": "tok_ok_a", "b": "tok_ok_b", "c": "tok_decline_c", "d": "tok_decline_d"}


def charge(inv: str, attempt: int, status: str, amount: str | None = None, n: int = 0) -> dict:
    return {"kind": "charge", "id": f"ch_{inv}_{attempt}_{n}", "merchant_account": "m1",
            "idempotency_key": idempotency_key(inv, attempt), "invoice_id": inv,
            "amount": amount or DUE[inv], "currency": "EUR", "status": status,
            "decline_code": "insufficient_funds" if status == "declined" else None,
            "payment_method": TOKENS[inv]}  # fmt: skip


def refund(inv: str, charge_id: str, amount: str, n: int = 0) -> dict:
    return {"kind": "refund", "id": f"re_{inv}_{n}", "merchant_account": "m1",
            "idempotency_key": f"streambill-refund:{inv}-{n}", "invoice_id": inv,
            "amount": amount, "currency": "EUR", "status": "refunded", "reason": None,
            "charge_id": charge_id}  # fmt: skip


def result(inv: str, attempt: int, status: str, amount: str | None = None) -> dict:
    pid = f"{inv}:uncollectible" if status == "uncollectible" else payment_id(inv, attempt)
    return {"payment_id": pid, "invoice_id": inv, "attempt": attempt, "status": status,
            "amount": Decimal(amount or DUE[inv]), "currency": "EUR"}  # fmt: skip


def invoices() -> list[dict]:
    return [{"invoice_id": i, "amount_due": t, "currency": "EUR", "payment_method": TOKENS[i]}
            for i, t in DUE.items()]  # fmt: skip


def sources() -> tuple[list, list, list, list, dict]:
    """a and b paid at once, c declined once (open, dunning waits), d declined at every
    attempt the schedule allows and written off; a refunded in part."""
    ledger = [charge("a", 1, "succeeded"), charge("b", 1, "succeeded"),
              charge("c", 1, "declined"), charge("d", 1, "declined"),
              charge("d", 2, "declined"), charge("d", 3, "declined"),
              refund("a", "ch_a_1_0", "4.00"), refund("a", "ch_a_1_0", "6.00", n=1)]  # fmt: skip
    results = [result("a", 1, "succeeded"), result("b", 1, "succeeded"),
               result("c", 1, "declined"), result("d", 1, "declined"),
               result("d", 2, "declined"), result("d", 3, "declined"),
               result("d", 3, "uncollectible"),
               result("a", 1, "succeeded")]  # a replayed attempt publishes twice  # fmt: skip
    warehouse = [
        dict(r, amount=str(r["amount"])) for r in {r["payment_id"]: r for r in results}.values()
    ]
    return ledger, results, warehouse, invoices(), dict(RATES)


def run(*parts: object) -> Report:
    return reconcile(*parts, schedule=SCHEDULE)  # type: ignore[arg-type]


def kinds(report: Report) -> set[str]:
    return {d["kind"] for d in report.differences}


def test_consistent_sources_reconcile() -> None:
    report = run(*sources())
    assert report.reconciled, report.differences
    assert report.invoices == {"paid": 2, "open": 1, "uncollectible": 1}
    assert report.totals == {"EUR": dict.fromkeys(("gateway", "results", "warehouse"),
                                                  Decimal("22.50"))}  # fmt: skip
    assert report.double_charges == 0


def test_declines_decided_by_hashed_tokens_reconcile() -> None:
    """With a decline rate, each token's answer is the simulator's function of it."""
    ledger, results, warehouse, invs, _ = sources()
    rates = {"m1": 0.5}
    ok = next(t for t in (f"tok_{i}" for i in range(100)) if decline_code_for(t, 0.5) is None)
    bad = next(t for t in (f"tok_{i}" for i in range(100)) if decline_code_for(t, 0.5))
    for rows in (ledger, invs):
        for row in rows:
            if row.get("payment_method") in ("tok_ok_a", "tok_ok_b"):
                row["payment_method"] = ok
            elif row.get("payment_method", "").startswith("tok_decline"):
                row["payment_method"] = bad
    for e in ledger:
        if e.get("status") == "declined":
            e["decline_code"] = decline_code_for(bad, 0.5)
    assert run(ledger, results, warehouse, invs, rates).reconciled
    ledger[2]["decline_code"] = next(c for c in ("card_declined", "expired_card",
                                                 "insufficient_funds")
                                     if c != decline_code_for(bad, 0.5))  # fmt: skip
    assert kinds(run(ledger, results, warehouse, invs, rates)) == {"decline_the_token_does_not_get"}


def test_a_double_charge_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    ledger.append(charge("a", 2, "succeeded", n=1))  # a second attempt charged again
    report = run(ledger, results, warehouse, invs, rates)
    assert report.double_charges == 1
    assert {"double_charge", "gateway_charge_without_result", "totals_differ"} <= kinds(report)


def test_a_charge_nobody_published_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    ledger.append(charge("b", 2, "succeeded"))
    assert "gateway_charge_without_result" in kinds(run(ledger, results, warehouse, invs, rates))


def test_a_result_without_a_charge_and_a_wrong_amount_are_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    results.append(result("b", 2, "succeeded"))
    warehouse.append(dict(result("b", 2, "succeeded"), amount="12.50"))
    ledger[0] = charge("a", 1, "succeeded", amount="10.01")
    found = kinds(run(ledger, results, warehouse, invs, rates))
    assert {"result_without_gateway_charge", "amount_mismatch"} <= found


def test_warehouse_gaps_are_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    missing = copy.deepcopy(warehouse)
    missing.pop(0)
    assert "missing_in_warehouse" in kinds(run(ledger, results, missing, invs, rates))
    changed = copy.deepcopy(warehouse)
    changed[2]["status"] = "succeeded"
    assert "warehouse_differs" in kinds(run(ledger, results, changed, invs, rates))
    extra = [*warehouse, dict(warehouse[0], payment_id="zzz:1")]
    assert "warehouse_row_without_result" in kinds(run(ledger, results, extra, invs, rates))


def test_uncollectible_but_charged_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    ledger.append(charge("d", 4, "succeeded"))
    assert "uncollectible_but_charged" in kinds(run(ledger, results, warehouse, invs, rates))


# --- against what was due -------------------------------------------------------------


def test_a_charge_of_another_amount_than_due_is_found() -> None:
    """Ledger, results and warehouse agree with each other, on the wrong amount."""
    ledger, results, warehouse, invs, rates = sources()
    ledger[1] = charge("b", 1, "succeeded", amount="12.51")
    results[1] = result("b", 1, "succeeded", amount="12.51")
    warehouse[1] = dict(results[1], amount="12.51")
    report = run(ledger, results, warehouse, invs, rates)
    assert kinds(report) == {"amount_not_due"}
    assert {d.get("charge") or d.get("payment_id") for d in report.differences} == {
        "ch_b_1_0", "b:1"
    }  # fmt: skip


def test_a_declined_charge_of_another_amount_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    ledger[2] = charge("c", 1, "declined", amount="70.00")
    assert "amount_not_due" in kinds(run(ledger, results, warehouse, invs, rates))


def test_another_currency_card_or_invoice_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    invs[1] = dict(invs[1], currency="USD")
    assert "amount_not_due" in kinds(run(ledger, results, warehouse, invs, rates))
    ledger, results, warehouse, invs, rates = sources()
    ledger[0]["payment_method"] = "tok_ok_someone_else"
    assert kinds(run(ledger, results, warehouse, invs, rates)) == {"charged_another_card"}
    assert "unknown_invoice" in kinds(run(ledger, results, warehouse, invs[1:], rates))


def test_an_over_refund_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    ledger.append(refund("a", "ch_a_1_0", "0.01", n=2))  # 4.00 + 6.00 + 0.01 of 10.00
    report = run(ledger, results, warehouse, invs, rates)
    assert kinds(report) == {"refunded_more_than_charged"}
    assert {d.get("charge") or d.get("invoice_id") for d in report.differences} == {
        "ch_a_1_0", "a"
    }  # fmt: skip


def test_a_refund_of_a_declined_charge_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    ledger.append(refund("c", "ch_c_1_0", "1.00"))
    found = kinds(run(ledger, results, warehouse, invs, rates))
    assert {"refund_of_no_such_charge", "refunded_more_than_charged"} == found


def test_an_uncollectible_after_one_decline_is_found() -> None:
    """Dunning that writes an invoice off after its first decline."""
    ledger, results, warehouse, invs, rates = sources()
    results.append(result("c", 1, "uncollectible"))
    warehouse.append(dict(result("c", 1, "uncollectible"), amount="7.00"))
    report = run(ledger, results, warehouse, invs, rates)
    assert kinds(report) == {"uncollectible_not_justified"}
    assert report.differences[0]["attempts"] == [(1, "declined")]


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_an_uncollectible_with_an_attempt_not_declined_is_found(attempt: int) -> None:
    """Each attempt must be a decline the gateway recorded: not a failure, not missing."""
    ledger, results, warehouse, invs, rates = sources()
    index = 2 + attempt
    results[index] = dict(results[index], status="failed")
    warehouse = [dict(r, amount=str(r["amount"])) for r in results[:-1]]
    ledger = [e for e in ledger if e["idempotency_key"] != idempotency_key("d", attempt)]
    assert "uncollectible_not_justified" in kinds(run(ledger, results, warehouse, invs, rates))


def test_an_attempt_beyond_the_schedule_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    ledger.append(charge("d", 4, "declined"))
    results.append(result("d", 4, "declined"))
    warehouse.append(dict(result("d", 4, "declined"), amount="30.00"))
    assert "attempt_beyond_dunning" in kinds(run(ledger, results, warehouse, invs, rates))


def test_a_decline_the_token_does_not_produce_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    for rows in (ledger, invs):  # c's card is one that always succeeds
        for row in rows:
            if row["invoice_id"] == "c" and row.get("kind", "charge") == "charge":
                row["payment_method"] = "tok_ok_c"
    assert kinds(run(ledger, results, warehouse, invs, rates)) == {"decline_the_token_does_not_get"}


def test_a_success_the_token_does_not_produce_is_found() -> None:
    ledger, results, warehouse, invs, rates = sources()
    for rows in (ledger, invs):
        for row in rows:
            if row["invoice_id"] == "b" and row.get("kind", "charge") == "charge":
                row["payment_method"] = "tok_decline_b"
    assert kinds(run(ledger, results, warehouse, invs, rates)) == {"success_the_token_does_not_get"}
    assert "outcome_unpredictable" in kinds(run(ledger, results, warehouse, invs, {}))
