"""Reconciliation: the gateway's ledger, billing.payment-results and ClickHouse agree
with each other and with what was due.

Every invoice that had a payment attempt ends up exactly one of: paid (one successful
charge), uncollectible (dunning gave up, no successful charge) or open (neither, yet).
Listed as differences:
- a double charge, a charge without a published result, a result without a charge, an
  amount or currency that differs between them, a result missing from (or different
  in) the warehouse;
- a charge or result for another amount or currency than the invoice's amount due (its
  amount due, as landed in ClickHouse); a charge of a card that is neither the invoice's
  nor one its customer gave (billing.customers, as landed), or another card than its
  result names;
- refunds beyond what was charged, per charge and per invoice;
- a gateway answer the card token does not give: the simulator declines by token and
  merchant account (``decline_code_for``), so every decline and success is predictable;
- an ``uncollectible`` verdict the dunning schedule does not justify: it needs exactly
  len(schedule) + 1 attempts, each declined by the gateway.
``reconcile`` is pure; ``collect`` fetches the sources.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from streams.domain.payments import idempotency_key
from streams.payments.http_gateway import decline_code_for


class Sources(NamedTuple):
    ledger: list[dict[str, Any]]  # the gateway's charges and refunds
    results: list[dict[str, Any]]  # every committed record of billing.payment-results
    warehouse: list[dict[str, Any]]  # the payment attempts in ClickHouse
    invoices: list[dict[str, Any]]  # invoice_id, account_id, amount_due, currency, payment_method
    decline_rates: dict[str, float]  # merchant account -> the gateway's decline rate
    # account -> every payment method its customer record has had
    customer_cards: dict[str, set[str]] = {}  # noqa: RUF012 - a NamedTuple default, never mutated


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
    invoices: list[dict[str, Any]],
    decline_rates: dict[str, float],
    customer_cards: dict[str, set[str]] | None = None,
    *,
    schedule: tuple[timedelta, ...],
) -> Report:
    """`schedule` is the dunning schedule the payments processor ran with."""
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
        elif r.get("payment_method") not in (None, charge["payment_method"]):
            diff.append({"kind": "result_names_another_card", "payment_id": r["payment_id"]})
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
    _check_amounts_due(charges, published, invoices, customer_cards or {}, diff)
    _check_refunds(ledger, charges, diff)
    _check_gateway_answers(charges, decline_rates, diff)
    _check_dunning(charges, published, states, len(schedule) + 1, diff)

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


def _check_amounts_due(
    charges: list[dict[str, Any]],
    published: dict[str, dict[str, Any]],
    invoices: list[dict[str, Any]],
    customer_cards: dict[str, set[str]],
    diff: list[dict[str, Any]],
) -> None:
    """Each charge (whatever its outcome) and each result asks for the invoice's amount
    due, in its currency, of the invoice's card or one its customer gave."""
    due = {i["invoice_id"]: i for i in invoices}
    asked = [("charge", e["id"], e) for e in charges]
    asked += [("payment_id", p, r) for p, r in published.items()]
    for what, ref, row in asked:
        inv = due.get(row["invoice_id"])
        if inv is None:
            diff.append({"kind": "unknown_invoice", what: ref, "invoice_id": row["invoice_id"]})
            continue
        due_amount, currency = inv["amount_due"], inv["currency"]
        if Decimal(row["amount"]) != Decimal(due_amount) or row["currency"] != currency:
            diff.append({"kind": "amount_not_due", what: ref,
                         "asked": f"{row['amount']} {row['currency']}",
                         "due": f"{due_amount} {currency}"})  # fmt: skip
        cards = {inv["payment_method"], *customer_cards.get(inv.get("account_id", ""), ())}
        if what == "charge" and row.get("payment_method") not in cards:
            diff.append({"kind": "charged_another_card", "charge": ref})


def _check_refunds(
    ledger: list[dict[str, Any]], charges: list[dict[str, Any]], diff: list[dict[str, Any]]
) -> None:
    """Refunded, per charge and per invoice, at most what was charged (same currency)."""
    paid = {e["id"]: e for e in charges if e["status"] == "succeeded"}
    charged: dict[str, Decimal] = defaultdict(Decimal)
    for e in paid.values():
        charged[e["invoice_id"]] += Decimal(e["amount"])
    per_charge: dict[str, Decimal] = defaultdict(Decimal)
    per_invoice: dict[str, Decimal] = defaultdict(Decimal)
    for e in ledger:
        if e["kind"] != "refund" or e["status"] != "refunded":
            continue
        per_charge[e["charge_id"]] += Decimal(e["amount"])
        per_invoice[e["invoice_id"]] += Decimal(e["amount"])
        charge = paid.get(e["charge_id"])
        if charge is None or charge["currency"] != e["currency"]:
            diff.append({"kind": "refund_of_no_such_charge", "refund": e["id"]})
    over = [
        ("charge", c, r, Decimal(paid[c]["amount"])) for c, r in per_charge.items() if c in paid
    ]
    over += [("invoice_id", i, r, charged.get(i, Decimal(0))) for i, r in per_invoice.items()]
    for what, ref, refunded, limit in over:
        if refunded > limit:
            diff.append({"kind": "refunded_more_than_charged", what: ref,
                         "refunded": str(refunded), "charged": str(limit)})  # fmt: skip


