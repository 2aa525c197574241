"""The chaos suite's judge: clean evidence passes, and each kind of broken promise is
caught by the invariant that names it (so a green chaos run means something)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.testbed.chaos import Evidence, Fault, Outcome, judge, landed
from streams.testbed.duplicates import WarehouseCopies


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
        landing_checks=(
            WarehouseCopies("invoices", n, n, raw_rows=n + 1, conflicting=0),  # a re-landing
            WarehouseCopies("payment_attempts", n, n, raw_rows=n, conflicting=0),
            WarehouseCopies("refunds", 2, 2, raw_rows=2, conflicting=0),
        ),
    )


def broken(verdict: dict[str, bool]) -> set[str]:
    return {name for name, ok in verdict.items() if not ok}


@given(st.integers(min_value=0, max_value=50))
def test_clean_evidence_holds_every_invariant(n: int) -> None:
    assert broken(judge(clean(n))) == set()


def test_each_broken_promise_is_named() -> None:
    e = clean()
    first = e.kafka_invoices[0]
    checks = e.landing_checks
    overcharged = {**e.ledger[0], "amount": str(first[1] + Decimal("0.01"))}
    declined_for_less = {**e.ledger[1], "idempotency_key": "inv-1:0", "status": "declined",
                         "amount": "0.01"}  # fmt: skip
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
        # what streams.testbed.duplicates finds (tested on the real engine there)
        "one_row_per_id": [
            replace(e, landing_checks=(*checks[:2], replace(checks[2], conflicting=1))),
            replace(e, landing_checks=(replace(checks[0], final_rows=5), *checks[1:])),
            replace(
                e,
                landing_checks=(
                    replace(checks[0], wrong_amounts={"inv-0": (Decimal(1), Decimal(2))}),
                    *checks[1:],
                ),
            ),
            replace(e, landing_checks=()),  # not looked at
        ],
        "none_left_open": [
            replace(e, settled=3),
            # charged, but not the amount due (a declined attempt asks for it too)
            replace(e, ledger=[overcharged, *e.ledger[1:]]),
            replace(e, ledger=[*e.ledger, declined_for_less]),
        ],
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


# --- faults: one counts only with the evidence that it landed ------------------------------

LANDED = {
    "sigkill": {"pid": 41, "age_s": 12.0, "partitions_held": 4, "records_taken": 900,
                "behind_at_kill": 120, "behind_by_topic": {"billing.usage": 120}},
    "broker-sigkill": {"node": 2, "led_before": 37, "still_led": 0, "moved_after_s": 9.1},
    "warehouse-outage": {"sink_pid": 43, "sink_restarted": False, "insert_failures": 3},
    "gateway-outage": {"calls_refused": 57, "requests": 80},
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(LANDED))
def test_a_fault_with_its_evidence_landed(kind: str) -> None:
    fault = Fault(kind, "x", at_progress={"lag": 1}, evidence=LANDED[kind])
    assert fault.effective
    assert fault.to_json()["effective"] is True


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("sigkill", {"behind_at_kill": 0}),  # everything it had was finished: an idle victim
        ("sigkill", {"records_taken": 0}),  # it had not started on the work
        ("sigkill", {"partitions_held": 0}),  # a replacement still joining its group
        ("broker-sigkill", {"still_led": 1}),  # a partition kept it as leader
        ("broker-sigkill", {"led_before": 0}),  # it led nothing
        ("warehouse-outage", {"insert_failures": 0}),  # the sink had nothing to insert
        ("warehouse-outage", {"sink_restarted": True}),  # the failures counted elsewhere
        ("gateway-outage", {"calls_refused": 0}),  # nobody called while it was down
    ],
)
def test_a_fault_without_effect_did_not_land(kind: str, change: dict) -> None:
    assert not landed(kind, {**LANDED[kind], **change})


@pytest.mark.parametrize("kind", sorted(LANDED))
def test_missing_evidence_is_no_evidence(kind: str) -> None:
    for missing in LANDED[kind]:
        evidence = {k: v for k, v in LANDED[kind].items() if k != missing}
        decisive = missing not in ("pid", "age_s", "behind_by_topic", "sink_pid", "node",
                                   "moved_after_s", "requests")  # fmt: skip
        assert landed(kind, evidence) is not decisive, missing


def test_an_outcome_counts_the_faults_that_landed() -> None:
    outcome = Outcome("processor-kills", injected=[
        Fault("sigkill", "rating", {}, LANDED["sigkill"]),
        Fault("sigkill", "sink", {}, {**LANDED["sigkill"], "behind_at_kill": 0}),
    ])  # fmt: skip
    out = outcome.to_json()
    assert (out["faults"], out["faults_effective"]) == (2, 1)
    assert [f["effective"] for f in out["fault_evidence"]] == [True, False]
    assert out["fault_evidence"][1]["evidence"]["behind_at_kill"] == 0


def test_calls_in_flight_at_the_kill_are_work_started_and_not_finished() -> None:
    payments = {"pid": 42, "partitions_held": 24, "gateway_calls_in_flight": 60,
                "behind_at_kill": 0}  # fmt: skip
    assert landed("sigkill", payments)
    assert not landed("sigkill", {**payments, "gateway_calls_in_flight": 0})
    assert not landed("sigkill", {**payments, "partitions_held": 0})
