"""Exact (unrounded) prices of usage charges and prorations.

Everything here returns the exact amount; the caller rounds once per line.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from streams.domain.catalog import (
    GraduatedCharge,
    PackageCharge,
    PercentageCharge,
    PerUnitCharge,
    Tier,
    UsageCharge,
    VolumeCharge,
)
from streams.domain.money import CTX, ZERO

_ONE_US = timedelta(microseconds=1)


def price_graduated(tiers: tuple[Tier, ...], quantity: Decimal) -> Decimal:
    """Each unit at its own tier's price; a tier's flat fee once the quantity reaches
    into it, i.e. exceeds the previous tier's up_to (0 for the first tier)."""
    amount = ZERO
    lower = ZERO
    for tier in tiers:
        if quantity <= lower:
            break
        upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
        units = CTX.subtract(upper, lower)
        amount = CTX.add(amount, CTX.add(CTX.multiply(units, tier.unit_amount), tier.flat_amount))
        if tier.up_to is None:
            break
        lower = tier.up_to
    return amount


def volume_tier(tiers: tuple[Tier, ...], quantity: Decimal) -> Tier | None:
    """The tier the whole quantity falls into; None for 0 (it reaches no tier)."""
    if quantity <= 0:
        return None
    for tier in tiers:
        if tier.up_to is None or quantity <= tier.up_to:
            return tier
    raise AssertionError("catalog validation guarantees an unbounded last tier")


def price_volume(tiers: tuple[Tier, ...], quantity: Decimal) -> Decimal:
    tier = volume_tier(tiers, quantity)
    if tier is None:
        return ZERO
    return CTX.add(CTX.multiply(quantity, tier.unit_amount), tier.flat_amount)


def packages(quantity: Decimal, package_size: Decimal) -> Decimal:
    """ceil(quantity / package_size), exactly (integer division + remainder, no
    rounded quotient)."""
    whole, rest = CTX.divmod(quantity, package_size)
    if not rest.is_zero():
        whole = CTX.add(whole, Decimal(1))
    return whole


def price_usage(charge: UsageCharge, quantity: Decimal, events: Decimal = ZERO) -> Decimal:
    """The exact price of `quantity` (and, for a percentage, of `events` counted events)."""
    if isinstance(charge, PerUnitCharge):
        return CTX.multiply(quantity, charge.unit_amount)
    if isinstance(charge, GraduatedCharge):
        return price_graduated(charge.tiers, quantity)
    if isinstance(charge, VolumeCharge):
        return price_volume(charge.tiers, quantity)
    if isinstance(charge, PackageCharge):
        return CTX.multiply(packages(quantity, charge.package_size), charge.package_amount)
    if isinstance(charge, PercentageCharge):
        return CTX.add(
            CTX.multiply(quantity, charge.rate), CTX.multiply(events, charge.fixed_amount)
        )
    raise TypeError(f"not a usage charge: {charge!r}")


def prorate(amount: Decimal, t: datetime, start: datetime, end: datetime) -> Decimal:
    """amount * (end - t) / (end - start), in exact integer microseconds.

    Multiplying before dividing keeps the only inexact step (a non-terminating
    quotient at 100 digits) far below the currency's minor unit.
    """
    if not start <= t <= end or start >= end:
        raise ValueError("need start <= t <= end and start < end")
    remaining = (end - t) // _ONE_US
    length = (end - start) // _ONE_US
    return CTX.divide(CTX.multiply(amount, Decimal(remaining)), Decimal(length))
