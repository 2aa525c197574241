import io
import random

import orjson
import pytest

from streams.domain.catalog import CatalogError
from streams.domain.timestamps import InvalidTimestamp
from streams.offline import (
    dead_letter_to_json_line,
    invoice_to_json_line,
    parse_timestamp,
    rate_streams,
)

CATALOG = {
    "plans": [
        {
            "plan_id": "starter",
            "currency": "EUR",
            "interval": "month",
            "charges": [
                {"charge_id": "base", "model": "flat", "amount": "10.00"},
                {
                    "charge_id": "api",
                    "model": "graduated",
                    "metric": "api_calls",
                    "aggregation": "sum",
                    "tiers": [
                        {"up_to": "1000", "unit_amount": "0"},
                        {"up_to": None, "unit_amount": "0.001", "flat_amount": "1"},
                    ],
                },
            ],
        },
        {
            "plan_id": "pro",
            "currency": "EUR",
            "interval": "month",
            "charges": [
                {"charge_id": "base", "model": "flat", "amount": "31.00"},
                {
                    "charge_id": "api",
                    "model": "volume",
                    "metric": "api_calls",
                    "aggregation": "sum",
                    "tiers": [
                        {"up_to": "100", "unit_amount": "0.01"},
                        {"up_to": None, "unit_amount": "0.005", "flat_amount": "2"},
                    ],
                },
            ],
        },
        {
            "plan_id": "yen",
            "currency": "JPY",
            "interval": "year",
            "charges": [{"charge_id": "base", "model": "flat", "amount": "12000"}],
        },
    ]
}


def ev(**kw):
    return orjson.dumps(kw).decode()


EVENTS = [
    ev(
        type="subscription.created",
        timestamp="2026-01-31T10:00:00Z",
        account_id="acc1",
        subscription_id="s1",
        plan_id="starter",
    ),
    ev(
        type="usage",
        event_id="u1",
        timestamp="2026-02-01T00:00:00Z",
        subscription_id="s1",
        metric="api_calls",
        quantity="1500",
        account_id="acc1",
    ),
    ev(
        type="usage",
        event_id="u1",
        timestamp="2026-02-01T00:00:00Z",
        subscription_id="s1",
        metric="api_calls",
        quantity="1500",
    ),  # retry: counted once
    ev(
        type="subscription.plan_changed",
        timestamp="2026-03-15T00:00:00Z",
        subscription_id="s1",
        plan_id="pro",
    ),
    ev(
        type="usage",
        event_id="u2",
        timestamp="2026-03-20T00:00:00Z",
        subscription_id="s1",
        metric="api_calls",
        quantity="150",
    ),
    ev(
        type="subscription.cancelled",
        timestamp="2026-04-10T00:00:00Z",
        subscription_id="s1",
        mode="end_of_period",
    ),
    ev(
        type="usage",
        event_id="u3",
        timestamp="2026-05-01T00:00:00Z",
        subscription_id="s1",
        metric="api_calls",
        quantity="1",
    ),  # after the end -> dead letter
    ev(
        type="subscription.created",
        timestamp="2024-02-29T00:00:00Z",
        account_id="acc2",
        subscription_id="s2",
        plan_id="yen",
    ),
    ev(
        type="subscription.cancelled",
        timestamp="2026-08-29T00:00:00Z",
        subscription_id="s2",
        mode="immediate",
    ),
    ev(
        type="usage",
        event_id="u4",
        timestamp="2026-02-02T00:00:00Z",
        subscription_id="ghost",
        metric="api_calls",
        quantity="1",
    ),
    ev(
        type="usage",
        event_id="u5",
        timestamp="2026-02-02T00:00:00Z",
        subscription_id="s1",
        metric="api_calls",
        quantity=1.5,
    ),
    ev(
        type="usage",
        event_id="u6",
        timestamp="2026-02-02T00:00:00Z",
        subscription_id="s1",
        metric="api_calls",
        quantity="-3",
    ),
    "{not json",
    "",
    ev(
        type="subscription.created",
        timestamp="2027-01-01T00:00:00Z",
        account_id="acc3",
        subscription_id="s3",
        plan_id="starter",
    ),  # after --until: deferred
]
UNTIL = "2026-12-31T00:00:00Z"


def write(tmp_path, events=EVENTS, catalog=CATALOG):
    cat = tmp_path / "catalog.json"
    cat.write_bytes(orjson.dumps(catalog))
    evs = tmp_path / "events.jsonl"
    evs.write_text("\n".join(events) + "\n")
    return cat, evs


def render(result) -> str:
    return "".join(invoice_to_json_line(i) + "\n" for i in result.invoices)


