import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.domain.catalog import Catalog
from streams.domain.events import Usage
from streams.domain.invoice import invoice_id, invoice_to_dict
from streams.domain.rating import (
    STATUS_CANCELLING,
    STATUS_ENDED,
    apply_event,
    close_periods,
    next_period_end,
    plan_missing,
)

from .helpers import D, cancel, catalog, change, created, lines, run, ts, usage


def test_creation_invoice_charges_flats_in_advance():
    states, invoices, rej = run([created("2026-01-31T10:00:00Z")])
    assert rej == []
    [inv] = invoices
    d = invoice_to_dict(inv)
    assert d == {
        "invoice_id": invoice_id("s1", "created", ts("2026-01-31T10:00:00")),
        "account_id": "a1",
        "subscription_id": "s1",
        "currency": "EUR",
        "issued_at": "2026-01-31T10:00:00Z",
        "lines": [
            {
                "charge_id": "base",
                "kind": "flat",
                "period_start": "2026-01-31T10:00:00Z",
                "period_end": "2026-02-28T10:00:00Z",
                "quantity": "1",
                "amount": "10.00",
            }
        ],
        "total": "10.00",
        # no credit in the version-1 state machine: finalized when issued, the total due
        "finalized_at": "2026-01-31T10:00:00Z",
        "credit_applied": "0.00",
        "amount_due": "10.00",
    }
    assert inv.reason == "created"
    assert next_period_end(states["s1"]) == ts("2026-02-28T10:00:00")


def test_period_end_bills_usage_in_arrears_and_flats_in_advance():
    _, invoices, _ = run(
        [
            created("2026-01-31T10:00:00"),
            usage("2026-01-31T10:00:00", "100", "e1"),  # at the anchor: included
            usage("2026-02-28T09:59:59.999999", "23.5", "e2"),  # last microsecond: included
            usage("2026-02-10T00:00:00", "3", "e3", metric="seats"),
            usage("2026-02-11T00:00:00", "2", "e4", metric="seats"),
            usage("2026-02-28T10:00:00", "1", "e5"),  # next period
        ],
        until="2026-03-31T10:00:00",
    )
    assert [i.issued_at for i in invoices] == [
        ts("2026-01-31T10:00:00"),
        ts("2026-02-28T10:00:00"),
        ts("2026-03-31T10:00:00"),
    ]
    feb = invoices[1]
    assert lines(feb) == [
        ("api", "usage", "123.5", "1.24"),  # 1.235 -> half-even 1.24
        ("seats", "usage", "3", "15.00"),  # max aggregation
        ("base", "flat", "1", "10.00"),
    ]
    d = invoice_to_dict(feb)
    assert d["lines"][0]["period_start"] == "2026-01-31T10:00:00Z"
    assert d["lines"][0]["period_end"] == "2026-02-28T10:00:00Z"
    assert d["lines"][2]["period_start"] == "2026-02-28T10:00:00Z"
    assert d["lines"][2]["period_end"] == "2026-03-31T10:00:00Z"
    assert d["total"] == "26.24"
    assert lines(invoices[2])[0] == ("api", "usage", "1", "0.01")


def test_zero_invoice_is_still_emitted():
    _, invoices, _ = run([created("2026-01-01T00:00:00", plan="free")], until="2026-03-01T00:00:00")
    assert [(invoice_to_dict(i)["total"], i.reason) for i in invoices] == [
        ("0.00", "created"),
        ("0.00", "period_end"),
        ("0.00", "period_end"),
    ]


def test_until_is_inclusive_and_nothing_beyond():
    _, invoices, _ = run([created("2026-01-15T00:00:00")], until="2026-02-15T00:00:00")
    assert len(invoices) == 2
    _, invoices, _ = run([created("2026-01-15T00:00:00")], until="2026-02-14T23:59:59")
    assert len(invoices) == 1


def test_jpy_has_no_minor_units_and_count_aggregation():
    _, invoices, _ = run(
        [
            created("2026-01-01T00:00:00", plan="yen"),
            usage("2026-01-02T00:00:00", "999", "e1", metric="calls"),
            usage("2026-01-03T00:00:00", "0", "e2", metric="calls"),
            usage("2026-01-04T00:00:00", "5", "e3", metric="calls"),
            usage("2026-01-04T00:00:00", "5", "e3", metric="calls"),  # duplicate
            usage("2026-01-05T00:00:00", "5", "e4", metric="calls"),
            usage("2026-01-06T00:00:00", "5", "e5", metric="calls"),
        ],
        until="2026-02-01T00:00:00",
    )
    # count = 5 events -> 2.5 yen -> half-even 2; flat "1000" has no decimals
    assert lines(invoices[1]) == [("calls", "usage", "5", "2"), ("base", "flat", "1", "1000")]
    assert invoice_to_dict(invoices[1])["total"] == "1002"


