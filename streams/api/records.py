"""JSON request items -> Avro records, driven by the same Avro schemas the topics use.

One field analysis serves both directions: converting and validating a client's JSON
(every error reported, per field) and describing the request body as JSON Schema for the
OpenAPI document, so the document cannot drift from what the server accepts. Pure: no
I/O, the clock is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

from streams.codec import load_schema_json
from streams.config import SCHEMAS_DIR
from streams.domain.timestamps import InvalidTimestamp, parse_timestamp
from streams.domain.validation import EARLIEST, MAX_FUTURE, quantity_problem

MAX_STRING = 256
MAX_USAGE_BATCH = 1000
SUBSCRIPTION_TYPES = ("subscription.created", "subscription.plan_changed", "subscription.cancelled")
CANCEL_MODES = ("immediate", "end_of_period")
RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
CURRENCY = re.compile(r"^[A-Z]{3}$")
COUNTRY = re.compile(r"^[A-Z]{2}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
INT_MIN, INT_MAX = -(2**31), 2**31 - 1  # Avro int
MAX_GRACE_HOURS = 24 * 90
# a card number (PAN) is never accepted where a gateway token belongs
CARD_NUMBER = re.compile(r"^[\d -]{12,23}$")


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # string | timestamp | decimal | boolean | int
    nullable: bool
    required: bool
    scale: int = 0
    precision: int = 0
    default: Any = None  # the Avro default of an optional field

    def pattern(self) -> str:
        whole = self.precision - self.scale
        return rf"^-?[0-9]{{1,{whole}}}(\.[0-9]{{1,{self.scale}}})?$"

    def json_schema(self) -> dict[str, Any]:
        base: dict[str, Any]
        if self.kind == "string":
            base = {"type": "string", "minLength": 1, "maxLength": MAX_STRING}
        elif self.kind == "timestamp":
            base = {"type": "string", "format": "date-time"}
        elif self.kind == "decimal":
            base = {"type": "string", "pattern": self.pattern()}
        elif self.kind == "int":
            base = {"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX}
        else:
            base = {"type": "boolean"}
        if self.nullable:
            base = {**base, "type": [base["type"], "null"]}
        if self.default is not None:
            base["default"] = self.default
        return base


def _field(avro: Mapping[str, Any]) -> Field:
    t = avro["type"]
    nullable = isinstance(t, list) and "null" in t
    if isinstance(t, list):
        (t,) = [x for x in t if x != "null"]
    required = "default" not in avro and not nullable
    name, default = avro["name"], avro.get("default")
    if t == "string":
        return Field(name, "string", nullable, required, default=default)
    if t == "boolean":
        return Field(name, "boolean", nullable, required, default=default)
    if t == "int":
        return Field(name, "int", nullable, required, default=default)
    if isinstance(t, dict) and t.get("logicalType") == "timestamp-micros":
        return Field(name, "timestamp", nullable, required)
    if isinstance(t, dict) and t.get("logicalType") == "decimal":
        return Field(name, "decimal", nullable, required, t["scale"], t["precision"])
    raise ValueError(f"no JSON mapping for Avro type {t!r} of {avro['name']}")


@cache
def schema_fields(schema_name: str) -> tuple[Field, ...]:
    raw = load_schema_json(SCHEMAS_DIR / f"{schema_name}.avsc")
    return tuple(_field(f) for f in raw["fields"])


class ItemErrors(list[str]):
    """The errors of one request item, each naming its field."""


def _decimal(f: Field, value: Any, errors: ItemErrors) -> Decimal | None:
    # money and quantities are strings: a JSON number would be a float on some clients
    if not isinstance(value, str) or not re.fullmatch(f.pattern(), value):
        errors.append(
            f"{f.name}: must be a decimal string with at most "
            f"{f.precision - f.scale} integer and {f.scale} fraction digits"
        )
        return None
    try:
        return Decimal(value)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        errors.append(f"{f.name}: not a decimal")
        return None


def _timestamp(f: Field, value: Any, now: datetime, errors: ItemErrors) -> datetime | None:
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        errors.append(f"{f.name}: an RFC 3339 timestamp with its offset, "
                      "e.g. 2026-01-31T10:00:00Z")  # fmt: skip
        return None
    try:
        ts = parse_timestamp(value.upper())
    except InvalidTimestamp as exc:
        errors.append(f"{f.name}: {exc}")
        return None
    if ts > now + MAX_FUTURE:
        errors.append(f"{f.name}: more than {MAX_FUTURE} in the future")
    elif ts < EARLIEST:
        errors.append(f"{f.name}: before {EARLIEST.date()}")
    return ts


def convert(
    schema_name: str,
    item: Any,
    now: datetime,
    server_fields: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Callable[[], Any]] | None = None,
) -> tuple[dict[str, Any] | None, ItemErrors]:
    """A client's JSON object -> the Avro record, or None with every error found.

    ``server_fields`` are set by the server and refused from clients; ``defaults`` fill
    fields a client may leave out."""
    errors = ItemErrors()
    server_fields = server_fields or {}
    defaults = defaults or {}
    if not isinstance(item, dict):
        return None, ItemErrors(["must be a JSON object"])
    fields = schema_fields(schema_name)
    known = {f.name for f in fields} - server_fields.keys()
    errors.extend(f"{k}: unknown field" for k in sorted(item.keys() - known))
    record: dict[str, Any] = dict(server_fields)
    for f in fields:
        if f.name in server_fields:
            continue
        value = item.get(f.name)
        if value is None:
            if f.name in defaults:
                record[f.name] = defaults[f.name]()
            elif f.required:
                errors.append(f"{f.name}: required")
            else:
                record[f.name] = f.default
            continue
        if f.kind == "string":
            if not isinstance(value, str) or not 1 <= len(value) <= MAX_STRING:
                errors.append(f"{f.name}: must be a string of 1 to {MAX_STRING} characters")
            record[f.name] = value
        elif f.kind == "boolean":
            if not isinstance(value, bool):
                errors.append(f"{f.name}: must be true or false")
            record[f.name] = value
        elif f.kind == "int":
            # (a JSON true is a Python int: refused like any other non-integer)
            if type(value) is not int or not INT_MIN <= value <= INT_MAX:
                errors.append(f"{f.name}: must be an integer from {INT_MIN} to {INT_MAX}")
            record[f.name] = value
        elif f.kind == "decimal":
            record[f.name] = _decimal(f, value, errors)
        else:
            record[f.name] = _timestamp(f, value, now, errors)
    return (None if errors else record), errors


# --- what each endpoint adds to the schema's own rules ------------------------------


@dataclass(frozen=True)
class Rules:
    """Endpoint rules beyond the Avro types: enumerations and domain checks."""

    enums: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], list[str]] = lambda record: []


def subscription_rules(plan_exists: Callable[[str], bool]) -> Rules:
    def check(e: dict[str, Any]) -> list[str]:
        errors = []
        kind = e["type"]
        if kind not in SUBSCRIPTION_TYPES:
            errors.append(f"type: one of {', '.join(SUBSCRIPTION_TYPES)}")
        if kind in ("subscription.created", "subscription.plan_changed"):
            if e["plan_id"] is None:
                errors.append(f"plan_id: required for {kind}")
            elif not plan_exists(e["plan_id"]):
                errors.append(f"plan_id: unknown plan {e['plan_id']!r}")
        if kind == "subscription.cancelled" and e["mode"] not in CANCEL_MODES:
            errors.append(f"mode: one of {', '.join(CANCEL_MODES)} for a cancellation")
        if kind != "subscription.cancelled" and e["mode"] is not None:
            errors.append("mode: only for subscription.cancelled")
        errors.extend(_payment_method_problems(e["payment_method"]))
        return errors

    return Rules(enums={"type": SUBSCRIPTION_TYPES, "mode": CANCEL_MODES}, check=check)


def _usage_check(e: dict[str, Any]) -> list[str]:
    problem = quantity_problem(e["quantity"])
    return [f"quantity: {problem}"] if problem else []


def _refund_check(r: dict[str, Any]) -> list[str]:
    errors = []
    if r["amount"] <= 0:
        errors.append("amount: must be positive")
    if not CURRENCY.fullmatch(r["currency"]):
        errors.append("currency: an ISO 4217 code such as EUR")
    return errors


def _customer_check(c: dict[str, Any]) -> list[str]:
    errors = []
    if c["country"] is not None and not COUNTRY.fullmatch(c["country"]):
        errors.append("country: an ISO 3166-1 alpha-2 code such as FR")
    if c["email"] is not None and not EMAIL.fullmatch(c["email"]):
        errors.append("email: not an email address")
    if not 0 <= c["grace_hours"] <= MAX_GRACE_HOURS:
        errors.append(f"grace_hours: from 0 to {MAX_GRACE_HOURS}")
    errors.extend(_payment_method_problems(c["payment_method"]))
    return errors


def _payment_method_problems(token: str | None) -> list[str]:
    if token is not None and CARD_NUMBER.fullmatch(token):
        return ["payment_method: card numbers are refused; send a gateway token"]
    return []


USAGE_RULES = Rules(check=_usage_check)
CUSTOMER_RULES = Rules(check=_customer_check)
REFUND_RULES = Rules(check=_refund_check)


def validate(
    schema_name: str,
    rules: Rules,
    item: Any,
    now: datetime,
    server_fields: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Callable[[], Any]] | None = None,
) -> tuple[dict[str, Any] | None, list[str]]:
    record, errors = convert(schema_name, item, now, server_fields, defaults)
    if record is None:
        return None, list(errors)
    problems = rules.check(record)
    return (None, problems) if problems else (record, [])


def body_schema(
    schema_name: str,
    rules: Rules,
    server_fields: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The JSON Schema of one request item."""
    props: dict[str, Any] = {}
    required = []
    for f in schema_fields(schema_name):
        if f.name in server_fields:
            continue
        prop = f.json_schema()
        if f.name in rules.enums:
            prop = {**prop, "enum": list(rules.enums[f.name]) + ([None] if f.nullable else [])}
        props[f.name] = prop
        if f.required and f.name not in optional:
            required.append(f.name)
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }
