"""Micro-benchmarks of the rating domain's hot paths (no Kafka, no RocksDB).

    /tmp/sbvenv/bin/python scripts/bench_domain.py [--reps 7] [--scale 1.0]

Prints, per benchmark, the median (and min/max) ops/s over ``--reps`` repetitions,
plus the size of ``SubscriptionState.to_bytes()`` for a typical state.

Catalog: deploy/demo/catalog.json, plus one in-memory plan ``bench-3-metrics``
assembled from the demo plans' own charges (growth-eur's flat fee, graduated
api_calls and package storage_gb, and pro-usd's per-unit seats, in EUR), because
no demo plan bills three metrics. The benchmark state is a subscription of that
plan with sum/max aggregates for the three metrics and 10 seen event ids (UUID
strings, the usual shape of client-generated idempotency keys).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.domain.catalog import Catalog  # noqa: E402
from streams.domain.events import InvalidEvent, SubscriptionCreated, Usage, parse_event  # noqa: E402
from streams.domain.rating import (  # noqa: E402
    SubscriptionState,
    apply_event,
    close_periods,
    next_period_end,
)

ANCHOR = datetime(2026, 1, 1, 8, 30, tzinfo=UTC)
SUB = "sub-n1000000-s42-0000123"
ACCOUNT = "acct-n1000000-s42-0000123"
PLAN = "bench-3-metrics"
METRICS = ("api_calls", "storage_gb", "seats")


def load_catalog() -> Catalog:
    raw = orjson.loads((ROOT / "deploy/demo/catalog.json").read_bytes())
    plans = {p["plan_id"]: p for p in raw["plans"]}
    growth, pro = plans["growth-eur"], plans["pro-usd"]
    seats = next(c for c in pro["charges"] if c.get("metric") == "seats")
    raw["plans"].append(
        {
            "plan_id": PLAN,
            "currency": "EUR",
            "interval": "month",
            "charges": [*growth["charges"], {**seats, "charge_id": "bench-seats"}],
        }
    )
    return Catalog.from_dict(raw)


def ids(n: int, seed: int = 0) -> list[str]:
    return [str(uuid.UUID(int=(seed << 64) + i + 1, version=4)) for i in range(n)]


def usage(event_id: str, i: int) -> Usage:
    t = ANCHOR + timedelta(days=1, seconds=37 * i)
    return Usage(event_id, t, SUB, METRICS[i % 3], Decimal(1 + i % 500))


def base_state(catalog: Catalog, seen: int = 10) -> SubscriptionState:
    """Created, then ``seen`` usage events spread over the three metrics."""
    state, _, _ = apply_event(None, SubscriptionCreated(ANCHOR, ACCOUNT, SUB, PLAN), catalog)
    assert state is not None
    for i, eid in enumerate(ids(seen, seed=1)):
        state, _, rej = apply_event(state, usage(eid, i), catalog)
        assert not rej
    assert state is not None and len(state.usage) == min(seen, 3)
    return state


def measure(reps: int, n: int, setup: Callable[[], object], body: Callable[[object], None]):
    """ops/s of ``body(setup())`` doing n operations, over reps repetitions."""
    rates = []
    for _ in range(reps):
        arg = setup()
        t0 = time.perf_counter()
        body(arg)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), min(rates), max(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the loop sizes")
    args = ap.parse_args()
    reps = args.reps

    def sized(n: int) -> int:
        return max(1, int(n * args.scale))

    catalog = load_catalog()
    state = base_state(catalog)
    blob = state.to_bytes()
    results: list[tuple[str, float | None, float | None, float | None]] = []

    # parse_event: the offline rater's JSON shape (strings) ...
    n = sized(50_000)
    usage_json = {
        "type": "usage",
        "event_id": ids(1)[0],
        "timestamp": "2026-01-02T10:11:12.345678Z",
        "account_id": ACCOUNT,
        "subscription_id": SUB,
        "metric": "api_calls",
        "quantity": "12.500000000",
    }

    def parse_many(d: object) -> None:
        for _ in range(n):
            parse_event(d)

    results.append(
        ("parse_event (usage, str fields)", *measure(reps, n, lambda: usage_json, parse_many))
    )

    # ... and the Avro decoder's shape (aware datetime, Decimal), new in this version
    usage_avro = {
        **usage_json,
        "type": "usage",
        "timestamp": datetime(2026, 1, 2, 10, 11, 12, 345678, tzinfo=UTC),
        "quantity": Decimal("12.500000000"),
    }
    try:
        parse_event(usage_avro)
    except InvalidEvent:
        results.append(("parse_event (usage, datetime+Decimal)", None, None, None))
    else:
        results.append(
            (
                "parse_event (usage, datetime+Decimal)",
                *measure(reps, n, lambda: usage_avro, parse_many),
            )
        )

    # apply_event: distinct usage events onto one existing state (period 0)
    n = sized(20_000)
    events = [usage(eid, i) for i, eid in enumerate(ids(n, seed=2))]

    def apply_many(st: object) -> None:
        for e in events:
            apply_event(st, e, catalog)  # type: ignore[arg-type]

    results.append(
        (
            "apply_event (usage onto state)",
            *measure(reps, n, lambda: SubscriptionState.from_bytes(blob), apply_many),
        )
    )

    # close_periods at the first period end: 3 usage lines + 1 flat line invoice
    n = sized(5_000)
    end = next_period_end(state)
    assert end is not None

    def close_many(states: object) -> None:
        for st in states:  # type: ignore[attr-defined]
            _, invoices = close_periods(st, end, catalog)
            assert len(invoices) == 1

    results.append(
        (
            "close_periods (3 metrics, 1 period)",
            *measure(
                reps, n, lambda: [SubscriptionState.from_bytes(blob) for _ in range(n)], close_many
            ),
        )
    )

    n = sized(100_000)

    def next_end_many(st: object) -> None:
        for _ in range(n):
            next_period_end(st)  # type: ignore[arg-type]

    results.append(
        (
            "next_period_end",
            *measure(reps, n, lambda: SubscriptionState.from_bytes(blob), next_end_many),
        )
    )

    n = sized(50_000)

    def to_bytes_many(st: object) -> None:
        for _ in range(n):
            st.to_bytes()  # type: ignore[attr-defined]

    results.append(("to_bytes (10 seen ids)", *measure(reps, n, lambda: state, to_bytes_many)))

    def from_bytes_many(b: object) -> None:
        for _ in range(n):
            SubscriptionState.from_bytes(b)  # type: ignore[arg-type]

    results.append(("from_bytes (10 seen ids)", *measure(reps, n, lambda: blob, from_bytes_many)))

    # the domain share of the streaming processor per usage record, one dirty
    # subscription per record: decode state, apply, encode, due-index keys (which
    # decode the original bytes again and compute next_period_end twice)
    n = sized(20_000)
    rows = [
        {**usage_json, "event_id": eid, "metric": METRICS[i % 3]}
        for i, eid in enumerate(ids(n, seed=3))
    ]

    def pipeline(_: object) -> None:
        for row in rows:
            ev = parse_event(row)
            st = SubscriptionState.from_bytes(blob)
            st, _, _ = apply_event(st, ev, catalog)
            st.to_bytes()  # type: ignore[union-attr]
            next_period_end(SubscriptionState.from_bytes(blob))
            next_period_end(st)  # type: ignore[arg-type]

    results.append(
        ("per-record ingest (parse+load+apply+store)", *measure(reps, n, lambda: None, pipeline))
    )

    print(f"python {sys.version.split()[0]}, {reps} repetitions, median (min..max) ops/s")
    width = max(len(name) for name, *_ in results)
    for name, med, lo, hi in results:
        if med is None:
            print(f"{name:<{width}}  n/a (input not accepted)")
        else:
            print(f"{name:<{width}}  {med:>12,.0f}  ({lo:,.0f}..{hi:,.0f})")
    print(f"{'to_bytes size (10 seen ids), bytes':<{width}}  {len(blob):>12,}")
    empty = base_state(catalog, seen=0).to_bytes()
    print(f"{'to_bytes size (0 seen ids), bytes':<{width}}  {len(empty):>12,}")


if __name__ == "__main__":
    main()
