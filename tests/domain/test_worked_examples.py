"""Worked examples: invoices computed by hand, through the public offline rater.

The rating processor and `streambill rate` share the domain code, so parity between them
cannot find a pricing error they share; these examples can. Every expected amount is a
literal worked out by hand (the arithmetic in the comment beside it), never by the code
under test. Rounding is half-even to the currency's minor unit, once per line; a tie
marked "(half-up: x)" is where rounding half up would give x instead.

January 2026 has 31 days (2,678,400 s), February 2026 28, the year from 2025-03-01 365.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest

from streams.domain.catalog import Catalog
from streams.domain.invoice import invoice_to_dict
from streams.domain.timestamps import parse_timestamp
from streams.offline import rate_events

JAN_1, FEB_1 = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"


def rate(plans: list[dict], events: list[dict], until: str) -> list[dict[str, Any]]:
    """The invoices rate_events gives (its JSON shape plus the reason); every event valid."""
    catalog = Catalog.from_dict({"plans": plans})
    result = rate_events(catalog, [json.dumps(e) for e in events], parse_timestamp(until))
    assert result.dead_letters == []
    return [{**invoice_to_dict(inv), "reason": inv.reason} for inv in result.invoices]


def plan(plan_id: str, currency: str, *charges: dict, interval: str = "month") -> dict:
    return {"plan_id": plan_id, "currency": currency, "interval": interval,
            "charges": list(charges)}  # fmt: skip


def flat(amount: str, charge_id: str = "base") -> dict:
    return {"charge_id": charge_id, "model": "flat", "amount": amount}


def created(at: str, plan_id: str) -> dict:
    return {"type": "subscription.created", "timestamp": at, "account_id": "acct",
            "subscription_id": "sub", "plan_id": plan_id}  # fmt: skip


def changed(at: str, plan_id: str) -> dict:
    return {"type": "subscription.plan_changed", "timestamp": at, "subscription_id": "sub",
            "plan_id": plan_id}  # fmt: skip


def cancelled(at: str, mode: str = "immediate") -> dict:
    return {"type": "subscription.cancelled", "timestamp": at, "subscription_id": "sub",
            "mode": mode}  # fmt: skip


def line(charge_id: str, kind: str, start: str, end: str, quantity: str, amount: str) -> dict:
    return {"charge_id": charge_id, "kind": kind, "period_start": start, "period_end": end,
            "quantity": quantity, "amount": amount}  # fmt: skip


# --- usage charges: one period of January, priced at its end -----------------------------

PER_UNIT_0013 = {"model": "per_unit", "aggregation": "sum", "unit_amount": "0.013"}
PER_UNIT_0005 = {"model": "per_unit", "aggregation": "sum", "unit_amount": "0.005"}
# 0..100 at 0.10; 100..1000 at 0.05, +2 on reaching it; above 1000 at 0.01, +5 on reaching it
GRADUATED = {"model": "graduated", "aggregation": "sum", "tiers": [
    {"up_to": "100", "unit_amount": "0.10"},
    {"up_to": "1000", "unit_amount": "0.05", "flat_amount": "2"},
    {"up_to": None, "unit_amount": "0.01", "flat_amount": "5"},
]}  # fmt: skip
# a flat amount on the first tier: charged for any quantity above 0
GRADUATED_FIRST_FLAT = {"model": "graduated", "aggregation": "sum", "tiers": [
    {"up_to": "10", "unit_amount": "2", "flat_amount": "3"},
    {"up_to": None, "unit_amount": "1"},
]}  # fmt: skip
# every unit at the price of the tier the whole (max) quantity falls into, + its flat amount
VOLUME = {"model": "volume", "aggregation": "max", "tiers": [
    {"up_to": "5", "unit_amount": "7", "flat_amount": "1"},
    {"up_to": "20", "unit_amount": "6", "flat_amount": "3"},
    {"up_to": None, "unit_amount": "5"},
]}  # fmt: skip
PACKAGE = {"model": "package", "aggregation": "sum", "package_size": "1000",
           "package_amount": "2"}  # fmt: skip
JPY_PER_UNIT = {"model": "per_unit", "aggregation": "count", "unit_amount": "0.5"}
JPY_GRADUATED = {"model": "graduated", "aggregation": "count", "tiers": [
    {"up_to": "3", "unit_amount": "0"},
    {"up_to": None, "unit_amount": "12.5", "flat_amount": "7"},
]}  # fmt: skip

USAGE_EXAMPLES = [
    # (charge, currency, quantities of the usage events, billed quantity, amount)
    # per_unit, EUR
    (PER_UNIT_0013, "EUR", ["35.5"], "35.5", "0.46"),  # 35.5 x 0.013 = 0.4615
    (PER_UNIT_0013, "EUR", ["0.1", "0.2"], "0.3", "0.00"),  # 0.3 exactly; x 0.013 = 0.0039
    (PER_UNIT_0013, "EUR", ["115"], "115", "1.50"),  # 1.495: tie, 9 odd -> up
    (PER_UNIT_0013, "EUR", ["125"], "125", "1.62"),  # 1.625: tie, 2 even (half-up: 1.63)
    (PER_UNIT_0005, "EUR", ["1"], "1", "0.00"),  # 0.005: tie, 0 even (half-up: 0.01)
    (PER_UNIT_0005, "EUR", ["3"], "3", "0.02"),  # 0.015: tie, 1 odd -> up
    (PER_UNIT_0005, "EUR", ["5"], "5", "0.02"),  # 0.025: tie, 2 even (half-up: 0.03)
    (PER_UNIT_0005, "EUR", ["7"], "7", "0.04"),  # 0.035: tie, 3 odd -> up
    (PER_UNIT_0013, "EUR", [], "0", "0.00"),  # no usage: still a line, of 0
    # graduated, EUR
    (GRADUATED, "EUR", ["0"], "0", "0.00"),  # reaches no tier: no flat amount either
    (GRADUATED, "EUR", ["100"], "100", "10.00"),  # 100 x 0.10; at up_to: not tier 2's +2
    (GRADUATED, "EUR", ["100", "1"], "101", "12.05"),  # 10 + 1 x 0.05 + 2
    # 10 + 0.5 x 0.05 + 2 = 12.025: tie, 2 even (half-up: 12.03)
    (GRADUATED, "EUR", ["100.5"], "100.5", "12.02"),
    (GRADUATED, "EUR", ["1000"], "1000", "57.00"),  # 10 + 900 x 0.05 + 2; at up_to: no +5
    (GRADUATED, "EUR", ["1001"], "1001", "62.01"),  # 57 + 1 x 0.01 + 5
    (GRADUATED_FIRST_FLAT, "EUR", ["0.001"], "0.001", "3.00"),  # 0.001 x 2 + 3 = 3.002
    (GRADUATED_FIRST_FLAT, "EUR", ["10"], "10", "23.00"),  # 10 x 2 + 3
    (GRADUATED_FIRST_FLAT, "EUR", ["11"], "11", "24.00"),  # 23 + 1 x 1 (tier 2: no flat)
    # volume (max of the period's events), EUR
    (VOLUME, "EUR", ["5"], "5", "36.00"),  # at up_to, tier 1: 5 x 7 + 1
    (VOLUME, "EUR", ["3", "6", "4"], "6", "39.00"),  # max 6, tier 2: 6 x 6 + 3
    (VOLUME, "EUR", ["5.5"], "5.5", "36.00"),  # tier 2: 5.5 x 6 + 3
    (VOLUME, "EUR", ["20"], "20", "123.00"),  # at up_to, tier 2: 20 x 6 + 3
    (VOLUME, "EUR", ["21"], "21", "105.00"),  # tier 3: 21 x 5, no flat amount
    (VOLUME, "EUR", [], "0", "0.00"),  # reaches no tier: no flat amount
    # package of 1000 at 2, EUR
    (PACKAGE, "EUR", ["0"], "0", "0.00"),  # 0 packages
    (PACKAGE, "EUR", ["1"], "1", "2.00"),  # ceil(1 / 1000) = 1 package
    (PACKAGE, "EUR", ["1000"], "1000", "2.00"),  # exactly 1 package
    (PACKAGE, "EUR", ["1000", "1"], "1001", "4.00"),  # ceil(1001 / 1000) = 2 packages
    # JPY: no minor unit; count aggregation (events, whatever their quantity)
    (JPY_PER_UNIT, "JPY", ["9"] * 5, "5", "2"),  # 5 x 0.5 = 2.5: tie, 2 even (half-up: 3)
    (JPY_PER_UNIT, "JPY", ["9"] * 3, "3", "2"),  # 1.5: tie, 1 odd -> up
    (JPY_PER_UNIT, "JPY", ["9"], "1", "0"),  # 0.5: tie, 0 even (half-up: 1)
    (JPY_PER_UNIT, "JPY", ["9"] * 7, "7", "4"),  # 3.5: tie, 3 odd -> up
    (JPY_GRADUATED, "JPY", ["1"] * 3, "3", "0"),  # 3 x 0; at up_to: not tier 2's +7
    (JPY_GRADUATED, "JPY", ["1"] * 4, "4", "20"),  # 0 + 1 x 12.5 + 7 = 19.5: tie, 9 odd -> up
    (JPY_GRADUATED, "JPY", ["1"] * 5, "5", "32"),  # 0 + 2 x 12.5 + 7
]


@pytest.mark.parametrize(
    ("charge", "currency", "quantities", "quantity", "amount"),
    USAGE_EXAMPLES,
    ids=[f"{c['model']} {cur} {q} -> {a}" for c, cur, _, q, a in USAGE_EXAMPLES],
)
def test_usage_charge(
    charge: dict, currency: str, quantities: list[str], quantity: str, amount: str
) -> None:
    start = datetime(2026, 1, 2, tzinfo=UTC)
    usage = [
        {"type": "usage", "event_id": f"e{i}", "subscription_id": "sub", "metric": "m",
         "timestamp": f"{start + timedelta(minutes=i):%Y-%m-%dT%H:%M:%SZ}", "quantity": q}
        for i, q in enumerate(quantities)
    ]  # fmt: skip
    p = plan("p", currency, {"charge_id": "c", "metric": "m", **charge})
    opening, closing = rate([p], [created(JAN_1, "p"), *usage], FEB_1)
    assert opening["lines"] == [] and opening["total"] == ("0" if currency == "JPY" else "0.00")
    assert closing["lines"] == [line("c", "usage", JAN_1, FEB_1, quantity, amount)]
    assert closing["total"] == amount


@pytest.mark.parametrize(
    ("currency", "amount", "billed"),
    [
        ("EUR", "9.99", "9.99"),
        ("EUR", "0.125", "0.12"),  # tie, 2 even (half-up: 0.13)
        ("EUR", "0.135", "0.14"),  # tie, 3 odd -> up
        ("JPY", "1000", "1000"),  # no minor unit: no decimal point
        ("JPY", "1000.5", "1000"),  # tie, 0 even (half-up: 1001)
    ],
)
def test_flat_charge_in_advance(currency: str, amount: str, billed: str) -> None:
    (opening,) = rate([plan("p", currency, flat(amount))], [created(JAN_1, "p")], JAN_1)
    assert opening["reason"] == "created"
    assert opening["lines"] == [line("base", "flat", JAN_1, FEB_1, "1", billed)]
    assert opening["total"] == billed


# --- prorations: exact seconds, rounded once per line -------------------------------------

BASIC = plan("basic", "EUR", flat("10.00"))
PRO = plan("pro", "EUR", flat("30.00"), flat("3.10", "support"))
ANNUAL = plan("annual", "EUR", flat("120.00"), interval="year")
ANNUAL_PLUS = plan("annual-plus", "EUR", flat("200.00"), interval="year")
HALF_A = plan("half-a", "EUR", flat("10.01"))
HALF_B = plan("half-b", "EUR", flat("4.99"))
BASIC_JPY = plan("basic-jpy", "JPY", flat("1000"))

MAR_1 = "2026-03-01T00:00:00Z"


def credit(at: str, end: str, amount: str, charge_id: str = "base") -> dict:
    return line(charge_id, "proration_credit", at, end, "1", amount)


def charge(at: str, end: str, amount: str, charge_id: str = "base") -> dict:
    return line(charge_id, "proration_charge", at, end, "1", amount)


PRORATION_EXAMPLES = [
    # (plans, events, reason, lines of the last invoice, its total)
    pytest.param(
        [BASIC],
        [created(JAN_1, "basic"), cancelled("2026-01-21T00:00:00Z")],
        "cancelled",
        # 11 of 31 days left: -10 x 950,400 / 2,678,400 s = -3.5483...
        [credit("2026-01-21T00:00:00Z", FEB_1, "-3.55")],
        "-3.55",
        id="immediate cancellation, 11/31 of January left",
    ),
    pytest.param(
        [BASIC],
        [created(JAN_1, "basic"), cancelled("2026-01-31T23:59:59Z")],
        "cancelled",
        # 1 s left: -10 x 1 / 2,678,400 = -0.0000037...: 0, written without a sign
        [credit("2026-01-31T23:59:59Z", FEB_1, "0.00")],
        "0.00",
        id="immediate cancellation, one second left",
    ),
    pytest.param(
        [BASIC],
        [created(JAN_1, "basic"), cancelled("2026-01-01T00:00:01Z")],
        "cancelled",
        # -10 x 2,678,399 / 2,678,400 = -9.9999962...
        [credit("2026-01-01T00:00:01Z", FEB_1, "-10.00")],
        "-10.00",
        id="immediate cancellation, one second in",
    ),
    pytest.param(
        [BASIC, PRO],
        [created(JAN_1, "basic"), changed("2026-01-11T12:00:00Z", "pro")],
        "plan_changed",
        # 20.5 of 31 days left (1,771,200 / 2,678,400 s):
        # -10 x 20.5 / 31 = -6.6129...; 30 x 20.5 / 31 = 19.8387...;
        # 3.10 x 20.5 / 31 = 63.55 / 31 = 2.05 exactly; total -6.61 + 19.84 + 2.05
        [
            credit("2026-01-11T12:00:00Z", FEB_1, "-6.61"),
            charge("2026-01-11T12:00:00Z", FEB_1, "19.84"),
            charge("2026-01-11T12:00:00Z", FEB_1, "2.05", "support"),
        ],
        "15.28",
        id="upgrade mid-January",
    ),
    pytest.param(
        [HALF_A, HALF_B],
        [created("2026-02-01T00:00:00Z", "half-a"), changed("2026-02-15T00:00:00Z", "half-b")],
        "plan_changed",
        # 14 of 28 days left, one half: -10.01 / 2 = -5.005: tie, 0 even (half-up: -5.01);
        # 4.99 / 2 = 2.495: tie, 9 odd -> up; total -5.00 + 2.50
        [
            credit("2026-02-15T00:00:00Z", MAR_1, "-5.00"),
            charge("2026-02-15T00:00:00Z", MAR_1, "2.50"),
        ],
        "-2.50",
        id="downgrade at half of February, ties",
    ),
    pytest.param(
        [ANNUAL, ANNUAL_PLUS],
        [created("2025-03-01T00:00:00Z", "annual"), changed(JAN_1, "annual-plus")],
        "plan_changed",
        # 59 of 365 days left (January 31 + February 28):
        # -120 x 59 / 365 = -7080 / 365 = -19.3972...; 200 x 59 / 365 = 11800 / 365 = 32.3287...
        # total -19.40 + 32.33
        [credit(JAN_1, MAR_1, "-19.40"), charge(JAN_1, MAR_1, "32.33")],
        "12.93",
        id="yearly upgrade",
    ),
    pytest.param(
        [ANNUAL],
        [created("2024-02-29T00:00:00Z", "annual"), cancelled("2024-03-01T00:00:00Z")],
        "cancelled",
        # the year from 2024-02-29 ends 2025-02-28: 365 days, 364 left:
        # -120 x 364 / 365 = -43680 / 365 = -119.6712...
        [credit("2024-03-01T00:00:00Z", "2025-02-28T00:00:00Z", "-119.67")],
        "-119.67",
        id="yearly from a leap day, cancelled the next day",
    ),
    pytest.param(
        [BASIC_JPY],
        [created(JAN_1, "basic-jpy"), cancelled("2026-01-21T00:00:00Z")],
        "cancelled",
        # -1000 x 11 / 31 = -354.838...
        [credit("2026-01-21T00:00:00Z", FEB_1, "-355")],
        "-355",
        id="JPY immediate cancellation",
    ),
    pytest.param(
        [BASIC],
        [created("2026-01-31T00:00:00Z", "basic"), cancelled("2026-03-30T00:00:00Z")],
        "cancelled",
        # the second period is [Feb 28, Mar 31): 31 days, 1 left: -10 / 31 = -0.3225...
        [credit("2026-03-30T00:00:00Z", "2026-03-31T00:00:00Z", "-0.32")],
        "-0.32",
        id="month-end anchor, cancelled a day before the period end",
    ),
]


@pytest.mark.parametrize(("plans", "events", "reason", "lines", "total"), PRORATION_EXAMPLES)
def test_proration(
    plans: list[dict], events: list[dict], reason: str, lines: list[dict], total: str
) -> None:
    last = rate(plans, events, events[-1]["timestamp"])[-1]
    assert last["reason"] == reason
    assert last["issued_at"] == events[-1]["timestamp"]
    assert last["lines"] == lines
    assert last["total"] == total


# --- anchored periods ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "interval", "until", "issued"),
    [
        pytest.param(
            "2026-01-31T10:00:00Z", "month", "2026-05-31T10:00:00Z",
            # a day a month does not have is its last day; the anchor comes back after
            ["2026-01-31T10:00:00Z", "2026-02-28T10:00:00Z", "2026-03-31T10:00:00Z",
             "2026-04-30T10:00:00Z", "2026-05-31T10:00:00Z", "2026-06-30T10:00:00Z"],
            id="Jan 31 -> Feb 28 -> Mar 31 -> Apr 30 -> May 31",
        ),
        pytest.param(
            "2024-01-31T00:00:00Z", "month", "2024-03-31T00:00:00Z",
            ["2024-01-31T00:00:00Z", "2024-02-29T00:00:00Z", "2024-03-31T00:00:00Z",
             "2024-04-30T00:00:00Z"],
            id="leap year: Jan 31 -> Feb 29 -> Mar 31",
        ),
        pytest.param(
            "2024-02-29T12:00:00Z", "year", "2028-02-29T12:00:00Z",
            ["2024-02-29T12:00:00Z", "2025-02-28T12:00:00Z", "2026-02-28T12:00:00Z",
             "2027-02-28T12:00:00Z", "2028-02-29T12:00:00Z", "2029-02-28T12:00:00Z"],
            id="yearly from Feb 29",
        ),
    ],
)  # fmt: skip
def test_period_boundaries(start: str, interval: str, until: str, issued: list[str]) -> None:
    """Each invoice is issued at a period boundary (until inclusive) and charges the flat
    amount for the period from there to the next boundary."""
    invoices = rate([plan("p", "EUR", flat("10.00"), interval=interval)], [created(start, "p")],
                    until)  # fmt: skip
    assert [inv["issued_at"] for inv in invoices] == issued[:-1]
    assert [inv["reason"] for inv in invoices] == ["created"] + ["period_end"] * (len(issued) - 2)
    for inv, (begin, end) in zip(invoices, pairwise(issued), strict=True):
        assert inv["lines"] == [line("base", "flat", begin, end, "1", "10.00")]
