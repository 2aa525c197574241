"""The rating processor of contract version 2 (STREAMBILL_RATING_CONTRACT=2), on the real
broker, RocksDB and ClickHouse, gives exactly the invoices `streambill rate` gives: every
field, the credit balance's (credit_applied, amount_due) and finalized_at included.

Inputs: the contract's five worked examples (tests/data/contract-v2/: versions and
retirement through billing.catalog, a trial, a pause and a resume, unique_count,
percentage, latest, a grace period with late usage inside it and after it, coupons, tax,
granted credit), and the version-1 parity cases (tests/data/parity/: version 1 rated by the
version-2 processor is still version 1). Small transactions and a state cache of 3
subscriptions make states leave the cache and come back from RocksDB, and bill runs and
due items cross transactions."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.domain.invoice import Invoice, invoice_to_dict
from streams.domain.timestamps import parse_timestamp
from streams.offline import load_catalog, rate_events
from streams.replay import replay
from streams.testbed.contract_events import random_history

pytestmark = pytest.mark.kafka
DATA = Path(__file__).resolve().parents[1] / "data"
EXAMPLES = sorted((DATA / "contract-v2").glob("0*"))
SMALL = {"STREAMBILL_RATING_TRANSACTION_RECORDS": "5",
         "STREAMBILL_RATING_USAGE_TRANSACTION_RECORDS": "5",
         "STREAMBILL_RATING_STATE_CACHE": "3"}  # fmt: skip


def whole(inv: Invoice) -> dict[str, Any]:
    return {**invoice_to_dict(inv), "reason": inv.reason}


def cases() -> list[tuple[str, Path, Path, str]]:
    out = [(d.name, d / "catalog.json", d / "events.jsonl", (d / "until").read_text().strip())
           for d in EXAMPLES]  # fmt: skip
    parity = DATA / "parity"
    out.append(("v1-parity", parity / "catalog.json", parity / "events.jsonl",
                "2026-06-30T00:00:00Z"))  # fmt: skip
    return out


def random_case(tmp_path: Path, seed: int) -> tuple[Path, Path, str]:
    history = random_history(seed)
    catalog, events = tmp_path / "catalog.json", tmp_path / "events.jsonl"
    catalog.write_bytes(orjson.dumps(history.catalog))
    events.write_text("\n".join(history.events) + "\n")
    return catalog, events, history.until.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize("name,catalog,events,until", cases(), ids=[c[0] for c in cases()])
def test_version_2_processor_invoices_equal_rate(
    kafka_bootstrap: str, tmp_path: Path, name: str, catalog: Path, events: Path, until: str
) -> None:
    assert_parity(kafka_bootstrap, tmp_path, catalog, events, until)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_histories_equal_rate(kafka_bootstrap: str, tmp_path: Path, seed: int) -> None:
    """Two dozen subscriptions on eight accounts (shared credit balances), every rule of
    version 2 at once (streams/testbed/contract_events.py), through 5-record transactions."""
    reference = assert_parity(kafka_bootstrap, tmp_path, *random_case(tmp_path, seed))
    reasons = {inv.reason for inv in reference.invoices}
    assert reasons >= {"created", "period_end", "paused", "resumed", "trial_ended", "adjustment",
                       "plan_changed", "cancelled"}  # fmt: skip
    kinds = {ln.kind for inv in reference.invoices for ln in inv.lines}
    assert kinds >= {"usage_adjustment", "discount", "tax", "proration_credit"}
    assert any(inv.credit_applied for inv in reference.invoices)
    assert any(inv.finalized_at != inv.issued_at for inv in reference.invoices)


def assert_parity(kafka_bootstrap: str, tmp_path: Path, catalog: Path, events: Path, until: str):
    lines = events.read_text().splitlines()
    when = parse_timestamp(until)
    reference = rate_events(load_catalog(catalog), lines, when)
    result = replay(catalog, lines, when, kafka_bootstrap, parent=tmp_path, rating_env=SMALL,
                    contract=2)  # fmt: skip

    got = sorted((whole(inv) for inv in result.invoices), key=lambda i: i["invoice_id"])
    want = sorted((whole(inv) for inv in reference.invoices), key=lambda i: i["invoice_id"])
    assert [g["invoice_id"] for g in got] == [w["invoice_id"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g == w, w["invoice_id"]
    # every event rate dead-letters is dead-lettered too (a plan event by the catalog, as
    # the API would refuse it; the others by the processor), and nothing else
    assert result.dead_letters.total() + result.catalog_refused == len(reference.dead_letters)
    assert result.deferred == reference.deferred
    return reference


ORDERING_CATALOG = {"plans": [{"plan_id": "m", "currency": "EUR", "interval": "month", "charges": [
    {"charge_id": "fee", "model": "flat", "amount": "30.00"},
    {"charge_id": "calls", "model": "per_unit", "metric": "calls", "aggregation": "sum",
     "unit_amount": "0.01"}]}]}  # fmt: skip
M2 = {**ORDERING_CATALOG["plans"][0],
      "charges": [{"charge_id": "fee", "model": "flat", "amount": "50.00"}]}  # fmt: skip
ORDERING_EVENTS = [
    {"type": "credit.granted", "timestamp": "2026-01-01T00:00:00Z", "credit_id": "g1",
     "account_id": "acc", "currency": "EUR", "amount": "40.00"},
    {"type": "subscription.created", "timestamp": "2026-01-01T00:00:00Z", "account_id": "acc",
     "subscription_id": "a", "plan_id": "m"},
    {"type": "subscription.created", "timestamp": "2026-01-01T00:00:00Z", "account_id": "acc",
     "subscription_id": "b", "plan_id": "m"},
    {"type": "subscription.created", "timestamp": "2026-01-05T00:00:00Z", "account_id": "acc",
     "subscription_id": "c", "plan_id": "m"},
    {"type": "credit.granted", "timestamp": "2026-01-15T00:00:00Z", "credit_id": "g2",
     "account_id": "acc", "currency": "EUR", "amount": "30.00"},
    # b is touched (its state in the transaction) just before a and b fall due together
    {"type": "usage", "event_id": "u1", "timestamp": "2026-01-31T23:00:00Z",
     "subscription_id": "b", "metric": "calls", "quantity": "1"},
    {"type": "usage", "event_id": "u2", "timestamp": "2026-02-01T00:00:01Z",
     "subscription_id": "b", "metric": "calls", "quantity": "1"},
    # c's period ends on Feb 5 with nothing arriving until the bill run: its invoice must
    # still come before this version (which moves it at its next period end, Mar 5)
    {"type": "plan.published", "timestamp": "2026-02-10T00:00:00Z", "plan": M2,
     "existing": "next_period"},
]  # fmt: skip


def test_what_falls_due_keeps_the_contracts_order_across_subscriptions_and_the_catalog(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two subscriptions of one account due at one instant take the credit in subscription
    order, one of them already in the open transaction and the other still in the store;
    a period end that nothing arrived after is made to happen before a catalog event
    taking effect later."""
    catalog, events = tmp_path / "catalog.json", tmp_path / "events.jsonl"
    catalog.write_bytes(orjson.dumps(ORDERING_CATALOG))
    events.write_text("\n".join(orjson.dumps(e).decode() for e in ORDERING_EVENTS) + "\n")
    reference = assert_parity(kafka_bootstrap, tmp_path, catalog, events, "2026-03-15T00:00:00Z")
    by = {
        (i.subscription_id, i.reason, i.issued_at.strftime("%m-%d")): i for i in reference.invoices
    }
    assert by[("a", "period_end", "02-01")].credit_applied == Decimal("30.00")
    assert by[("b", "period_end", "02-01")].credit_applied == Decimal("0.00")
    flat = {k: [ln.amount for ln in i.lines if ln.kind == "flat"] for k, i in by.items()}
    assert flat[("c", "period_end", "02-05")] == [Decimal("30.00")]
    assert flat[("c", "period_end", "03-05")] == [Decimal("50.00")]
