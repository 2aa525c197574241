"""The price catalog: plans and their charges, validated once at load time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from streams.domain.money import InvalidDecimal, UnknownCurrency, minor_units, parse_decimal
from streams.domain.periods import Interval

DEFAULT_LATE_USAGE_PERIODS = 2


class CatalogError(ValueError):
    """The catalog is invalid; the message names the offending JSON path."""


class UnknownPlan(KeyError):
    def __init__(self, plan_id: str) -> None:
        super().__init__(plan_id)
        self.plan_id = plan_id

    def __str__(self) -> str:  # KeyError would repr() the argument
        return f"unknown plan {self.plan_id!r}"


class Aggregation(StrEnum):
    SUM = "sum"
    MAX = "max"
    COUNT = "count"
    LATEST = "latest"  # v2: the quantity of the latest event (by timestamp)
    UNIQUE_COUNT = "unique_count"  # v2: distinct values of properties[unique_field]


# the aggregations of version 1 of the contract: all the streaming rater handles yet
V1_AGGREGATIONS = frozenset({Aggregation.SUM, Aggregation.MAX, Aggregation.COUNT})


@dataclass(frozen=True, slots=True)
class Tier:
    up_to: Decimal | None  # inclusive upper bound; None = unbounded
    unit_amount: Decimal
    flat_amount: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class FlatCharge:
    charge_id: str
    amount: Decimal
    model: str = "flat"


@dataclass(frozen=True, slots=True)
class PerUnitCharge:
    charge_id: str
    metric: str
    aggregation: Aggregation
    unit_amount: Decimal
    model: str = "per_unit"
    unique_field: str | None = None  # the property a unique_count counts


@dataclass(frozen=True, slots=True)
class GraduatedCharge:
    charge_id: str
    metric: str
    aggregation: Aggregation
    tiers: tuple[Tier, ...]
    model: str = "graduated"
    unique_field: str | None = None  # the property a unique_count counts


@dataclass(frozen=True, slots=True)
class VolumeCharge:
    charge_id: str
    metric: str
    aggregation: Aggregation
    tiers: tuple[Tier, ...]
    model: str = "volume"
    unique_field: str | None = None  # the property a unique_count counts


@dataclass(frozen=True, slots=True)
class PackageCharge:
    charge_id: str
    metric: str
    aggregation: Aggregation
    package_size: Decimal
    package_amount: Decimal
    model: str = "package"
    unique_field: str | None = None  # the property a unique_count counts


@dataclass(frozen=True, slots=True)
class PercentageCharge:
    """v2: Q x rate + N x fixed_amount (Q the summed quantity, N the counted events)."""

    charge_id: str
    metric: str
    aggregation: Aggregation  # always SUM
    rate: Decimal
    fixed_amount: Decimal = Decimal(0)
    model: str = "percentage"
    unique_field: str | None = None


UsageCharge = PerUnitCharge | GraduatedCharge | VolumeCharge | PackageCharge | PercentageCharge
Charge = FlatCharge | UsageCharge


@dataclass(frozen=True, slots=True)
class Plan:
    plan_id: str
    currency: str
    interval: Interval
    charges: tuple[Charge, ...]
    trial_days: int = 0  # v2
    version: int = 1  # v2: the catalog file's plans are version 1; plan.published adds more
    # derived from `charges` once (plans are immutable), read on every usage event
    _flat: tuple[FlatCharge, ...] = field(init=False, repr=False, compare=False)
    _usage: tuple[UsageCharge, ...] = field(init=False, repr=False, compare=False)
    _aggs: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        flat = tuple(c for c in self.charges if isinstance(c, FlatCharge))
        usage = tuple(c for c in self.charges if not isinstance(c, FlatCharge))
        aggs: dict[str, list[str]] = {}
        for c in usage:
            names = aggs.setdefault(c.metric, [])
            for name in aggregation_keys(c):
                if name not in names:
                    names.append(name)
        object.__setattr__(self, "_flat", flat)
        object.__setattr__(self, "_usage", usage)
        object.__setattr__(self, "_aggs", MappingProxyType({m: tuple(a) for m, a in aggs.items()}))

    @property
    def flat_charges(self) -> tuple[FlatCharge, ...]:
        return self._flat

    @property
    def usage_charges(self) -> tuple[UsageCharge, ...]:
        return self._usage

    def aggregations(self) -> dict[str, tuple[Aggregation, ...]]:
        """metric -> the aggregations some charge of this plan needs (in charge order)."""
        return {
            m: tuple(Aggregation(a.split(":")[0]) for a in aggs) for m, aggs in self._aggs.items()
        }

    def uses_only_v1(self) -> bool:
        """No trial and only version-1 charge models and aggregations."""
        return self.trial_days == 0 and all(
            not isinstance(c, PercentageCharge) and c.aggregation in V1_AGGREGATIONS
            for c in self._usage
        )

    def aggregation_names(self) -> Mapping[str, tuple[str, ...]]:
        """Like aggregations(), as the keys of aggregation_keys(); computed once, read-only."""
        return self._aggs


def aggregation_keys(charge: UsageCharge) -> tuple[str, ...]:
    """The aggregates a charge is priced from: its aggregation ("unique_count:<field>" for a
    unique count); a percentage needs the sum and the number of events."""
    if isinstance(charge, PercentageCharge):
        return (Aggregation.SUM.value, Aggregation.COUNT.value)
    if charge.aggregation is Aggregation.UNIQUE_COUNT:
        return (f"unique_count:{charge.unique_field}",)
    return (charge.aggregation.value,)


def aggregation_key(charge: UsageCharge) -> str:
    """The one aggregate a charge's line quantity is (the sum for a percentage)."""
    hit = _AGGREGATION_KEYS.get(id(charge))
    if hit is not None and hit[0] is charge:
        return hit[1]
    key = aggregation_keys(charge)[0]
    if len(_AGGREGATION_KEYS) >= 65_536:
        _AGGREGATION_KEYS.clear()
    _AGGREGATION_KEYS[id(charge)] = (charge, key)
    return key