def _check_gateway_answers(
    charges: list[dict[str, Any]], decline_rates: dict[str, float], diff: list[dict[str, Any]]
) -> None:
    """Each charge's outcome is the one its card token gets from its merchant account."""
    for e in charges:
        rate = decline_rates.get(e["merchant_account"])
        token = e.get("payment_method")
        if rate is None or not token:
            diff.append({"kind": "outcome_unpredictable", "charge": e["id"]})
            continue
        expected = decline_code_for(token, rate)
        if e["status"] == "succeeded" and expected is not None:
            diff.append({"kind": "success_the_token_does_not_get", "charge": e["id"],
                         "expected_decline": expected})  # fmt: skip
        elif e["status"] == "declined" and e.get("decline_code") != expected:
            diff.append({"kind": "decline_the_token_does_not_get", "charge": e["id"],
                         "decline_code": e.get("decline_code"), "expected": expected})  # fmt: skip


def _check_dunning(
    charges: list[dict[str, Any]],
    published: dict[str, dict[str, Any]],
    states: dict[str, str],
    attempts_allowed: int,
    diff: list[dict[str, Any]],
) -> None:
    """No attempt beyond the schedule's last; an uncollectible invoice had every attempt
    the schedule allows (1 .. len + 1), each one a decline recorded by the gateway, and
    its verdict came after the last."""
    declined_keys = {e["idempotency_key"] for e in charges if e["status"] == "declined"}
    attempts: dict[str, dict[int, str]] = defaultdict(dict)
    verdicts: dict[str, int] = {}
    for r in published.values():
        if r["attempt"] > attempts_allowed:
            diff.append({"kind": "attempt_beyond_dunning", "payment_id": r["payment_id"]})
        if r["status"] == "uncollectible":
            verdicts[r["invoice_id"]] = r["attempt"]
        else:
            attempts[r["invoice_id"]][r["attempt"]] = r["status"]
    for invoice_id, state in states.items():
        if state != "uncollectible":
            continue
        tried = attempts.get(invoice_id, {})
        justified = (
            verdicts.get(invoice_id) == attempts_allowed
            and sorted(tried) == list(range(1, attempts_allowed + 1))
            and all(
                status == "declined" and idempotency_key(invoice_id, n) in declined_keys
                for n, status in tried.items()
            )
        )
        if not justified:
            diff.append({"kind": "uncollectible_not_justified", "invoice_id": invoice_id,
                         "attempts": sorted(tried.items()),
                         "dunning_allows": attempts_allowed})  # fmt: skip


def collect(settings: Any, bootstrap: str, gateway_url: str | None = None) -> Sources:
    """The sources: the gateway's ledger and decline rates, every committed payment result
    on Kafka, and the warehouse's payment attempts and the invoices they collect."""
    import asyncio

    from streams.kafka.topics import PAYMENT_RESULTS
    from streams.publish import read_topic
    from streams.warehouse import query

    if settings.gateway != "simulator":
        raise ValueError(
            "reconcile reads the simulator's ledger; for Stripe, export the balance "
            "transactions and compare offline (not available without the network)"
        )
    from streams.payments.http_gateway import fetch_config, fetch_ledger

    url = gateway_url or settings.gateway_url
    ledger = asyncio.run(fetch_ledger(url))
    accounts = asyncio.run(fetch_config(url))["accounts"]
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
    rows = query(
        settings,
        "SELECT invoice_id, account_id, toString(amount_due), currency, payment_method "
        "FROM invoices FINAL WHERE invoice_id IN (SELECT invoice_id FROM payment_attempts)",
    )["rows"]
    columns = ("invoice_id", "account_id", "amount_due", "currency", "payment_method")
    invoices = [dict(zip(columns, r, strict=True)) for r in rows]
    rows = query(
        settings,
        "SELECT account_id, groupUniqArray(assumeNotNull(payment_method)) FROM customers FINAL "
        "WHERE payment_method IS NOT NULL GROUP BY account_id",
    )["rows"]
    cards = {account: set(tokens) for account, tokens in rows}
    rates = {name: float(a["decline_rate"]) for name, a in accounts.items()}
    return Sources(ledger, results, warehouse, invoices, rates, cards)
