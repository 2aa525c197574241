"""The rating processor's in-memory state cache (StateCache) and its transactions, without
a broker: RatingProcessor.transaction on one partition with a real RocksDB store, inputs
cut into transactions at random, some aborted (their records are then delivered again, as
Kafka does from the committed offsets), then a bill run in chunks, and caches from 1
entry up. Whatever the cuts, aborts
and evictions: the committed invoices are exactly those of the domain applied once, in
order, and RocksDB ends up with the same states."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streams.codec import codec
from streams.domain.catalog import Catalog
from streams.domain.events import SubscriptionCreated, Usage
from streams.domain.rating import SubscriptionState, apply_event, close_periods
from streams.kafka.topics import CONTROL, INVOICES, SUBSCRIPTIONS, USAGE
from streams.processors.rating import RatingProcessor
from streams.runtime.state import PartitionStore, StateCache
from streams.testbed.demo import DEMO_CATALOG
from tests.hostile import Msg, rating_processor

CATALOG = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))
T0 = datetime(2026, 1, 5, tzinfo=UTC)
UNTIL = datetime(2026, 3, 20, tzinfo=UTC)  # two period ends of every subscription
PUBLISHED_MS = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp() * 1000)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def processor(home: Path, cache_entries: int, **options: Any) -> RatingProcessor:
    return rating_processor(
        CATALOG, home, state_cache_entries=cache_entries, close_chunk=3, **options
    )


def inputs(subs: int, usage: list[tuple[int, int, int]]) -> list[tuple[str, bytes, Any]]:
    """(topic, value, event): creations, then usage in time order at distinct instants
    (no ties: the order of application is the timestamps' whatever the topic), spanning
    several periods, event ids repeating (dedup)."""
    out = []
    for i in range(subs):
        at = T0 + timedelta(minutes=i)
        rec = {"event_id": f"c{i}", "type": "subscription.created", "timestamp": at,
               "account_id": f"a{i}", "subscription_id": f"s{i}", "plan_id": "starter-eur",
               "mode": None, "payment_method": None}  # fmt: skip
        event = SubscriptionCreated(at, f"a{i}", f"s{i}", "starter-eur")
        out.append((SUBSCRIPTIONS.name, codec(SUBSCRIPTIONS.schema).encode(rec), event))
    # published in time order (a usage event older than one already applied would be late)
    for n, (i, minutes, q) in sorted(enumerate(usage), key=lambda u: (u[1][1], u[0])):
        at = T0 + timedelta(hours=1, minutes=minutes * 97, seconds=n)  # distinct instants
        event_id = f"u{n % 7}"  # ids repeat: dedup within a period
        rec = {"event_id": event_id, "timestamp": at, "account_id": f"a{i % subs}",
               "subscription_id": f"s{i % subs}", "metric": "api_calls",
               "quantity": Decimal(q)}  # fmt: skip
        as_read = Decimal(q * 10**9).scaleb(-9)  # decimal(38, 9), as Avro gives it back
        event = Usage(event_id, at, f"s{i % subs}", "api_calls", as_read)
        out.append((USAGE.name, codec(USAGE.schema).encode(rec), event))
    return out


def reference(events: list[Any]) -> tuple[set[tuple[str, Decimal]], dict[str, bytes]]:
    """The domain alone: events in time order, then every period up to UNTIL closed."""
    states: dict[str, SubscriptionState] = {}
    invoices = []
    for event in sorted(events, key=lambda e: e.timestamp):
        state, new, _ = apply_event(states.get(event.subscription_id), event, CATALOG)
        if state is not None:
            states[event.subscription_id] = state
        invoices += new
    for state in states.values():
        invoices += close_periods(state, UNTIL, CATALOG)[1]
    return {(i.invoice_id, i.total) for i in invoices}, {
        s: st.to_bytes() for s, st in states.items()
    }


@SETTINGS
@given(
    subs=st.integers(1, 4),
    usage=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 900), st.integers(0, 50)), max_size=40
    ),
    cuts=st.lists(st.tuples(st.integers(1, 12), st.booleans()), min_size=1, max_size=30),
    cache_entries=st.sampled_from([1, 2, 1000]),
)
# an aborted transaction closes a period (its invoice discarded): the retry must see the
# committed state, not the one the aborted transaction advanced, or the invoice is lost
@example(
    subs=2,
    usage=[(0, 10, 5), (1, 600, 3), (0, 700, 2), (1, 800, 1)],
    cuts=[(2, False), (1, False), (1, True), (1, False)],
    cache_entries=1000,
)
def test_transactions_aborted_and_cached_states_give_the_domains_invoices(
    tmp_path_factory: Any, subs: int, usage: list, cuts: list, cache_entries: int
) -> None:
    proc = processor(tmp_path_factory.mktemp("store"), cache_entries)
    records = inputs(subs, usage)
    # the two topics' offsets, as Kafka numbers them
    offsets: dict[str, int] = {}
    msgs = []
    for topic, value, _ in records:
        offsets[topic] = offsets.get(topic, -1) + 1
        msgs.append(Msg(topic, value, b"k", 0, offsets[topic], PUBLISHED_MS))
    # subscriptions first, then usage: event time puts every creation first anyway
    done, turn = 0, 0
    while done < len(msgs):
        size, abort = cuts[turn % len(cuts)]
        turn += 1
        abort = abort and turn < 3 * len(cuts)  # every abort is retried; finish eventually
        proc.producer.fail_commits = int(abort)
        try:
            proc.transaction(msgs[done : done + size])
        except RuntimeError:  # aborted: its records are delivered again
            assert abort
            continue
        done += size
        assert len(proc.states.caches[0]) <= max(cache_entries, 1) + cache_entries // 16 + subs
    # a bill run up to UNTIL, in chunks of close_chunk, one transaction each
    run = codec(CONTROL.schema).encode(
        {"run_id": "r", "until": UNTIL, "accounts": None, "barrier": {}, "issued_at": UNTIL}
    )
    proc.transaction([Msg(CONTROL.name, run, None, 0, 0, PUBLISHED_MS)])
    while proc.jobs.running:
        proc.transaction([])
    committed = proc.producer.produced
    invoices = [codec(INVOICES.schema).decode(v) for t, _, v in committed if t == INVOICES.name]
    expected, states = reference([event for _, _, event in records])
    assert {(i["invoice_id"], i["total"]) for i in invoices} == expected
    assert len(invoices) == len(expected)  # each once
    for sub, raw in states.items():
        assert proc.states.stores[0].get(sub) == raw, sub
    proc.close()


def test_the_cache_keeps_the_most_recently_committed() -> None:
    cache = StateCache(16)
    for n in range(40):
        cache.put(f"s{n}", n, None)
        cache.trim()
        assert len(cache) <= 16
    assert cache.take("s39") == (39, None) and cache.take("s39") is None
    assert cache.take("s0") is None  # evicted long ago
    cache.put("s38", "newer", b"d")  # a re-put moves it to the end
    assert list(cache.entries)[-1] == "s38" and cache.take("s38") == ("newer", b"d")


CRASHING_WRITER = """
import os, sys
from pathlib import Path
from streams.runtime.state import PartitionStore
store = PartitionStore(Path(sys.argv[1]))
for k in range(1, 201):  # ~40 MB: the 8 MiB memtables are flushed several times
    states = {f"s{k}-{i}": b"%d|" % k + bytes(2000) for i in range(100)}
    store.write(states, [(None, b"d|%020d|s%d" % (k, k))], k)
os._exit(9)  # killed: no close, memtables not flushed
"""


def test_a_crash_leaves_the_store_at_a_consistent_checkpoint(tmp_path: Path) -> None:
    """No write-ahead log: a killed process loses its last batches, never a part of one,
    and the checkpoint says where the changelog must be replayed from."""
    import subprocess
    import sys

    path = tmp_path / "p0"
    run = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(path)], check=False)
    assert run.returncode == 9
    store = PartitionStore(path)
    checkpoint = store.checkpoint
    assert 0 < checkpoint < 200  # some batches made it to disk, the last ones did not
    for k in (1, checkpoint // 2 + 1, checkpoint, checkpoint + 1, 200):
        written = k <= checkpoint
        assert all((store.get(f"s{k}-{i}") is not None) == written for i in range(100)), k
        due = [key for key, _ in store.due_after(b"", 10**9) if key.endswith(b"|s%d" % k)]
        assert len(due) == written, k
    store.close()


def test_the_cache_and_transaction_sizes_are_settings(monkeypatch: Any, tmp_path: Path) -> None:
    from streams.config import Settings

    assert (Settings().rating_state_cache, Settings().rating_transaction_records) == (
        50_000,
        20_000,
    )
    monkeypatch.setenv("STREAMBILL_RATING_STATE_CACHE", "1200")
    monkeypatch.setenv("STREAMBILL_RATING_TRANSACTION_RECORDS", "700")
    settings = Settings()
    assert (settings.rating_state_cache, settings.rating_transaction_records) == (1200, 700)
    # the worker's cache is shared by its partitions
    proc = processor(tmp_path, settings.rating_state_cache)
    proc.on_assign(proc.consumer, [TopicPartition(SUBSCRIPTIONS.name, p) for p in range(4)])
    assert [c.capacity for c in proc.states.caches.values()] == [300] * 4
    proc.close()