# id -> (the charge, kept alive; its key): charges are immutable, and hashing one walks it
_AGGREGATION_KEYS: dict[int, tuple[UsageCharge, str]] = {}


@dataclass(frozen=True, slots=True)
class Catalog:
    plans: Mapping[str, Plan]
    tax_rates: Mapping[str, Decimal] = field(default_factory=dict)  # v2: country -> rate
    late_usage_periods: int = DEFAULT_LATE_USAGE_PERIODS  # v2

    def plan(self, plan_id: str) -> Plan:
        try:
            return self.plans[plan_id]
        except KeyError:
            raise UnknownPlan(plan_id) from None

    def __contains__(self, plan_id: object) -> bool:
        return plan_id in self.plans

    @classmethod
    def from_dict(cls, d: Any) -> Catalog:
        if not isinstance(d, dict):
            raise CatalogError("catalog: must be a JSON object with a 'plans' list")
        plans_raw = d.get("plans")
        if not isinstance(plans_raw, list):
            raise CatalogError("catalog.plans: must be a list")
        plans: dict[str, Plan] = {}
        for i, p in enumerate(plans_raw):
            plan = _parse_plan(p, f"plans[{i}]")
            if plan.plan_id in plans:
                raise CatalogError(f"plans[{i}].plan_id: duplicate plan_id {plan.plan_id!r}")
            plans[plan.plan_id] = plan
        return cls(plans, _parse_tax_rates(d.get("tax_rates", [])), _late_usage_periods(d))

    def uses_only_v1(self) -> bool:
        return not self.tax_rates and all(p.uses_only_v1() for p in self.plans.values())


def is_country(value: object) -> bool:
    """ISO 3166-1 alpha-2 in form: two capital letters A-Z."""
    return isinstance(value, str) and len(value) == 2 and value.isascii() and value.isupper()


def _parse_tax_rates(raw: Any) -> dict[str, Decimal]:
    if not isinstance(raw, list):
        raise CatalogError("catalog.tax_rates: must be a list")
    rates: dict[str, Decimal] = {}
    for i, r in enumerate(raw):
        path = f"tax_rates[{i}]"
        if not isinstance(r, dict):
            raise CatalogError(f"{path}: must be an object")
        extra = sorted(set(r) - {"country", "rate"})
        if extra:
            raise CatalogError(f"{path}: unknown key(s): {', '.join(extra)}")
        country = r.get("country")
        if not is_country(country):
            raise CatalogError(
                f"{path}.country: must be an ISO 3166-1 alpha-2 code, got {country!r}"
            )
        if country in rates:
            raise CatalogError(f"{path}.country: duplicate country {country!r}")
        rates[country] = _dec(r, "rate", path)
    return rates