def test_duplicate_event_id_counts_once_first_wins():
    _, invoices, rej = run(
        [
            created("2026-01-01T00:00:00"),
            usage("2026-01-02T00:00:00", "7", "dup"),
            usage("2026-01-03T00:00:00", "1000", "dup"),
        ],
        until="2026-02-01T00:00:00",
    )
    assert rej == []  # a retry is not an error
    assert lines(invoices[1])[0] == ("api", "usage", "7", "0.07")


def test_usage_line_with_zero_quantity():
    _, invoices, _ = run([created("2026-01-01T00:00:00")], until="2026-02-01T00:00:00")
    assert lines(invoices[1])[:2] == [
        ("api", "usage", "0", "0.00"),
        ("seats", "usage", "0", "0.00"),
    ]


def test_metric_without_charge_is_not_billed_nor_rejected():
    _, invoices, rej = run(
        [created("2026-01-01T00:00:00"), usage("2026-01-02T00:00:00", "5", "e1", metric="gpu")],
        until="2026-02-01T00:00:00",
    )
    assert rej == []
    assert invoice_to_dict(invoices[1])["total"] == "10.00"


def test_plan_change_prorates_with_exact_fractions():
    # January 2026: 31 days; change after exactly 10 days -> 21/31 remain
    _, invoices, rej = run(
        [
            created("2026-01-01T00:00:00"),
            usage("2026-01-05T00:00:00", "50", "e1"),
            change("2026-01-11T00:00:00", "pro"),
            usage("2026-01-11T00:00:00", "1500", "e2"),  # at t: new plan
            usage("2026-01-20T00:00:00", "1", "e3"),
        ],
        until="2026-02-01T00:00:00",
    )
    assert rej == []
    _, chg, end = invoices
    assert chg.reason == "plan_changed"
    assert chg.issued_at == ts("2026-01-11T00:00:00")
    # 10 * 21/31 = 6.774.. ; 30 * 21/31 = 20.322.. ; 3.10 * 21/31 = 2.1
    assert lines(chg) == [
        ("api", "usage", "50", "0.50"),
        ("seats", "usage", "0", "0.00"),
        ("base", "proration_credit", "1", "-6.77"),
        ("base", "proration_charge", "1", "20.32"),
        ("support", "proration_charge", "1", "2.10"),
    ]
    d = invoice_to_dict(chg)
    assert d["total"] == "16.15"
    assert [(ln["period_start"], ln["period_end"]) for ln in d["lines"]] == [
        ("2026-01-01T00:00:00Z", "2026-01-11T00:00:00Z"),
        ("2026-01-01T00:00:00Z", "2026-01-11T00:00:00Z"),
        *[("2026-01-11T00:00:00Z", "2026-02-01T00:00:00Z")] * 3,
    ]
    # period end unchanged; usage of [t, E) under the new plan: 1501 -> 2 packages
    assert end.issued_at == ts("2026-02-01T00:00:00")
    assert lines(end) == [
        ("api", "usage", "1501", "4.00"),
        ("base", "flat", "1", "30.00"),
        ("support", "flat", "1", "3.10"),
    ]
    assert invoice_to_dict(end)["lines"][0]["period_start"] == "2026-01-11T00:00:00Z"


def test_plan_change_exactly_at_period_end_happens_after_period_invoice():
    _, invoices, _ = run(
        [
            created("2026-01-01T00:00:00"),
            usage("2026-01-05T00:00:00", "10", "e1"),
            change("2026-02-01T00:00:00", "pro"),
        ]
    )
    assert [i.reason for i in invoices] == ["created", "period_end", "plan_changed"]
    pe, pc = invoices[1], invoices[2]
    assert lines(pe) == [
        ("api", "usage", "10", "0.10"),
        ("seats", "usage", "0", "0.00"),
        ("base", "flat", "1", "10.00"),
    ]
    # full-period credit/charge: (E - t)/(E - S) == 1
    assert lines(pc)[-3:] == [
        ("base", "proration_credit", "1", "-10.00"),
        ("base", "proration_charge", "1", "30.00"),
        ("support", "proration_charge", "1", "3.10"),
    ]


