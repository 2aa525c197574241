import math
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.catalog import Aggregation, PackageCharge, PerUnitCharge, Tier
from streams.domain.money import round_money
from streams.domain.pricing import (
    packages,
    price_graduated,
    price_usage,
    price_volume,
    prorate,
)

from .helpers import D, ts

# 0..100 at 1.00, 100..1000 at 0.50 (+5 flat), >1000 at 0.10 (+20 flat)
TIERS = (
    Tier(D(100), D("1.00"), D(0)),
    Tier(D(1000), D("0.50"), D(5)),
    Tier(None, D("0.10"), D(20)),
)
# same, but with a flat fee on the first tier as well
TIERS_FIRST_FLAT = (Tier(D(10), D(2), D(3)), Tier(None, D(1), D(0)))


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("0", "0"),
        ("1", "1"),
        ("100", "100"),  # exactly at up_to: still tier 1, no tier-2 flat
        ("100.5", "105.25"),  # reaches tier 2 by a fraction: 100 + 0.5*0.5 + 5
        ("101", "105.5"),
        ("1000", "555"),  # 100 + 900*0.5 + 5, exactly at up_to
        ("1001", "575.1"),  # + 1*0.1 + 20
        ("2000", "675"),
    ],
)
def test_graduated(q, expected):
    assert price_graduated(TIERS, D(q)) == D(expected)


def test_graduated_first_tier_flat_only_when_reached():
    assert price_graduated(TIERS_FIRST_FLAT, D(0)) == 0
    assert price_graduated(TIERS_FIRST_FLAT, D("0.001")) == D("3.002")
    assert price_graduated(TIERS_FIRST_FLAT, D(10)) == D(23)
    assert price_graduated(TIERS_FIRST_FLAT, D(12)) == D(25)


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("0", "0"),  # reaches no tier: no flat either
        ("1", "1"),
        ("100", "100"),  # exactly at up_to: tier 1
        ("100.5", "55.25"),  # all units at 0.50, + 5
        ("1000", "505"),
        ("1001", "120.1"),  # all units at 0.10, + 20
    ],
)
def test_volume(q, expected):
    assert price_volume(TIERS, D(q)) == D(expected)


def test_volume_first_tier_flat():
    assert price_volume(TIERS_FIRST_FLAT, D(0)) == 0
    assert price_volume(TIERS_FIRST_FLAT, D(10)) == D(23)
    assert price_volume(TIERS_FIRST_FLAT, D(11)) == D(11)


@pytest.mark.parametrize(
    ("q", "size", "n"),
    [
        ("0", "100", 0),
        ("1", "100", 1),
        ("100", "100", 1),
        ("100.01", "100", 2),
        ("2.5", "1", 3),
        ("0.75", "0.25", 3),
        ("0.76", "0.25", 4),
    ],
)
def test_package_is_ceil(q, size, n):
    assert packages(D(q), D(size)) == n
    charge = PackageCharge("p", "m", Aggregation.SUM, D(size), D("9.99"))
    assert price_usage(charge, D(q)) == n * D("9.99")


def test_per_unit_is_exact_before_rounding():
    charge = PerUnitCharge("u", "m", Aggregation.SUM, D("0.0001"))
    exact = price_usage(charge, D(125))
    assert exact == D("0.0125")
    assert round_money(exact, "EUR") == D("0.01")  # half-even, rounded once
    assert round_money(price_usage(charge, D(135)), "EUR") == D("0.01")  # 0.0135 -> 0.01
    assert round_money(price_usage(charge, D(150)), "EUR") == D("0.02")  # 0.015 -> 0.02


def test_prorate_exact_fraction():
    start, end = ts("2026-01-31T10:00:00"), ts("2026-02-28T10:00:00")
    t = start + timedelta(days=7)
    # 21 of 28 days remain
    assert prorate(D(10), t, start, end) == D("7.5")
    # two of three seconds remain: the exact 20/3 rounds to 6.67
    two_thirds = prorate(
        D(10), ts("2026-01-01T00:00:01"), ts("2026-01-01T00:00:00"), ts("2026-01-01T00:00:03")
    )
    assert round_money(two_thirds, "EUR") == D("6.67")
    # microsecond precision, no float seconds
    p = prorate(D(1000000), start + timedelta(microseconds=1), start, start + timedelta(seconds=1))
    assert p == D("999999")


quantities = st.decimals(min_value=0, max_value=10**7, places=3, allow_nan=False)
amounts = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False)


@st.composite
def tier_lists(draw):
    n = draw(st.integers(1, 5))
    bounds = sorted(
        draw(
            st.sets(
                st.decimals(min_value="0.001", max_value=10**6, places=3),
                min_size=n - 1,
                max_size=n - 1,
            )
        )
    )
    ups = [*bounds, None]
    return tuple(Tier(u, draw(amounts), draw(amounts)) for u in ups)


@settings(max_examples=100, deadline=None)
@given(tier_lists(), quantities, quantities)
def test_graduated_monotone(tiers, a, b):
    lo, hi = min(a, b), max(a, b)
    assert price_graduated(tiers, lo) <= price_graduated(tiers, hi)


@settings(max_examples=100, deadline=None)
@given(tier_lists(), quantities)
def test_graduated_bounded_by_dearest_tier(tiers, q):
    dearest = max(t.unit_amount for t in tiers)
    cheapest = min(t.unit_amount for t in tiers)
    flats = sum(t.flat_amount for t in tiers)
    price = price_graduated(tiers, q)
    assert q * cheapest <= price <= q * dearest + flats


@settings(max_examples=100, deadline=None)
@given(tier_lists(), quantities)
def test_single_tier_graduated_equals_volume_equals_per_unit(tiers, q):
    one = (Tier(None, tiers[0].unit_amount, Decimal(0)),)
    assert price_graduated(one, q) == price_volume(one, q) == q * tiers[0].unit_amount


@settings(max_examples=150, deadline=None)
@given(quantities, st.decimals(min_value="0.001", max_value=10**5, places=3))
def test_package_equals_ceil(q, size):
    assert packages(q, size) == math.ceil(Fraction(q) / Fraction(size))
