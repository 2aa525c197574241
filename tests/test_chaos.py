"""The chaos suite's judge: clean evidence passes, and each kind of broken promise is
caught by the invariant that names it (so a green chaos run means something)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.chaos import Evidence, judge


def clean(n: int = 4) -> Evidence:
    expected = {f"inv-{i}": Decimal(f"{i}.50") for i in range(n)}
    ledger = [
        {"kind": "charge", "invoice_id": f"inv-{i}", "idempotency_key": f"inv-{i}:1",
         "status": "succeeded", "amount": str(expected[f"inv-{i}"])}
        for i in range(n)
    ]  # fmt: skip
    if n:
        ledger.append({"kind": "refund", "invoice_id": "inv-0", "idempotency_key": "r0",
                       "status": "refunded", "amount": str(expected["inv-0"])})  # fmt: skip
    return Evidence(
        expected=expected,
        warehouse_invoices=(n, n, sum(expected.values(), Decimal(0))),
        kafka_invoices=list(expected.items()),
        ledger=ledger,
        warehouse_attempts=(n, n),
        payable=n,
        settled=n,
        settled_in_time=True,
        reconciled=True,
        unplanned_exits=0,
        # refund 0 in full (asked twice), refund 1 refused: more than was paid
        refund_requests={"r0", "r1"},
        refund_results=[("r0", "refunded"), ("r1", "rejected"), ("r0", "refunded")],
        refunds_deactivated={"r0"},
        warehouse_refunds=(2, 2),
    )


def broken(verdict: dict[str, bool]) -> set[str]:
    return {name for name, ok in verdict.items() if not ok}


@given(st.integers(min_value=0, max_value=50))
def test_clean_evidence_holds_every_invariant(n: int) -> None:
    assert broken(judge(clean(n))) == set()


def test_each_broken_promise_is_named() -> None:
    e = clean()
    first = e.kafka_invoices[0]
    cases = {
        # an invoice published twice on Kafka (a transaction not fenced)
        "one_invoice_per_period": [
            replace(e, kafka_invoices=[*e.kafka_invoices, first]),
            replace(e, kafka_invoices=e.kafka_invoices[1:]),  # one lost
            replace(e, warehouse_invoices=(3, 3, e.warehouse_invoices[2])),  # not landed
            replace(e, kafka_invoices=[*e.kafka_invoices[1:], ("inv-x", first[1])]),
        ],
        "totals_match_offline_rater": [
            replace(e, kafka_invoices=[(first[0], first[1] + 1), *e.kafka_invoices[1:]]),
            replace(e, warehouse_invoices=(4, 4, e.warehouse_invoices[2] - 1)),
        ],
        "at_most_one_charge_per_invoice": [
            replace(e, ledger=[*e.ledger, {**e.ledger[0], "idempotency_key": "inv-0:2"}]),
            replace(e, ledger=[*e.ledger, {**e.ledger[1], "status": "declined"}]),  # key reused
        ],
        "refunds_answered_once": [
            replace(e, refund_results=e.refund_results[:1]),  # r1 never answered
            replace(e, refund_results=[*e.refund_results, ("r0", "rejected")]),  # 2 answers
            replace(e, refunds_deactivated=set()),  # refunded, still entitled
            replace(e, ledger=[*e.ledger, {**e.ledger[-1], "idempotency_key": "r2"}]),
        ],
        "one_row_per_id": [
            replace(e, warehouse_attempts=(5, 4)),
            replace(e, warehouse_refunds=(3, 2)),
            replace(e, warehouse_refunds=(1, 1)),
        ],
        "none_left_open": [replace(e, settled=3)],
        "reconciled": [replace(e, reconciled=False)],
        "settled_in_time": [replace(e, settled_in_time=False)],
        "no_processor_died_unasked": [replace(e, unplanned_exits=1)],
    }
    assert set(cases) == set(judge(e)), "every invariant has a forged failure"
    for name, forged in cases.items():
        for evidence in forged:
            assert name in broken(judge(evidence)), (name, evidence)


@pytest.mark.parametrize("extra", ["declined", "failed"])
def test_declines_and_failures_next_to_one_success_are_not_double_charges(extra: str) -> None:
    e = clean()
    retry = {**e.ledger[0], "idempotency_key": "inv-0:0", "status": extra}
    assert broken(judge(replace(e, ledger=[retry, *e.ledger]))) == set()
