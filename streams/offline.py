"""The offline rater: catalog JSON + events JSONL -> invoices, without Kafka.

The rating contract (version 2) on files: parse every line, run the domain's
``billing.run_contract`` (events in order of arrival, everything due before each) and sort
the finalized invoices by (issued_at, invoice_id). It is the reference the streaming
processor is compared with (for version-1 inputs the processor's own state machine,
``domain.rating``, gives the same invoices: the parity tests prove it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import orjson

from streams.domain.billing import ContractRun, run_contract
from streams.domain.catalog import Catalog, CatalogError
from streams.domain.events import AnyEvent, InvalidEvent, parse_event
from streams.domain.invoice import Invoice, invoice_to_contract_dict
from streams.domain.timestamps import format_timestamp, parse_timestamp, require_utc

__all__ = [
    "RateResult",
    "dead_letter_to_json_line",
    "invoice_to_json_line",
    "load_catalog",
    "parse_timestamp",
    "rate_events",
    "rate_streams",
]

Source = str | os.PathLike[str] | IO[str] | IO[bytes]


@dataclass
class RateResult:
    invoices: list[Invoice]
    # {"reason", "line" (1-based line in the events input), "event" (the decoded
    # object, or the raw text when it was not valid JSON)}, in processing order
    dead_letters: list[dict[str, Any]]
    # events arriving after `until`: not rated yet (neither invoiced nor dead letters)
    deferred: int = 0
    run: ContractRun | None = field(default=None, repr=False)
    # events the state machine accepted (a repeated usage event id too: accepted, counted
    # once). Every non-blank input line is exactly one of: applied, a dead letter, deferred.
    applied: int = 0


def _read(source: Source) -> str:
    if isinstance(source, str | os.PathLike):
        with open(source, encoding="utf-8") as fh:
            return fh.read()
    data = source.read()
    return data.decode("utf-8") if isinstance(data, bytes) else data


def load_catalog(source: Source) -> Catalog:
    """Parse with orjson (JSON floats stay floats, and Catalog refuses them)."""
    try:
        raw = orjson.loads(_read(source))
    except orjson.JSONDecodeError as e:
        raise CatalogError(f"catalog is not valid JSON: {e}") from None
    return Catalog.from_dict(raw)


def rate_streams(catalog_file: Source, events_file: Source, until: datetime) -> RateResult:
    catalog = load_catalog(catalog_file)
    return rate_events(catalog, _read(events_file).splitlines(), until)


def rate_events(catalog: Catalog, lines: Iterable[str], until: datetime) -> RateResult:
    until = require_utc(until)
    dead: list[dict[str, Any]] = []
    parsed: list[tuple[AnyEvent, tuple[int, Any]]] = []
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            dead.append({"reason": f"malformed JSON: {e}", "line": n, "event": text})
            continue
        try:
            parsed.append((parse_event(raw), (n, raw)))
        except InvalidEvent as e:
            dead.append({"reason": e.reason, "line": n, "event": raw})
    run, rejected, applied, deferred = run_contract(catalog, parsed, until)
    dead += [{"reason": reason, "line": n, "event": raw} for (n, raw), reason in rejected]  # type: ignore[misc]
    invoices = sorted(run.invoices, key=lambda inv: (inv.issued_at, inv.invoice_id))
    return RateResult(invoices, dead, deferred, run, applied)


def record_to_json_line(kind: str, rec: dict[str, Any]) -> str:
    """An Avro-shaped record of billing.subscriptions (kind "sub") or billing.usage ("usage")
    as a line of the offline rater's input: the same events, rated the other way."""
    out = {k: v for k, v in rec.items() if v is not None}
    out["timestamp"] = format_timestamp(rec["timestamp"])
    if kind == "usage":
        out["type"] = "usage"
        out["quantity"] = str(rec["quantity"])
    return orjson.dumps(out).decode()


def invoice_to_json_line(invoice: Invoice) -> str:
    """One compact JSON object in the contract's shape, no trailing newline."""
    return orjson.dumps(invoice_to_contract_dict(invoice)).decode()


def dead_letter_to_json_line(d: dict[str, Any]) -> str:
    """One compact JSON object with sorted keys, no trailing newline."""
    return orjson.dumps(d, option=orjson.OPT_SORT_KEYS).decode()
