"""Reconciliation: the gateway's ledger, billing.payment-results and ClickHouse agree.

Every invoice that had a payment attempt ends up exactly one of: paid (one successful
charge), uncollectible (dunning gave up, no successful charge) or open (neither, yet).
Any double charge, charge without a published result, result without a charge, amount
or currency mismatch, or result missing from (or different in) the warehouse is listed.
``reconcile`` is pure; ``collect`` fetches the three sources.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from streams.domain.payments import idempotency_key


@dataclass
class Report:
    invoices: dict[str, int] = field(default_factory=dict)  # paid / open / uncollectible
    totals: dict[str, dict[str, Decimal]] = field(default_factory=dict)  # currency -> source
    differences: list[dict[str, Any]] = field(default_factory=list)
    double_charges: int = 0

    @property
    def reconciled(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "reconciled": self.reconciled,
            "invoices": self.invoices,
            "double_charges": self.double_charges,
            "paid_totals": {
                cur: {src: str(v) for src, v in by.items()} for cur, by in self.totals.items()
            },
            "differences": self.differences,
        }


def _latest(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """payment_id -> its result (a replayed attempt may publish the same result twice)."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        out[r["payment_id"]] = r
    return out


def reconcile(
    ledger: list[dict[str, Any]],
    results: list[dict[str, Any]],
    warehouse: list[dict[str, Any]],
) -> Report:
    report = Report()
    diff = report.differences
    charges = [e for e in ledger if e["kind"] == "charge"]
    by_key = defaultdict(list)
    succeeded_by_invoice: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in charges:
        by_key[e["idempotency_key"]].append(e)
        if e["status"] == "succeeded":
            succeeded_by_invoice[e["invoice_id"]].append(e)
    for key, entries in by_key.items():
        if sum(e["status"] == "succeeded" for e in entries) > 1:
            diff.append({"kind": "double_charge_same_key", "idempotency_key": key})
    for invoice_id, entries in succeeded_by_invoice.items():
        if len(entries) > 1:
            report.double_charges += 1
            diff.append({"kind": "double_charge", "invoice_id": invoice_id,
                         "charges": [e["id"] for e in entries]})  # fmt: skip

    published = _latest(results)
    ok_results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    states: dict[str, str] = {}
    for r in published.values():
        states.setdefault(r["invoice_id"], "open")
        if r["status"] == "succeeded":
            ok_results[r["invoice_id"]].append(r)
            states[r["invoice_id"]] = "paid"
        elif r["status"] == "uncollectible" and states[r["invoice_id"]] != "paid":
            states[r["invoice_id"]] = "uncollectible"
        if r["status"] == "uncollectible":
            continue  # a dunning verdict, not a gateway call
        key = idempotency_key(r["invoice_id"], r["attempt"])
        charge = next((e for e in by_key.get(key, ()) if e["status"] == r["status"]), None)
        if charge is None:
            diff.append({"kind": "result_without_gateway_charge", "payment_id": r["payment_id"],
                         "status": r["status"]})  # fmt: skip
        elif (
            Decimal(charge["amount"]) != Decimal(r["amount"]) or charge["currency"] != r["currency"]
        ):
            diff.append({"kind": "amount_mismatch", "payment_id": r["payment_id"],
                         "gateway": f"{charge['amount']} {charge['currency']}",
                         "result": f"{r['amount']} {r['currency']}"})  # fmt: skip
    for invoice_id, entries in succeeded_by_invoice.items():
        keys = {idempotency_key(r["invoice_id"], r["attempt"]) for r in ok_results[invoice_id]}
        for e in entries:
            if e["idempotency_key"] not in keys:
                diff.append({"kind": "gateway_charge_without_result", "invoice_id": invoice_id,
                             "charge": e["id"]})  # fmt: skip
    for invoice_id, state in states.items():
        if state == "uncollectible" and succeeded_by_invoice.get(invoice_id):
            diff.append({"kind": "uncollectible_but_charged", "invoice_id": invoice_id})

    landed = {w["payment_id"]: w for w in warehouse}
    for payment, r in published.items():
        w = landed.get(payment)
        if w is None:
            diff.append({"kind": "missing_in_warehouse", "payment_id": payment})
        elif w["status"] != r["status"] or Decimal(w["amount"]) != Decimal(r["amount"]):
            diff.append({"kind": "warehouse_differs", "payment_id": payment})
    for payment in landed.keys() - published.keys():
        diff.append({"kind": "warehouse_row_without_result", "payment_id": payment})

    report.invoices = dict(Counter(states.values()))
    for source, rows in (
        ("gateway", [e for es in succeeded_by_invoice.values() for e in es]),
        ("results", [r for rs in ok_results.values() for r in rs]),
        ("warehouse", [w for w in warehouse if w["status"] == "succeeded"]),
    ):
        for row in rows:
            per = report.totals.setdefault(row["currency"], {})
            per[source] = per.get(source, Decimal(0)) + Decimal(row["amount"])
    for currency, per in report.totals.items():
        if len({per.get(s, Decimal(0)) for s in ("gateway", "results", "warehouse")}) > 1:
            diff.append({"kind": "totals_differ", "currency": currency,
                         **{s: str(v) for s, v in per.items()}})  # fmt: skip
    return report


def collect(
    settings: Any, bootstrap: str, gateway_url: str | None = None
) -> tuple[list, list, list]:
    """The three sources: the gateway's ledger, every committed payment result on Kafka,
    and the warehouse's payment attempts."""
    import asyncio

    from streams.kafka.topics import PAYMENT_RESULTS
    from streams.publish import read_topic
    from streams.warehouse import query

    if settings.gateway != "simulator":
        raise ValueError(
            "reconcile reads the simulator's ledger; for Stripe, export the balance "
            "transactions and compare offline (not available without the network)"
        )
    from streams.payments.http_gateway import fetch_ledger

    ledger = asyncio.run(fetch_ledger(gateway_url or settings.gateway_url))
    results = read_topic(settings, bootstrap, PAYMENT_RESULTS)
    rows = query(
        settings,
        "SELECT payment_id, invoice_id, attempt, status, toString(amount), currency "
        "FROM payment_attempts FINAL",
    )["rows"]
    warehouse = [
        dict(zip(("payment_id", "invoice_id", "attempt", "status", "amount", "currency"), r,
                 strict=True))
        for r in rows
    ]  # fmt: skip
    return ledger, results, warehouse
