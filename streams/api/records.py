"""JSON request items -> Avro records, driven by the same Avro schemas the topics use.

One field analysis serves both directions: converting and validating a client's JSON
(every error reported, per field) and describing the request body as JSON Schema for the
OpenAPI document, so the document cannot drift from what the server accepts. Pure: no
I/O, the clock is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

import orjson

from streams.codec import load_schema_json
from streams.config import SCHEMAS_DIR
from streams.domain.money import UnknownCurrency, minor_units
from streams.domain.timestamps import InvalidTimestamp, parse_timestamp
from streams.domain.validation import EARLIEST, MAX_FUTURE, quantity_problem

MAX_STRING = 256
MAX_USAGE_BATCH = 1000
SUBSCRIPTION_TYPES = (
    "subscription.created", "subscription.plan_changed", "subscription.cancelled",
    "subscription.paused", "subscription.resumed", "coupon.applied",
)  # fmt: skip
CANCEL_MODES = ("immediate", "end_of_period")
COUPON_DURATIONS = ("once", "repeating", "forever")
COUPON_FIELDS = ("coupon_id", "percent_off", "amount_off", "duration", "periods")
CREDIT_FIELDS = ("credit_id", "currency", "amount")
CUSTOMER_EVENT_FIELDS = ("country", "tax_exempt", "grace_hours")
# usage properties (rating contract v2, unique_count): at most this many per event; a
# value that is not a string travels as "\0" + its JSON (the domain's form), at most
# MAX_PROPERTY_JSON characters of it
MAX_PROPERTIES = 32
MAX_PROPERTY_JSON = 1024
# a decimal string field (money and percentages kept with their digits as written)
DECIMAL_STRING = (27, 9)  # (precision, scale): 18 integer and 9 fraction digits at most
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
    # string | timestamp | decimal | boolean | int | properties (a map of strings) |
    # decimal_string (a string holding a decimal: Rules.decimals)
    kind: str
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
        elif self.kind in ("decimal", "decimal_string"):
            base = {"type": "string", "pattern": self.pattern()}
        elif self.kind == "properties":
            base = {
                "type": "object",
                "maxProperties": MAX_PROPERTIES,
                "propertyNames": {"minLength": 1, "maxLength": MAX_STRING},
                "additionalProperties": {"maxLength": MAX_STRING},
                "description": "rating contract v2 (unique_count): property name -> any JSON "
                "value; a string of at most 256 characters, any other value at most "
                f"{MAX_PROPERTY_JSON} characters of JSON; null values are left out",
            }
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
    if isinstance(t, dict) and t.get("type") == "map" and t.get("values") == "string":
        return Field(name, "properties", nullable, required)
    raise ValueError(f"no JSON mapping for Avro type {t!r} of {avro['name']}")


@cache
def schema_fields(schema_name: str) -> tuple[Field, ...]:
    raw = load_schema_json(SCHEMAS_DIR / f"{schema_name}.avsc")
    return tuple(_field(f) for f in raw["fields"])


class ItemErrors(list[str]):
    """The errors of one request item, each naming its field."""


@dataclass(frozen=True)
class Rules:
    """Endpoint rules beyond the Avro types: enumerations and domain checks, and how the
    endpoint reads the schema's fields: ``excluded`` ones are not the client's (null in
    the record, refused as unknown), ``required`` optional ones it must give (not null),
    ``decimals`` strings holding a decimal (checked as such, kept as written)."""

    enums: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], list[str]] = lambda record: []
    excluded: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    decimals: tuple[str, ...] = ()


NO_RULES = Rules()


def endpoint_fields(schema_name: str, rules: Rules = NO_RULES) -> tuple[Field, ...]:
    """The schema's fields as an endpoint reads them (``Rules``), the excluded left out."""
    precision, scale = DECIMAL_STRING
    out = []
    for f in schema_fields(schema_name):
        if f.name in rules.excluded:
            continue
        if f.name in rules.required:
            f = replace(f, nullable=False, required=True)
        if f.name in rules.decimals:
            f = replace(f, kind="decimal_string", precision=precision, scale=scale)
        out.append(f)
    return tuple(out)


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