def test_two_plan_changes_at_same_instant_have_distinct_ids():
    t = "2026-01-10T00:00:00"
    _, invoices, rej = run(
        [
            created("2026-01-01T00:00:00"),
            change(t, "pro"),
            change(t, "basic"),
            change(t, "pro"),
        ]
    )
    assert rej == []
    ids = [i.invoice_id for i in invoices]
    assert len(set(ids)) == 4
    # ... and deterministic
    _, again, _ = run(
        [created("2026-01-01T00:00:00"), change(t, "pro"), change(t, "basic"), change(t, "pro")]
    )
    assert [i.invoice_id for i in again] == ids


def test_plan_change_rejections():
    _, invoices, rej = run(
        [
            created("2026-01-01T00:00:00"),
            change("2026-01-02T00:00:00", "usd"),
            change("2026-01-03T00:00:00", "annual"),
            change("2026-01-04T00:00:00", "nope"),
            change("2026-01-05T00:00:00", "basic"),
        ]
    )
    assert len(invoices) == 1
    assert [r.reason for r in rej] == [
        "plan change to another currency (EUR -> USD)",
        "plan change to another interval (month -> year)",
        "unknown plan 'nope'",
        "subscription is already on plan 'basic'",
    ]


def test_cancel_immediate():
    states, invoices, rej = run(
        [
            created("2026-01-01T00:00:00"),
            usage("2026-01-03T00:00:00", "3", "e1", metric="seats"),
            cancel("2026-01-11T00:00:00"),
            usage("2026-01-12T00:00:00", "5", "e2"),
            cancel("2026-01-13T00:00:00"),
        ],
        until="2026-06-01T00:00:00",
    )
    assert [i.reason for i in invoices] == ["created", "cancelled"]
    c = invoices[1]
    assert c.issued_at == ts("2026-01-11T00:00:00")
    assert lines(c) == [
        ("api", "usage", "0", "0.00"),
        ("seats", "usage", "3", "15.00"),
        ("base", "proration_credit", "1", "-6.77"),  # 10 * 21/31
    ]
    assert invoice_to_dict(c)["total"] == "8.23"
    assert [r.reason for r in rej] == ["subscription has ended"] * 2
    assert states["s1"].status == STATUS_ENDED
    assert next_period_end(states["s1"]) is None


def test_cancel_end_of_period():
    states, invoices, rej = run(
        [
            created("2026-01-01T00:00:00"),
            cancel("2026-01-11T00:00:00", mode="end_of_period"),
            cancel("2026-01-12T00:00:00", mode="end_of_period"),
            usage("2026-01-20T00:00:00", "100", "e1"),
        ],
    )
    assert [r.reason for r in rej] == ["cancellation already scheduled"]
    assert states["s1"].status == STATUS_CANCELLING
    assert [i.reason for i in invoices] == ["created"]
    states["s1"], more = close_periods(states["s1"], ts("2026-12-31T00:00:00"), catalog())
    [last] = more
    assert last.issued_at == ts("2026-02-01T00:00:00")
    assert lines(last) == [("api", "usage", "100", "1.00"), ("seats", "usage", "0", "0.00")]
    assert states["s1"].status == STATUS_ENDED
    _, _, rej = apply_event(states["s1"], usage("2026-02-01T00:00:00", "1", "e9"), catalog())
    assert [r.reason for r in rej] == ["subscription has ended"]


def test_dead_letter_reasons():
    _, invoices, rej = run(
        [
            usage("2026-01-01T00:00:00", "1", "e0"),
            created("2026-01-01T00:00:00", plan="nope"),
            created("2026-01-01T00:00:00"),
            created("2026-01-02T00:00:00"),
            change("2026-01-02T00:00:00", "pro", sub="ghost"),
            cancel("2026-01-02T00:00:00", sub="ghost"),
        ]
    )
    assert [r.reason for r in rej] == [
        "unknown subscription",
        "unknown plan 'nope'",
        "duplicate subscription.created",
        "unknown subscription",
        "unknown subscription",
    ]
    assert len(invoices) == 1
    assert rej[0].event == usage("2026-01-01T00:00:00", "1", "e0")


