"""How much one rating transaction takes in (RatingProcessor.transaction), without a
broker: an offline consumer hands out polls, a fake transactional producer records what
is committed, one partition has a real RocksDB store.

A transaction is one poll, except while everything it has read is usage that the fast
reader takes: then it polls again, without waiting, up to the usage limit of records and
at most as many subscriptions as the state cache holds. Whatever the cut,
the states committed are the domain's, and the offsets committed are those of every
record it consumed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.codec import codec
from streams.config import Settings
from streams.domain.catalog import Catalog
from streams.domain.events import SubscriptionCreated, Usage
from streams.domain.rating import apply_event
from streams.kafka.topics import CONTROL, SUBSCRIPTIONS, USAGE
from streams.processors.rating import RatingProcessor
from streams.testbed.demo import DEMO_CATALOG
from tests.hostile import Msg, rating_processor

CATALOG = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))
T0 = datetime(2026, 1, 5, tzinfo=UTC)
PUBLISHED_MS = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp() * 1000)
SUBS = 6


def processor(path: Path, cache_entries: int, records: int, usage_records: int) -> Any:
    return rating_processor(
        CATALOG, path, state_cache_entries=cache_entries, batch_size=records,
        rating_usage_transaction_records=usage_records,
    )  # fmt: skip


def creations(offset: int = 0) -> tuple[list[Msg], list[Any]]:
    msgs, events = [], []
    for i in range(SUBS):
        at = T0 + timedelta(minutes=i)
        rec = {"event_id": f"c{i}", "type": "subscription.created", "timestamp": at,
               "account_id": f"a{i}", "subscription_id": f"s{i}", "plan_id": "starter-eur",
               "mode": None, "payment_method": None}  # fmt: skip
        value = codec(SUBSCRIPTIONS.schema).encode(rec)
        msgs.append(Msg(SUBSCRIPTIONS.name, value, b"k", 0, offset + i, PUBLISHED_MS))
        events.append(SubscriptionCreated(at, f"a{i}", f"s{i}", "starter-eur"))
    return msgs, events


def usage(subs: list[int], first_offset: int) -> tuple[list[Msg], list[Any]]:
    """One plain usage record per entry (of subscription s<entry>), in time order."""
    msgs, events = [], []
    for n, i in enumerate(subs):
        offset = first_offset + n
        at = T0 + timedelta(days=1, seconds=offset)
        rec = {"event_id": f"u{offset}", "timestamp": at, "account_id": f"a{i}",
               "subscription_id": f"s{i}", "metric": "api_calls",
               "quantity": Decimal(offset % 7 + 1)}  # fmt: skip
        msgs.append(Msg(USAGE.name, codec(USAGE.schema).encode(rec), f"a{i}".encode(), 0,
                        offset, PUBLISHED_MS))  # fmt: skip
        as_read = Decimal((offset % 7 + 1) * 10**9).scaleb(-9)  # decimal(38, 9), as Avro gives
        events.append(Usage(f"u{offset}", at, f"s{i}", "api_calls", as_read))
    return msgs, events


def created(proc: RatingProcessor) -> list[Any]:
    """The subscriptions, created in one transaction of their own (one poll)."""
    msgs, events = creations()
    proc.consumer.hand_out([])
    proc.transaction(msgs)
    assert proc.consumer.asked == []  # a transaction with creations does not poll again
    return events


def cut(msgs: list[Msg], sizes: list[int]) -> list[list[Msg]]:
    polls, done, turn = [], 0, 0
    while done < len(msgs):
        size = sizes[turn % len(sizes)]
        polls.append(msgs[done : done + size])
        done, turn = done + size, turn + 1
    return polls


def model(polls: list[list[Msg]], batch: int, limit: int, states: int) -> list[int]:
    """Records per transaction, by the rule: the first poll, then (all plain usage here)
    polls of at most min(batch, limit - taken) records while taken < limit and the
    subscriptions touched < states."""
    queue = [m for poll in polls for m in poll]
    bounds = [len(poll) for poll in polls]  # what each poll can hand out at most
    sizes = []
    while queue:
        n = bounds.pop(0)
        subs = {m.key() for m in queue[:n]}  # keyed by the subscription's account
        while n < limit and len(subs) < states and n < len(queue):
            k = min(batch, limit - n, bounds[0])
            subs |= {m.key() for m in queue[n : n + k]}
            bounds[0] -= k
            if not bounds[0]:
                bounds.pop(0)
            n += k
        sizes.append(n)
        del queue[:n]
    return sizes


def committed_states(proc: RatingProcessor, events: list[Any]) -> None:
    """RocksDB holds what the domain gives for the events applied in order."""
    states: dict[str, Any] = {}
    for event in events:
        states[event.subscription_id] = apply_event(
            states.get(event.subscription_id), event, CATALOG
        )[0]
    for sub, state in states.items():
        assert proc.states.stores[0].get(sub) == state.to_bytes(), sub


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    subs=st.lists(st.integers(0, SUBS - 1), min_size=1, max_size=60),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    usage_records=st.integers(1, 40),
    cache_entries=st.integers(1, SUBS + 1),
)
def test_plain_usage_polls_on_within_its_limits(
    tmp_path_factory: Any, subs: list[int], sizes: list[int], usage_records: int,
    cache_entries: int,
) -> None:  # fmt: skip
    proc = processor(tmp_path_factory.mktemp("store"), cache_entries, 9, usage_records)
    events = created(proc)
    msgs, usage_events = usage(subs, 0)
    polls = cut(msgs, sizes)
    # (the usage limit is at least one poll's: RatingProcessor takes the larger)
    expected = model(polls, 9, max(9, usage_records), cache_entries)
    taken_sizes, consumed = [], 0
    while polls:
        proc.consumer.hand_out(polls[1:])
        taken = proc.transaction(polls[0])
        polls = proc.consumer.polls
        taken_sizes.append(len(taken))
        assert [m.offset() for m in taken] == list(range(consumed, consumed + len(taken)))
        consumed += len(taken)
        # the offsets committed are those of all it consumed
        assert proc.producer.offsets[-1] == {(USAGE.name, 0): consumed}
        # it never waited for records, nor asked for more than the limit leaves
        assert all(timeout == 0 for _, timeout in proc.consumer.asked)
        assert all(n <= 9 for n, _ in proc.consumer.asked)
    assert taken_sizes == expected
    committed_states(proc, events + usage_events)
    proc.close()


def test_a_transaction_with_anything_but_plain_usage_is_one_poll(tmp_path: Path) -> None:
    proc = processor(tmp_path, 100, 4, 1000)
    events = created(proc)
    plain, plain_events = usage([0, 1, 2, 3], 0)
    late_creation, _ = creations(offset=SUBS)  # duplicates: dead letters, not plain
    rest, rest_events = usage([4, 5], 4)
    proc.consumer.hand_out([late_creation[:1], rest])
    taken = proc.transaction(plain)
    # plain usage polled again; the creation ended the transaction after its poll
    assert [m.offset() for m in taken] == [0, 1, 2, 3, SUBS]
    assert proc.consumer.polls == [rest]
    assert proc.producer.offsets[-1] == {(USAGE.name, 0): 4, (SUBSCRIPTIONS.name, 0): SUBS + 1}
    proc.consumer.hand_out([])
    proc.transaction(rest)
    committed_states(proc, events + plain_events + rest_events)
    proc.close()


def test_no_second_poll_while_a_bill_run_is_open(tmp_path: Path) -> None:
    proc = processor(tmp_path, 100, 4, 1000)
    created(proc)
    # a run waiting for a barrier not reached yet: it stays open
    run = codec(CONTROL.schema).encode({
        "run_id": "run", "until": T0, "accounts": None, "barrier": {USAGE.name: 1000},
        "issued_at": T0,
    })  # fmt: skip
    proc.transaction([Msg(CONTROL.name, run, None, 0, 0, PUBLISHED_MS)])
    assert list(proc.jobs.running) == [0] and proc.consumer.paused == {(CONTROL.name, 0)}
    plain, _ = usage([0, 1], 0)
    proc.consumer.hand_out([usage([2], 2)[0]])
    assert proc.transaction(plain) == plain
    assert proc.consumer.asked == []
    proc.close()


def test_the_usage_transaction_size_is_a_setting(monkeypatch: Any) -> None:
    assert Settings().rating_usage_transaction_records == 100_000
    monkeypatch.setenv("STREAMBILL_RATING_USAGE_TRANSACTION_RECORDS", "5000")
    assert Settings().rating_usage_transaction_records == 5000


class _Error:
    def __init__(self, code: int, fatal: bool) -> None:
        self._code, self._fatal = code, fatal

    def code(self) -> int:
        return self._code

    def fatal(self) -> bool:
        return self._fatal


class _Polled:
    def __init__(self, error: _Error | None = None) -> None:
        self._error = error

    def error(self) -> _Error | None:
        return self._error


def test_a_poll_keeps_the_records_and_raises_only_fatal_errors() -> None:
    from confluent_kafka import KafkaError, KafkaException

    from streams.runtime.process import poll_batch

    class Consumer:
        def __init__(self, messages: list[_Polled]) -> None:
            self.messages = messages

        def consume(self, _n: int, timeout: float) -> list[_Polled]:
            return self.messages

    records = [_Polled(), _Polled()]
    eof = _Polled(_Error(KafkaError._PARTITION_EOF, False))
    transient = _Polled(_Error(KafkaError._TRANSPORT, False))
    assert poll_batch(Consumer([records[0], eof, transient, records[1]]), 10, 0) == records
    fatal = _Polled(_Error(KafkaError._FATAL, True))
    with pytest.raises(KafkaException):  # a fatal error stops the processor
        poll_batch(Consumer([records[0], fatal]), 10, 0)


def test_a_plan_dropped_from_the_catalog_stops_nothing(tmp_path: Path) -> None:
    """Subscriptions running on a plan the catalog file no longer has (a restart with an
    edited file): their events are dead letters with the reason, their periods stay open
    (the bill run completes without them), and the rater goes on; with the plan back, the
    same bill run closes them."""
    from streams.domain.catalog import Catalog as Cat
    from streams.kafka.topics import DEAD_LETTER, INVOICES

    proc = processor(tmp_path, 100, 1000, 1000)
    created(proc)
    without = Cat({pid: p for pid, p in CATALOG.plans.items() if pid != "starter-eur"})
    proc.catalog = without  # what a restart with the edited file gives it
    plain, _ = usage([0, 1], 100)
    until = T0 + timedelta(days=40)

    def bill_run(offset: int) -> Msg:
        run = codec(CONTROL.schema).encode(
            {"run_id": f"run{offset}", "until": until, "accounts": None, "barrier": {},
             "issued_at": T0}
        )  # fmt: skip
        return Msg(CONTROL.name, run, None, 0, offset, PUBLISHED_MS)

    before = len(proc.producer.produced)
    proc.transaction([*plain, bill_run(0)])
    while proc.jobs.running:
        proc.transaction([])
    new = proc.producer.produced[before:]
    dead = [codec(DEAD_LETTER.schema).decode(v) for t, _, v in new if t == DEAD_LETTER.name]
    assert [d["detail"] for d in dead] == [
        "the subscription's plan 'starter-eur' is not in the catalog"
    ] * 2
    assert not [v for t, _, v in new if t == INVOICES.name]

    proc.catalog = CATALOG  # the plan is back
    before = len(proc.producer.produced)
    proc.transaction([bill_run(1)])
    while proc.jobs.running:
        proc.transaction([])
    invoices = [codec(INVOICES.schema).decode(v) for t, _, v in proc.producer.produced[before:]
                if t == INVOICES.name]  # fmt: skip
    assert sorted(i["subscription_id"] for i in invoices) == [f"s{i}" for i in range(SUBS)]
    proc.close()