def _late_usage_periods(d: dict) -> int:
    v = d.get("late_usage_periods", DEFAULT_LATE_USAGE_PERIODS)
    if type(v) is not int or v < 0:
        raise CatalogError(f"catalog.late_usage_periods: must be an integer >= 0, got {v!r}")
    return v


# --- validation -----------------------------------------------------------------

_USAGE_KEYS = {"charge_id", "model", "metric", "aggregation", "field"}
# Charges and tiers refuse unknown keys: a misspelt optional key ("flat_amout")
# would otherwise silently drop a fee.
_ALLOWED_KEYS = {
    "flat": {"charge_id", "model", "amount"},
    "per_unit": _USAGE_KEYS | {"unit_amount"},
    "graduated": _USAGE_KEYS | {"tiers"},
    "volume": _USAGE_KEYS | {"tiers"},
    "package": _USAGE_KEYS | {"package_size", "package_amount"},
    "percentage": _USAGE_KEYS | {"rate", "fixed_amount"},
}


def _str(d: dict, key: str, path: str) -> str:
    if key not in d:
        raise CatalogError(f"{path}: missing {key!r}")
    v = d[key]
    if not isinstance(v, str) or not v:
        raise CatalogError(f"{path}.{key}: must be a non-empty string")
    return v


def _dec(d: dict, key: str, path: str, *, positive: bool = False) -> Decimal:
    if key not in d:
        raise CatalogError(f"{path}: missing {key!r}")
    try:
        v = parse_decimal(d[key])
    except InvalidDecimal as e:
        raise CatalogError(f"{path}.{key}: {e}") from None
    if positive and v <= 0:
        raise CatalogError(f"{path}.{key}: must be greater than 0")
    return v


def parse_plan(p: Any, path: str = "plan", version: int = 1) -> Plan:
    """One plan (as in the catalog's "plans" or a plan.published event); CatalogError names
    the offending path."""
    plan = _parse_plan(p, path)
    return plan if version == 1 else replace(plan, version=version)


def _parse_plan(p: Any, path: str) -> Plan:
    if not isinstance(p, dict):
        raise CatalogError(f"{path}: must be an object")
    plan_id = _str(p, "plan_id", path)
    currency = _str(p, "currency", path)
    try:
        minor_units(currency)
    except UnknownCurrency as e:
        raise CatalogError(f"{path}.currency: {e}") from None
    interval_raw = _str(p, "interval", path)
    try:
        interval = Interval(interval_raw)
    except ValueError:
        raise CatalogError(
            f"{path}.interval: must be 'month' or 'year', got {interval_raw!r}"
        ) from None
    charges_raw = p.get("charges")
    if not isinstance(charges_raw, list):
        raise CatalogError(f"{path}.charges: must be a list")
    charges: list[Charge] = []
    seen: set[str] = set()
    for j, c in enumerate(charges_raw):
        charge = _parse_charge(c, f"{path}.charges[{j}]")
        if charge.charge_id in seen:
            raise CatalogError(
                f"{path}.charges[{j}].charge_id: duplicate charge_id {charge.charge_id!r}"
            )
        seen.add(charge.charge_id)
        charges.append(charge)
    trial_days = p.get("trial_days", 0)
    if type(trial_days) is not int or trial_days < 0:
        raise CatalogError(f"{path}.trial_days: must be an integer >= 0, got {trial_days!r}")
    return Plan(plan_id, currency, interval, tuple(charges), trial_days)