def _properties(f: Field, value: Any, errors: ItemErrors) -> dict[str, str] | None:
    """A usage event's properties in the domain's form (``streams.domain.events``): a
    string as it is, any other JSON value "\\0" + its JSON with sorted keys, null values
    left out."""
    if not isinstance(value, dict):
        errors.append(f"{f.name}: an object of property names to values")
        return None
    if len(value) > MAX_PROPERTIES:
        errors.append(f"{f.name}: at most {MAX_PROPERTIES} properties")
        return None
    out = {}
    for k, v in value.items():
        if not 1 <= len(k) <= MAX_STRING:
            errors.append(f"{f.name}: a property name of 1 to {MAX_STRING} characters")
        elif isinstance(v, str):
            if len(v) > MAX_STRING:
                errors.append(
                    f"{f.name}: the value of {k!r} is longer than {MAX_STRING} characters"
                )
            out[k] = v
        elif v is not None:
            try:
                text = "\0" + orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
            except TypeError:  # (orjson.JSONEncodeError too) not from a JSON body
                errors.append(f"{f.name}: the value of {k!r} is not a JSON value")
                continue
            if len(text) > MAX_PROPERTY_JSON + 1:
                errors.append(
                    f"{f.name}: the value of {k!r} is longer than {MAX_PROPERTY_JSON} "
                    "characters of JSON"
                )
            out[k] = text
    return out


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
    rules: Rules = NO_RULES,
) -> tuple[dict[str, Any] | None, ItemErrors]:
    """A client's JSON object -> the Avro record, or None with every error found.

    ``server_fields`` are set by the server and refused from clients; ``defaults`` fill
    fields a client may leave out; ``rules`` say how the endpoint reads the fields."""
    errors = ItemErrors()
    server_fields = server_fields or {}
    defaults = defaults or {}
    if not isinstance(item, dict):
        return None, ItemErrors(["must be a JSON object"])
    fields = endpoint_fields(schema_name, rules)
    known = {f.name for f in fields} - server_fields.keys()
    errors.extend(f"{k}: unknown field" for k in sorted(item.keys() - known))
    record: dict[str, Any] = dict(server_fields)
    record.update((name, None) for name in rules.excluded if name not in server_fields)
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
        elif f.kind == "decimal_string":
            record[f.name] = value if _decimal(f, value, errors) is not None else None
        elif f.kind == "properties":
            record[f.name] = _properties(f, value, errors)
        else:
            record[f.name] = _timestamp(f, value, now, errors)
    return (None if errors else record), errors


# --- what each endpoint adds to the schema's own rules ------------------------------


def subscription_rules(plan_refusal: Callable[[str], str | None]) -> Rules:
    """POST /v1/subscriptions: a subscription's events (created, plan_changed, cancelled,
    paused, resumed, coupon.applied). Credits and customer updates have routes of their
    own: their fields are not this route's. plan_refusal: why a plan id cannot be taken
    (unknown, retired), None if it can."""

    def check(e: dict[str, Any]) -> list[str]:
        errors = []
        kind = e["type"]
        if kind not in SUBSCRIPTION_TYPES:
            errors.append(f"type: one of {', '.join(SUBSCRIPTION_TYPES)}")
        if kind in ("subscription.created", "subscription.plan_changed"):
            if e["plan_id"] is None:
                errors.append(f"plan_id: required for {kind}")
            elif (refusal := plan_refusal(e["plan_id"])) is not None:
                errors.append(f"plan_id: {refusal}")
        if kind == "subscription.cancelled" and e["mode"] not in CANCEL_MODES:
            errors.append(f"mode: one of {', '.join(CANCEL_MODES)} for a cancellation")
        if kind != "subscription.cancelled" and e["mode"] is not None:
            errors.append("mode: only for subscription.cancelled")
        if kind == "coupon.applied":
            errors.extend(_coupon_problems(e))
        else:
            errors.extend(f"{name}: only for coupon.applied" for name in COUPON_FIELDS
                          if e[name] is not None)  # fmt: skip
        errors.extend(_payment_method_problems(e["payment_method"]))
        return errors

    return Rules(
        enums={"type": SUBSCRIPTION_TYPES, "mode": CANCEL_MODES, "duration": COUPON_DURATIONS},
        check=check,
        excluded=CREDIT_FIELDS + CUSTOMER_EVENT_FIELDS,
        decimals=("percent_off", "amount_off"),
    )


def _coupon_problems(e: dict[str, Any]) -> list[str]:
    """The rating contract's coupon (19): exactly one of percent_off (0 < p <= 100) and
    amount_off (> 0); a duration; periods (>= 1) for a repeating coupon, and only then."""
    errors = []
    if e["coupon_id"] is None:
        errors.append("coupon_id: required for coupon.applied")
    percent, amount = e["percent_off"], e["amount_off"]
    if (percent is None) == (amount is None):
        errors.append("percent_off: exactly one of percent_off and amount_off")
    elif percent is not None and not 0 < Decimal(percent) <= 100:
        errors.append("percent_off: greater than 0 and at most 100")
    elif amount is not None and not Decimal(amount) > 0:
        errors.append("amount_off: must be greater than 0")
    duration = e["duration"]
    if duration not in COUPON_DURATIONS:
        errors.append(f"duration: one of {', '.join(COUPON_DURATIONS)} for a coupon")
    elif duration == "repeating" and e["periods"] is None:
        errors.append("periods: required for a repeating coupon")
    if e["periods"] is not None:
        if duration != "repeating":
            errors.append("periods: only for a repeating coupon")
        elif e["periods"] < 1:
            errors.append("periods: at least 1")
    return errors