def test_late_usage_for_an_invoiced_segment_is_rejected():
    # out-of-order delivery (streaming): usage older than the open period
    cat = catalog()
    st, _, _ = apply_event(None, created("2026-01-01T00:00:00"), cat)
    st, inv, _ = apply_event(st, usage("2026-02-05T00:00:00", "1", "e1"), cat)
    assert [i.reason for i in inv] == ["period_end"]
    st, inv, rej = apply_event(st, usage("2026-01-20T00:00:00", "1", "e2"), cat)
    assert inv == [] and [r.reason for r in rej] == [
        "late event: its billing segment is already invoiced"
    ]


def test_apply_event_closes_many_periods_first():
    cat = catalog()
    st, _, _ = apply_event(None, created("2026-01-31T10:00:00"), cat)
    st, inv, _ = apply_event(st, usage("2026-05-01T00:00:00", "1", "e1"), cat)
    assert [i.issued_at for i in inv] == [
        ts("2026-02-28T10:00:00"),
        ts("2026-03-31T10:00:00"),
        ts("2026-04-30T10:00:00"),
    ]
    assert next_period_end(st) == ts("2026-05-31T10:00:00")


def test_yearly_plan_and_leap_anchor():
    _, invoices, _ = run(
        [created("2024-02-29T00:00:00", plan="annual")], until="2028-03-01T00:00:00"
    )
    assert [i.issued_at for i in invoices] == [
        ts("2024-02-29T00:00:00"),
        ts("2025-02-28T00:00:00"),
        ts("2026-02-28T00:00:00"),
        ts("2027-02-28T00:00:00"),
        ts("2028-02-29T00:00:00"),
    ]


def test_graduated_in_a_plan_with_tier_flat():
    cat = Catalog.from_dict(
        {
            "plans": [
                {
                    "plan_id": "g",
                    "currency": "EUR",
                    "interval": "month",
                    "charges": [
                        {
                            "charge_id": "g",
                            "model": "graduated",
                            "metric": "m",
                            "aggregation": "sum",
                            "tiers": [
                                {"up_to": "10", "unit_amount": "0.333", "flat_amount": "1"},
                                {"up_to": None, "unit_amount": "0.1"},
                            ],
                        }
                    ],
                }
            ]
        }
    )
    events = [
        created("2026-01-01T00:00:00", plan="g"),
        Usage("e1", ts("2026-01-02T00:00:00"), "s1", "m", D("11.5")),
    ]
    _, invoices, _ = run(events, until="2026-02-01T00:00:00", cat=cat)
    # 10 * 0.333 + 1 + 1.5 * 0.1 = 4.48 (exact), no intermediate rounding
    assert lines(invoices[1]) == [("g", "usage", "11.5", "4.48")]


@given(name=st.text(max_size=80))
def test_invoice_ids_are_the_uuid5_of_their_name(name: str) -> None:
    """The hand-made uuid5 (no UUID object) is uuid.uuid5's, character for character."""
    import uuid

    from streams.domain.invoice import INVOICE_NAMESPACE, uuid5_text

    try:
        expected = str(uuid.uuid5(INVOICE_NAMESPACE, name))
    except UnicodeEncodeError:  # a lone surrogate: neither can encode it
        with pytest.raises(UnicodeEncodeError):
            uuid5_text(name)
        return
    assert uuid5_text(name) == expected


def test_a_plan_the_catalog_no_longer_has_refuses_events_and_closes_nothing():
    cat = catalog()
    states, _, _ = run([created("2026-01-15T10:00:00")], cat=cat)
    state = states["s1"]
    without = Catalog({pid: p for pid, p in cat.plans.items() if pid != "basic"})
    assert plan_missing(state, without) and not plan_missing(state, cat)
    for event in (usage("2026-01-20T00:00:00", "5", "u1"), cancel("2026-01-21T00:00:00"),
                  change("2026-01-22T00:00:00", "pro")):  # fmt: skip
        same, invoices, rejections = apply_event(state, event, without)
        assert same is state and invoices == []
        assert [r.reason for r in rejections] == [
            "the subscription's plan 'basic' is not in the catalog"
        ]
    assert close_periods(state, ts("2026-06-01T00:00:00"), without) == (state, [])
    _, invoices = close_periods(state, ts("2026-03-01T00:00:00"), cat)  # the plan is back
    assert [i.issued_at for i in invoices] == [ts("2026-02-15T10:00:00")]