def _parse_charge(c: Any, path: str) -> Charge:
    if not isinstance(c, dict):
        raise CatalogError(f"{path}: must be an object")
    charge_id = _str(c, "charge_id", path)
    model = _str(c, "model", path)
    if model not in _ALLOWED_KEYS:
        raise CatalogError(
            f"{path}.model: unknown model {model!r} "
            f"(expected one of {', '.join(sorted(_ALLOWED_KEYS))})"
        )
    extra = sorted(set(c) - _ALLOWED_KEYS[model])
    if extra:
        raise CatalogError(f"{path}: unknown key(s) for model {model!r}: {', '.join(extra)}")
    if model == "flat":
        return FlatCharge(charge_id, _dec(c, "amount", path))
    metric = _str(c, "metric", path)
    agg_raw = _str(c, "aggregation", path)
    try:
        agg = Aggregation(agg_raw)
    except ValueError:
        raise CatalogError(
            f"{path}.aggregation: must be one of {', '.join(a.value for a in Aggregation)}, "
            f"got {agg_raw!r}"
        ) from None
    unique_field = None
    if agg is Aggregation.UNIQUE_COUNT:
        unique_field = _str(c, "field", path)
    elif "field" in c:
        raise CatalogError(f"{path}.field: only a unique_count aggregation takes a field")
    if model == "per_unit":
        return PerUnitCharge(
            charge_id, metric, agg, _dec(c, "unit_amount", path), **_u(unique_field)
        )
    if model == "package":
        return PackageCharge(
            charge_id,
            metric,
            agg,
            _dec(c, "package_size", path, positive=True),
            _dec(c, "package_amount", path),
            **_u(unique_field),
        )
    if model == "percentage":
        if agg is not Aggregation.SUM:
            raise CatalogError(f"{path}.aggregation: a percentage charge aggregates with sum")
        fixed = _dec(c, "fixed_amount", path) if "fixed_amount" in c else Decimal(0)
        return PercentageCharge(charge_id, metric, agg, _dec(c, "rate", path), fixed)
    tiers = _parse_tiers(c.get("tiers"), f"{path}.tiers")
    if model == "graduated":
        return GraduatedCharge(charge_id, metric, agg, tiers, **_u(unique_field))
    return VolumeCharge(charge_id, metric, agg, tiers, **_u(unique_field))


def _u(unique_field: str | None) -> dict[str, str]:
    return {"unique_field": unique_field} if unique_field else {}


def _parse_tiers(raw: Any, path: str) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        raise CatalogError(f"{path}: must be a non-empty list")
    tiers: list[Tier] = []
    prev: Decimal = Decimal(0)
    for k, t in enumerate(raw):
        tpath = f"{path}[{k}]"
        if not isinstance(t, dict):
            raise CatalogError(f"{tpath}: must be an object")
        extra = sorted(set(t) - {"up_to", "unit_amount", "flat_amount"})
        if extra:
            raise CatalogError(f"{tpath}: unknown key(s): {', '.join(extra)}")
        if "up_to" not in t:
            raise CatalogError(f"{tpath}: missing 'up_to' (use null for the last tier)")
        last = k == len(raw) - 1
        if t["up_to"] is None:
            if not last:
                raise CatalogError(f"{tpath}.up_to: only the last tier may be unbounded (null)")
            up_to = None
        else:
            if last:
                raise CatalogError(f"{tpath}.up_to: the last tier must be unbounded (null)")
            up_to = _dec(t, "up_to", tpath, positive=True)
            if up_to <= prev:
                raise CatalogError(
                    f"{tpath}.up_to: tiers must be strictly increasing "
                    f"({up_to} is not greater than {prev})"
                )
            prev = up_to
        unit = _dec(t, "unit_amount", tpath)
        flat = _dec(t, "flat_amount", tpath) if "flat_amount" in t else Decimal(0)
        tiers.append(Tier(up_to, unit, flat))
    return tuple(tiers)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The catalog JSON of a plan: parse_plan's inverse (decimals as exact strings)."""
    charges = []
    for c in plan.charges:
        d: dict[str, Any] = {"charge_id": c.charge_id, "model": c.model}
        if isinstance(c, FlatCharge):
            d["amount"] = str(c.amount)
        else:
            d["metric"], d["aggregation"] = c.metric, c.aggregation.value
            if c.unique_field is not None:
                d["field"] = c.unique_field
            if isinstance(c, PerUnitCharge):
                d["unit_amount"] = str(c.unit_amount)
            elif isinstance(c, PackageCharge):
                d["package_size"], d["package_amount"] = str(c.package_size), str(c.package_amount)
            elif isinstance(c, PercentageCharge):
                d["rate"], d["fixed_amount"] = str(c.rate), str(c.fixed_amount)
            else:
                d["tiers"] = [
                    {"up_to": None if t.up_to is None else str(t.up_to),
                     "unit_amount": str(t.unit_amount), "flat_amount": str(t.flat_amount)}
                    for t in c.tiers
                ]  # fmt: skip
        charges.append(d)
    out: dict[str, Any] = {"plan_id": plan.plan_id, "currency": plan.currency,
                           "interval": plan.interval.value, "charges": charges}  # fmt: skip
    if plan.trial_days:
        out["trial_days"] = plan.trial_days
    return out
