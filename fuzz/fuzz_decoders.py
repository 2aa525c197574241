"""Coverage-guided fuzzing (atheris) of every decoder a processor runs on Kafka input:
the Avro codec of every schema, the rating processor's usage, subscription and bill-run
decoders, the payments processor's invoice and request decoders, and the priority lane's
cancellation check. Any exception other than the documented refusal is a finding.

    .venv/bin/python fuzz/fuzz_decoders.py                      # until stopped
    .venv/bin/python fuzz/fuzz_decoders.py -atheris_runs=200000  # or any libFuzzer flag

The first input byte picks a decoder; the second says whether the rest is framed with
that schema's real single-object header (so the fuzzer reaches the Avro body at once).
A starting corpus of valid records: ``fuzz/fuzz_decoders.py --write-seeds DIR``, then
pass DIR to the fuzzer (libFuzzer adds what it finds there).
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["streams", "fastavro"]):
    from streams import rating_records as rating
    from streams.codec import DecodeError, codec
    from streams.config import SCHEMAS_DIR
    from streams.domain import validation
    from streams.domain.cancellations import cancellation_problem
    from streams.kafka.topics import SUBSCRIPTIONS, USAGE
    from streams.processors import payments

SCHEMAS = sorted(p.stem for p in SCHEMAS_DIR.glob("*.avsc"))
INPUT_TOPICS = (SUBSCRIPTIONS.name, USAGE.name)
CODEC_REASONS = {"empty_value", "invalid_avro", "unknown_schema"}
PUBLISHED_MS = 1_772_000_000_000  # 2026-02-25


def _refusal(exc: DecodeError, allowed: set[str]) -> None:
    if exc.reason not in allowed or not exc.detail.strip():
        raise AssertionError(f"unexpected refusal {exc.reason!r}: {exc.detail!r}") from exc


def _rating_input(value: bytes, usage: bool) -> None:
    event, account, error = rating.decode_input(value, usage, PUBLISHED_MS)
    if (event is None) == (error is None):
        raise AssertionError("an event xor a dead letter")
    if error is not None:
        reason, detail = error
        if reason not in rating.DEAD_LETTER_REASONS or not detail.strip():
            raise AssertionError(f"dead letter {error!r}")
    elif not event.subscription_id or account is None:
        raise AssertionError(f"accepted {event!r}")


def _bill_run(value: bytes) -> None:
    try:
        rating.decode_bill_run(value, INPUT_TOPICS, PUBLISHED_MS)
    except DecodeError as exc:
        _refusal(exc, CODEC_REASONS | {"invalid_bill_run"})


def _payment_request(value: bytes) -> None:
    try:
        request = payments.decode_request(value)
    except DecodeError as exc:
        _refusal(exc, CODEC_REASONS | {"invalid_request"})
        return
    if request["attempt"] < 1 or request["amount"] <= 0:
        raise AssertionError(f"accepted {request!r}")


def _invoice(value: bytes) -> None:
    try:
        payments.request_for_invoice(value, ("m-1", "m-2"), validation.EARLIEST)
    except DecodeError as exc:
        _refusal(exc, CODEC_REASONS | {"invalid_invoice"})


def _cancellation(value: bytes) -> None:
    try:
        event = codec("subscription_event").decode(value)
    except DecodeError as exc:
        _refusal(exc, CODEC_REASONS)
        return
    problem = cancellation_problem(event, PUBLISHED_MS)
    downstream = rating.decode_input(value, False, PUBLISHED_MS)[2]
    if problem is None and downstream is not None:
        raise AssertionError(f"the lane forwards what rating refuses: {downstream!r}")


TARGETS = [
    ("usage_event", lambda v: _rating_input(v, True)),
    ("subscription_event", lambda v: _rating_input(v, False)),
    ("bill_run", _bill_run),
    ("payment_request", _payment_request),
    ("invoice", _invoice),
    ("subscription_event", _cancellation),
]


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    choice = data[0] % (len(TARGETS) + len(SCHEMAS))
    rest = data[2:]
    if choice < len(TARGETS):
        schema, target = TARGETS[choice]
        target(codec(schema).header + rest if data[1] & 1 else rest)
        return
    name = SCHEMAS[choice - len(TARGETS)]
    try:
        codec(name).decode(codec(name).header + rest if data[1] & 1 else rest)
    except DecodeError as exc:
        _refusal(exc, CODEC_REASONS)


def seeds() -> list[bytes]:
    """One valid record per target and schema, as fuzzer inputs (choice byte, 0, value)."""
    from datetime import UTC, datetime
    from decimal import Decimal

    at = datetime(2026, 2, 1, tzinfo=UTC)
    records = {
        "usage_event": {"event_id": "e", "timestamp": at, "account_id": "a",
                        "subscription_id": "s", "metric": "api_calls",
                        "quantity": Decimal("1.5")},
        "subscription_event": {"event_id": "e", "type": "subscription.cancelled",
                               "timestamp": at, "account_id": "a", "subscription_id": "s",
                               "plan_id": None, "mode": "immediate", "payment_method": None},
        "bill_run": {"run_id": "r", "until": at, "accounts": ["a"],
                     "barrier": {USAGE.name: 5}, "issued_at": at},
        "payment_request": {"payment_id": "p", "idempotency_key": "k", "invoice_id": "i",
                            "account_id": "a", "attempt": 1, "amount": Decimal("9.99"),
                            "currency": "EUR", "payment_method": "tok", "gateway_account": "m",
                            "not_before": at, "requested_at": at},
        "invoice": {"invoice_id": "i", "account_id": "a", "subscription_id": "s",
                    "plan_id": "p", "currency": "EUR", "issued_at": at, "reason": "created",
                    "lines": [{"charge_id": "c", "kind": "flat", "period_start": at,
                               "period_end": at, "quantity": Decimal(1),
                               "amount": Decimal("9.99")}],
                    "total": Decimal("9.99"), "payment_method": "tok"},
    }  # fmt: skip
    out = []
    for n, (schema, _) in enumerate(TARGETS):
        out.append(bytes([n, 0]) + codec(schema).encode(records[schema]))
    for n, name in enumerate(SCHEMAS, start=len(TARGETS)):
        if name in records:
            out.append(bytes([n, 0]) + codec(name).encode(records[name]))
    return out


if __name__ == "__main__":
    from harness import main  # fuzz/harness.py, next to this script

    main(seeds, test_one_input)