def test_rates_the_example(tmp_path):
    cat, evs = write(tmp_path)
    result = rate_streams(cat, evs, parse_timestamp(UNTIL))
    out = [orjson.loads(invoice_to_json_line(i)) for i in result.invoices]
    summary = [(d["subscription_id"], d["issued_at"], d["total"]) for d in out]
    assert summary == [
        ("s2", "2024-02-29T00:00:00Z", "12000"),
        ("s2", "2025-02-28T00:00:00Z", "12000"),
        ("s1", "2026-01-31T10:00:00Z", "10.00"),
        ("s2", "2026-02-28T00:00:00Z", "12000"),
        # 1500 calls: 500 * 0.001 + 1 flat = 1.50, + next month's base
        ("s1", "2026-02-28T10:00:00Z", "11.50"),
        # 394 of 744 hours remain: -10*394/744 = -5.30, +31*394/744 = 16.42
        ("s1", "2026-03-15T00:00:00Z", "11.12"),
        # 150 calls in tier 2 (volume): 150*0.005 + 2 = 2.75
        ("s1", "2026-03-31T10:00:00Z", "33.75"),
        # cancelled at end of period: usage only, no new base
        ("s1", "2026-04-30T10:00:00Z", "0.00"),
        # 183 of 365 days remain: -12000*183/365 = -6016.438.. -> -6016
        ("s2", "2026-08-29T00:00:00Z", "-6016"),
    ]
    change = out[5]
    assert [(ln["charge_id"], ln["kind"], ln["amount"]) for ln in change["lines"]] == [
        ("api", "usage", "0.00"),
        ("base", "proration_credit", "-5.30"),
        ("base", "proration_charge", "16.42"),
    ]
    assert [(d["line"], d["reason"]) for d in result.dead_letters] == [
        (11, "invalid quantity: expected a decimal string, got JSON float 1.5"),
        (12, "negative quantity '-3'"),
        (13, d13 := result.dead_letters[2]["reason"]),
        (10, "unknown subscription"),
        (7, "subscription has ended"),
    ]
    assert d13.startswith("malformed JSON")
    assert result.deferred == 1
    line = dead_letter_to_json_line(result.dead_letters[3])
    assert orjson.loads(line)["event"]["subscription_id"] == "ghost"


def test_output_is_byte_identical_across_runs_and_input_orders(tmp_path):
    cat, evs = write(tmp_path)
    until = parse_timestamp(UNTIL)
    first = render(rate_streams(cat, evs, until))
    assert first == render(rate_streams(cat, evs, until))
    rnd = random.Random(7)
    for i in range(5):
        # any order of lines, as long as same-timestamp events keep their relative
        # order (that order is meaningful: e.g. a retried usage event)
        shuffled = list(EVENTS)
        rnd.shuffle(shuffled)
        d = tmp_path / f"run{i}"
        d.mkdir()
        cat2, evs2 = write(d, shuffled)
        assert render(rate_streams(cat2, evs2, until)) == first


def test_accepts_open_files(tmp_path):
    cat, evs = write(tmp_path)
    until = parse_timestamp(UNTIL)
    with open(cat) as c, open(evs, "rb") as e:
        a = render(rate_streams(c, e, until))
    b = render(rate_streams(io.StringIO(cat.read_text()), io.StringIO(evs.read_text()), until))
    assert a == b == render(rate_streams(str(cat), str(evs), until))


def test_invalid_catalog_raises(tmp_path):
    bad = {
        "plans": [
            {
                "plan_id": "p",
                "currency": "EUR",
                "interval": "month",
                "charges": [{"charge_id": "x", "model": "magic"}],
            }
        ]
    }
    cat, evs = write(tmp_path, catalog=bad)
    with pytest.raises(CatalogError, match="unknown model"):
        rate_streams(cat, evs, parse_timestamp(UNTIL))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CatalogError, match="not valid JSON"):
        rate_streams(tmp_path / "broken.json", evs, parse_timestamp(UNTIL))


def test_parse_timestamp():
    assert parse_timestamp("2026-01-31T10:00:00Z").isoformat() == "2026-01-31T10:00:00+00:00"
    assert parse_timestamp("2026-01-31T11:00:00+01:00") == parse_timestamp("2026-01-31T10:00:00Z")
    with pytest.raises(InvalidTimestamp):
        parse_timestamp("2026-01-31T10:00:00")
    with pytest.raises(InvalidTimestamp):
        parse_timestamp("soon")


def test_timestamps_in_output_keep_nonzero_microseconds(tmp_path):
    events = [
        ev(
            type="subscription.created",
            timestamp="2026-01-01T00:00:00.123400Z",
            account_id="a",
            subscription_id="s",
            plan_id="starter",
        ),
    ]
    cat, evs = write(tmp_path, events)
    [inv] = rate_streams(cat, evs, parse_timestamp("2026-01-15T00:00:00Z")).invoices
    d = orjson.loads(invoice_to_json_line(inv))
    assert d["issued_at"] == "2026-01-01T00:00:00.123400Z"
    assert d["lines"][0]["period_end"] == "2026-02-01T00:00:00.123400Z"
