"""Coverage-guided fuzzing (atheris) of the ingestion API's request validation
(``streams.api.records``): JSON bodies mutated at the byte level. Validation must never
raise; a refused item gets errors that each name a field; an accepted one encodes with
its Avro schema and is accepted downstream too (the rating processor's decoder, the
priority lane's cancellation check). Any other outcome is a finding.

    .venv/bin/python fuzz/fuzz_api_records.py --write-seeds DIR    # a starting corpus
    .venv/bin/python fuzz/fuzz_api_records.py DIR -atheris_runs=200000

The first input byte picks the endpoint (subscriptions, usage, refunds) and the mode: the
rest is either the JSON body of one item as a client would send it (byte-level
mutations), or the bytes from which an item is built field by field (any JSON type,
decimal strings of any length, timestamps of any year and offset).
"""

from __future__ import annotations

from datetime import UTC, datetime

import atheris

with atheris.instrument_imports(include=["streams", "orjson"]):
    import orjson

    from streams.api import records
    from streams.codec import codec
    from streams.domain.cancellations import cancellation_problem
    from streams.rating_records import decode_input

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
PLANS = {"starter-eur", "pro-usd"}
SUB_RULES = records.subscription_rules(lambda plan: plan in PLANS)
DEFAULTS = {"event_id": lambda: "generated", "timestamp": lambda: NOW}


def _validate(endpoint: int, item: object) -> tuple[str, dict | None, list[str]]:
    if endpoint == 0:
        record, errors = records.validate(
            "subscription_event", SUB_RULES, item, NOW, defaults=DEFAULTS
        )
        return "subscription_event", record, errors
    if endpoint == 1:
        record, errors = records.validate("usage_event", records.USAGE_RULES, item, NOW)
        return "usage_event", record, errors
    record, errors = records.validate(
        "refund_request", records.REFUND_RULES, item, NOW, server_fields={"requested_at": NOW}
    )
    return "refund_request", record, errors


SCHEMA_OF = ("subscription_event", "usage_event", "refund_request")
PLAUSIBLE = {
    "type": ["subscription.created", "subscription.plan_changed", "subscription.cancelled"],
    "mode": ["immediate", "end_of_period"],
    "plan_id": sorted(PLANS),
    "currency": ["EUR", "USD", "JPY"],
    "payment_method": ["tok_visa"],
    "deactivate": [True, False],
}
MISSING = object()


def _digits(fdp: atheris.FuzzedDataProvider, most: int) -> str:
    n = fdp.ConsumeIntInRange(1, most)
    return "".join(str(fdp.ConsumeIntInRange(0, 9)) for _ in range(n))


def _value(fdp: atheris.FuzzedDataProvider, name: str) -> object:
    """One field's value, from the fuzzer's bytes: any JSON type, decimal strings of any
    length, timestamps of any year and offset, or a plausible value for the field."""
    kind = fdp.ConsumeIntInRange(0, 10)
    if kind == 0:
        return MISSING
    if kind == 1:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))
    if kind == 3:
        return fdp.ConsumeFloat()
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return None
    if kind == 6:
        sign = "-" if fdp.ConsumeBool() else ""
        frac = "." + _digits(fdp, 12) if fdp.ConsumeBool() else ""
        return sign + _digits(fdp, 40) + frac
    if kind == 7:
        y, mo, d = (fdp.ConsumeIntInRange(0, 9999), fdp.ConsumeIntInRange(0, 13),
                    fdp.ConsumeIntInRange(0, 32))  # fmt: skip
        h, mi, sec = (fdp.ConsumeIntInRange(0, 24), fdp.ConsumeIntInRange(0, 60),
                      fdp.ConsumeIntInRange(0, 60))  # fmt: skip
        frac = "." + _digits(fdp, 7) if fdp.ConsumeBool() else ""
        offset = fdp.PickValueInList(["Z", "z", "+00:00", "+14:00", "-12:00", "+05:30", ""])
        return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}{frac}{offset}"
    if kind == 8:
        near = fdp.ConsumeIntInRange(-400 * 86400, 2 * 86400)
        return datetime.fromtimestamp(NOW.timestamp() + near, UTC).isoformat()
    if name in PLAUSIBLE:
        return fdp.PickValueInList(PLAUSIBLE[name])
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(1, 12)) or "x"


def _structured(endpoint: int, data: bytes) -> object:
    """An item built field by field, then through JSON as the API would receive it."""
    fdp = atheris.FuzzedDataProvider(data)
    item = {}
    for f in records.schema_fields(SCHEMA_OF[endpoint]):
        value = _value(fdp, f.name)
        if value is not MISSING:
            item[f.name] = value
    if fdp.ConsumeBool():
        item[fdp.ConsumeUnicodeNoSurrogates(4)] = _value(fdp, "")
    try:
        return orjson.loads(orjson.dumps(item))
    except orjson.JSONEncodeError:  # e.g. integers beyond 64 bits: not JSON orjson reads
        return MISSING


def test_one_input(data: bytes) -> None:
    if not data:
        return
    endpoint, structured = data[0] % 3, data[0] // 3 % 2
    if structured:
        item = _structured(endpoint, data[1:])
        if item is MISSING:
            return
    else:
        try:
            item = orjson.loads(data[1:])
        except orjson.JSONDecodeError:
            return  # the API answers 400 malformed_json before validating
    schema, record, errors = _validate(endpoint, item)
    if record is None:
        known = {f.name for f in records.schema_fields(schema)}
        keys = set(item) if isinstance(item, dict) else set()
        if not errors:
            raise AssertionError("refused without an error")
        for error in errors:
            name, sep, _ = error.partition(": ")
            if error != "must be a JSON object" and not (sep and name in known | keys):
                raise AssertionError(f"error without its field: {error!r}")
        return
    value = codec(schema).encode(record)
    if codec(schema).decode(value) != record:
        raise AssertionError(f"Avro changed the record {record!r}")
    if schema == "refund_request":
        return
    if schema == "subscription_event" and record["type"] == "subscription.cancelled":
        problem = cancellation_problem(codec(schema).decode(value), NOW_MS)
        if problem is not None:
            raise AssertionError(f"accepted, then dead-lettered by the lane: {problem!r}")
    # the version-2 rater's decoding: the API accepts version 2's events too
    error = decode_input(value, schema == "usage_event", NOW_MS, contract=2)[2]
    if error is not None:
        raise AssertionError(f"accepted, then dead-lettered by rating: {error!r}")


def seeds() -> list[bytes]:
    bodies = [
        (0, {"type": "subscription.created", "account_id": "acme-1", "subscription_id": "s-1",
             "plan_id": "pro-usd", "payment_method": "tok_visa",
             "timestamp": "2026-11-24T11:00:00Z"}),
        (0, {"type": "subscription.cancelled", "account_id": "acme-1", "subscription_id": "s-1",
             "mode": "immediate"}),
        (1, {"event_id": "u-1", "timestamp": "2026-11-24T11:00:00.5+01:00",
             "account_id": "acme-1", "subscription_id": "s-1", "metric": "api_calls",
             "quantity": "12.5"}),
        (2, {"refund_id": "r-1", "invoice_id": "i-1", "account_id": "acme-1",
             "amount": "10.00", "currency": "EUR", "deactivate": False}),
    ]  # fmt: skip
    return [bytes([n]) + orjson.dumps(body) for n, body in bodies]


if __name__ == "__main__":
    from harness import main  # fuzz/harness.py, next to this script

    main(seeds, test_one_input)
