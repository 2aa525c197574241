import copy

import pytest

from streams.domain.catalog import (
    Catalog,
    CatalogError,
    FlatCharge,
    GraduatedCharge,
    Tier,
    UnknownPlan,
)
from streams.domain.periods import Interval

from .helpers import CATALOG, D


def with_charge(charge: dict, **plan_overrides) -> dict:
    plan = {"plan_id": "p", "currency": "EUR", "interval": "month", "charges": [charge]}
    plan.update(plan_overrides)
    return {"plans": [plan]}


GRAD = {
    "charge_id": "g",
    "model": "graduated",
    "metric": "m",
    "aggregation": "sum",
    "tiers": [
        {"up_to": "10", "unit_amount": "1"},
        {"up_to": None, "unit_amount": "0.5", "flat_amount": "2"},
    ],
}


def test_parses_all_models():
    cat = Catalog.from_dict(CATALOG)
    basic = cat.plan("basic")
    assert basic.currency == "EUR" and basic.interval is Interval.MONTH
    assert basic.flat_charges == (FlatCharge("base", D("10.00")),)
    assert [c.charge_id for c in basic.usage_charges] == ["api", "seats"]
    g = Catalog.from_dict(with_charge(GRAD)).plan("p").charges[0]
    assert isinstance(g, GraduatedCharge)
    assert g.tiers == (Tier(D(10), D(1), D(0)), Tier(None, D("0.5"), D(2)))


def test_unknown_plan():
    with pytest.raises(UnknownPlan, match="unknown plan 'nope'"):
        Catalog.from_dict(CATALOG).plan("nope")
    with pytest.raises(KeyError):  # usable as a KeyError too
        Catalog.from_dict(CATALOG).plan("nope")


def tiers(*ts):
    g = copy.deepcopy(GRAD)
    g["tiers"] = list(ts)
    return with_charge(g)


@pytest.mark.parametrize(
    ("catalog", "message"),
    [
        ([], "must be a JSON object"),
        ({"plans": {}}, "plans: must be a list"),
        (with_charge({"charge_id": "x", "model": "magic"}), "unknown model 'magic'"),
        (with_charge({"charge_id": "x", "model": "flat", "amount": "-1"}), "negative"),
        (with_charge({"charge_id": "x", "model": "flat", "amount": 1.5}), "JSON float"),
        (with_charge({"charge_id": "x", "model": "flat"}), "missing 'amount'"),
        (
            with_charge({"charge_id": "x", "model": "flat", "amount": "1", "amout": "2"}),
            "unknown key",
        ),
        (with_charge({"charge_id": "x", "model": "flat", "amount": "1"}, currency="XYZ"), "XYZ"),
        (with_charge({"charge_id": "x", "model": "flat", "amount": "1"}, interval="week"), "week"),
        (
            {
                "plans": [
                    {"plan_id": "p", "currency": "EUR", "interval": "month", "charges": []},
                    {"plan_id": "p", "currency": "EUR", "interval": "month", "charges": []},
                ]
            },
            "duplicate plan_id",
        ),
        (
            {
                "plans": [
                    {
                        "plan_id": "p",
                        "currency": "EUR",
                        "interval": "month",
                        "charges": [
                            {"charge_id": "x", "model": "flat", "amount": "1"},
                            {"charge_id": "x", "model": "flat", "amount": "2"},
                        ],
                    }
                ]
            },
            "duplicate charge_id",
        ),
        (
            tiers(
                {"up_to": "10", "unit_amount": "1"},
                {"up_to": "10", "unit_amount": "1"},
                {"up_to": None, "unit_amount": "1"},
            ),
            "strictly increasing",
        ),
        (
            tiers(
                {"up_to": "10", "unit_amount": "1"},
                {"up_to": "5", "unit_amount": "1"},
                {"up_to": None, "unit_amount": "1"},
            ),
            "strictly increasing",
        ),
        (tiers({"up_to": "10", "unit_amount": "1"}), "last tier must be unbounded"),
        (
            tiers({"up_to": None, "unit_amount": "1"}, {"up_to": None, "unit_amount": "1"}),
            "only the last tier",
        ),
        (tiers({"up_to": "0", "unit_amount": "1"}, {"up_to": None, "unit_amount": "1"}), "> 0"),
        (tiers({"unit_amount": "1"}), "missing 'up_to'"),
        (tiers({"up_to": None, "unit_amount": "-0.1"}), "negative"),
        (tiers({"up_to": None, "unit_amount": "1", "flat_amount": "-2"}), "negative"),
        (tiers(), "non-empty list"),
        (
            with_charge(
                {
                    "charge_id": "k",
                    "model": "package",
                    "metric": "m",
                    "aggregation": "sum",
                    "package_size": "0",
                    "package_amount": "1",
                }
            ),
            "greater than 0",
        ),
        (
            with_charge(
                {
                    "charge_id": "k",
                    "model": "per_unit",
                    "metric": "m",
                    "aggregation": "avg",
                    "unit_amount": "1",
                }
            ),
            "aggregation",
        ),
    ],
)
def test_validation_errors(catalog, message):
    with pytest.raises(CatalogError) as err:
        Catalog.from_dict(catalog)
    assert message.replace("> 0", "greater than 0") in str(err.value)


def test_error_names_the_path():
    bad = tiers(
        {"up_to": "10", "unit_amount": "1"},
        {"up_to": "5", "unit_amount": "1"},
        {"up_to": None, "unit_amount": "1"},
    )
    with pytest.raises(CatalogError, match=r"plans\[0\]\.charges\[0\]\.tiers\[1\]\.up_to"):
        Catalog.from_dict(bad)