def credit_rules() -> Rules:
    """POST /v1/credits: a credit.granted event (its account, currency, amount and
    credit_id); the other fields of the record are the server's or null."""
    client = ("account_id", *CREDIT_FIELDS)
    return Rules(
        check=_credit_check,
        excluded=tuple(f.name for f in schema_fields("subscription_event")
                       if f.name not in client and f.name not in CREDIT_SERVER_FIELDS),
        required=("currency", "amount"),
        decimals=("amount",),
    )  # fmt: skip


# what the server sets in a credit.granted record (an account event has no subscription)
CREDIT_SERVER_FIELDS = ("event_id", "type", "timestamp", "subscription_id")


def credit_server_fields(event_id: str, now: datetime) -> dict[str, Any]:
    return {"event_id": event_id, "type": "credit.granted", "timestamp": now,
            "subscription_id": ""}  # fmt: skip


def _credit_check(c: dict[str, Any]) -> list[str]:
    """The rating contract's credit (21): an amount > 0 in a known currency, with no more
    digits than the currency has (its digits are kept as written)."""
    errors = []
    currency, amount = c["currency"], Decimal(c["amount"])
    digits = None
    if not CURRENCY.fullmatch(currency):
        errors.append("currency: an ISO 4217 code such as EUR")
    else:
        try:
            digits = minor_units(currency)
        except UnknownCurrency:
            errors.append(f"currency: {currency!r} is not an ISO 4217 currency")
    if amount <= 0:
        errors.append("amount: must be greater than 0")
    elif digits is not None and amount.as_tuple().exponent < -digits:  # type: ignore[operator]
        errors.append(f"amount: at most {digits} decimal places in {currency}")
    return errors


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
CREDIT_RULES = credit_rules()


def validate(
    schema_name: str,
    rules: Rules,
    item: Any,
    now: datetime,
    server_fields: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Callable[[], Any]] | None = None,
) -> tuple[dict[str, Any] | None, list[str]]:
    record, errors = convert(schema_name, item, now, server_fields, defaults, rules)
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
    for f in endpoint_fields(schema_name, rules):
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


# --- plans: the body of POST /v1/plans (a plan as the catalog file writes one) -----------

PLAN_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")  # addressable as /v1/plans/{plan_id}
PLAN_KEYS = ("plan_id", "currency", "interval", "charges", "trial_days")
MAX_TRIAL_DAYS = 3660
EXISTING_MODES = ("keep", "next_period")  # as streams.catalog_history has them


def plan_body(body: Any) -> tuple[Any, str, list[str]]:
    """A POST /v1/plans body -> (the plan, its `existing`, []) or (None, "", the errors).
    The plan is parsed by the domain (``streams.domain.catalog.parse_plan``: what a catalog
    file's plan must be); the API also refuses keys the domain would ignore, and a plan id
    it could not address in a path."""
    from streams.domain.catalog import CatalogError, parse_plan

    if not isinstance(body, dict) or "plan" not in body:
        return None, "", ['the body must be {"plan": {...}, "existing": "keep"|"next_period"}']
    errors = [f"{k}: unknown field" for k in sorted(set(body) - {"plan", "existing"})]
    existing = body.get("existing", "keep")
    if existing not in EXISTING_MODES:
        errors.append(f"existing: one of {', '.join(EXISTING_MODES)}")
    raw = body["plan"]
    if not isinstance(raw, dict):
        return None, "", [*errors, "plan: must be an object"]
    errors += [f"plan.{k}: unknown field" for k in sorted(set(raw) - set(PLAN_KEYS))]
    plan_id = raw.get("plan_id")
    if isinstance(plan_id, str) and not PLAN_ID.fullmatch(plan_id):
        errors.append("plan.plan_id: 1 to 128 letters, digits and ._:@-")
    trial_days = raw.get("trial_days")
    if type(trial_days) is int and trial_days > MAX_TRIAL_DAYS:
        errors.append(f"plan.trial_days: at most {MAX_TRIAL_DAYS}")
    try:
        plan = parse_plan(raw, "plan")
    except CatalogError as exc:
        errors.append(str(exc))
        plan = None
    return (None, "", errors) if errors else (plan, existing, [])


def plan_schema() -> dict[str, Any]:
    """The JSON Schema of a plan in a POST /v1/plans body (its charges as a catalog file
    writes them: the server checks each one)."""
    return {
        "type": "object",
        "required": ["plan_id", "currency", "interval", "charges"],
        "additionalProperties": False,
        "properties": {
            "plan_id": {"type": "string", "pattern": PLAN_ID.pattern},
            "currency": {"type": "string", "description": "ISO 4217, e.g. EUR"},
            "interval": {"enum": ["month", "year"]},
            "charges": {
                "type": "array",
                "items": {"type": "object"},
                "description": "as in a catalog file: flat (amount), per_unit, graduated, "
                "volume, package or percentage (metric, aggregation and the model's prices); "
                "decimals as strings",
            },
            "trial_days": {"type": "integer", "minimum": 0, "maximum": MAX_TRIAL_DAYS},
        },
    }
