"""The state of the rating contract's run of one partition, in the partition's state
store (``streams.runtime.state``), as the version-2 rating processor
(``streams.processors.contract_rating``) keeps it: the ``ContractRun`` of `streambill
rate` over parts loaded as they are touched.

- subscriptions, keyed by id, each self-contained (with its plan versions);
- accounts (customer record, credit balance per currency), keyed ``ACCOUNT + id``;
- the due index: each subscription under its next due instant, so that "everything due
  at or before T, in order of (instant, subscription_id)" is a range scan (``StoredDue``);
- the partition's clock (the latest arrival it has applied), keyed ``CLOCK``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from streams.catalog_history import CatalogView, event_key
from streams.domain.billing import (
    Account,
    Accounts,
    ContractRun,
    DueHeap,
    DueItem,
    Subscription,
)
from streams.domain.billing_snapshot import (
    account_from_bytes,
    account_to_bytes,
    subscription_from_bytes,
    subscription_to_bytes,
)
from streams.domain.catalog import Catalog
from streams.domain.timestamps import from_micros, to_micros
from streams.runtime.state import PartitionStates, StateChanges

# state keys beside the subscription ids (which never start with a NUL)
ACCOUNT = "\x00a:"
CLOCK = "\x00clock"
_SUBSCRIPTION, _ACCOUNT, _CLOCK = b"S", b"A", b"C"


@dataclass(slots=True)
class Clock:
    """The latest arrival a partition has applied (µs)."""

    us: int


def encode_state(state: Any) -> bytes:
    if isinstance(state, Subscription):
        return _SUBSCRIPTION + subscription_to_bytes(state)
    if isinstance(state, Account):
        return _ACCOUNT + account_to_bytes(state)
    return _CLOCK + b"%d" % state.us


def decode_state(raw: bytes) -> Any:
    tag, body = raw[:1], memoryview(raw)[1:]
    if tag == _SUBSCRIPTION:
        return subscription_from_bytes(body)
    if tag == _ACCOUNT:
        return account_from_bytes(body)
    return Clock(int(bytes(body)))


def due_us(state: Any) -> int | None:
    """A subscription's next due instant (µs): its key in the due index."""
    if isinstance(state, Subscription):
        nxt = state.next_due()
        return to_micros(nxt[0]) if nxt is not None else None
    return None


@dataclass
class Batch(StateChanges):
    invoices: int = 0
    dead_letters: int = 0


class StoredStates(MutableMapping[str, Any]):
    """One partition's states of one kind (subscriptions, or accounts under a key
    prefix), as the open transaction sees them: read from the store on first touch, and
    from then on part of the transaction (written to the changelog when it commits)."""

    def __init__(
        self, states: PartitionStates, p: int, prefix: str = "",
        on_load: Callable[[Any], None] | None = None,
    ) -> None:  # fmt: skip
        self.states, self.p, self.prefix, self.on_load = states, p, prefix, on_load
        self.batch: Batch = Batch()

    def touched(self, key: str) -> bool:
        return self.prefix + key in self.batch.original_due.get(self.p, ())

    def get(self, key: str, default: Any = None) -> Any:
        k = self.prefix + key
        dirty = self.batch.states.get(self.p)
        if dirty is not None and k in dirty:
            return dirty[k]
        seen = self.batch.original_due.get(self.p)
        if seen is not None and k in seen:
            return default  # read before: there is none
        state = self.states.get(self.batch, self.p, k)
        if state is None:
            return default
        self.batch.states[self.p][k] = state
        if self.on_load is not None:
            self.on_load(state)
        return state

    def __getitem__(self, key: str) -> Any:
        state = self.get(key)
        if state is None:
            raise KeyError(key)
        return state

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __setitem__(self, key: str, state: Any) -> None:
        self.get(key)  # the transaction knows what it replaces
        self.batch.states[self.p][self.prefix + key] = state

    def __delitem__(self, key: str) -> None:
        raise NotImplementedError("the contract never deletes a state")

    def __iter__(self) -> Iterator[str]:
        raise NotImplementedError("a partition's states are not listed")

    def __len__(self) -> int:
        raise NotImplementedError("a partition's states are not counted")


class StoredDue(DueHeap):
    """What is due next in one partition: the committed due index in the store (one
    entry per subscription, under its next due instant) merged with a heap of the
    subscriptions this transaction has touched, whose store entries are stale then. A
    subscription is loaded when its store entry comes first; loading it puts its current
    due item on the heap."""

    def __init__(self, states: PartitionStates, p: int, subs: StoredStates) -> None:
        super().__init__()
        self.states, self.p, self.subs = states, p, subs
        # the store's entries in order, read once per transaction (the store changes only
        # when it commits): those before next_stored are loaded or touched
        self.entries: Iterator[tuple[bytes, str]] | None = None
        self.next_stored: tuple[int, str, bytes] | None = None  # (µs, id, key)
        self.looked = False

    def begin(self) -> None:
        """A new transaction: the store holds the last one's commit."""
        self.heap.clear()
        self.entries, self.next_stored, self.looked = None, None, False

    def end(self) -> None:
        """The transaction is over: its reading of the store is let go."""
        self.entries = None

    def _stored(self) -> tuple[int, str, bytes] | None:
        """The store's next entry whose subscription is untouched."""
        if self.looked:
            nxt = self.next_stored
            if nxt is None or not self.subs.touched(nxt[1]):
                return nxt
        self.looked = True
        self.next_stored = None
        if self.entries is None:
            self.entries = self.states.stores[self.p].due_after(b"", 10**19)
        for key, sub in self.entries:
            if not self.subs.touched(sub):
                self.next_stored = (int(key[2:22]), sub, key)
                break
        return self.next_stored

    def pop(self, until: datetime) -> DueItem | None:
        heap = self.heap
        while True:
            stored = self._stored()
            if stored is not None and (
                not heap or (stored[0], stored[1]) < (to_micros(heap[0][0]), heap[0][1])
            ):
                if stored[0] > to_micros(until):
                    break
                self.subs.get(stored[1])  # loaded: its due item goes on the heap
                continue
            break
        return super().pop(until)


class PartitionRun:
    """The contract's run of one partition, over its state store."""

    def __init__(self, p: int, states: PartitionStates, catalog: Catalog) -> None:
        self.p = p
        self.subs = StoredStates(states, p, on_load=self._loaded)
        self.accounts = StoredStates(states, p, prefix=ACCOUNT)
        self.due = StoredDue(states, p, self.subs)
        self.view = CatalogView()
        self.run = ContractRun(
            catalog, book=self.view.book, subs=self.subs,
            accounts=Accounts(self.accounts, global_credit_ids=False), due=self.due,
        )  # fmt: skip
        self.clock_us = -1  # the committed clock, read at the first transaction
        self.clock_moved = False
        self.events: list = []
        self.next_event = 0  # the catalog events before it are applied

    def _loaded(self, sub: Subscription) -> None:
        self.run.schedule(sub)

    def begin(self, batch: Batch, states: PartitionStates) -> None:
        self.subs.batch = self.accounts.batch = batch
        self.due.begin()
        if self.clock_us < 0:
            clock = states.get(batch, self.p, CLOCK)
            self.clock_us = clock.us if clock is not None else 0
            if clock is not None:
                states.put_back(batch, self.p, CLOCK, clock)

    def catch_up_catalog(self, events: list[tuple[int, datetime, Any]], until_us: int) -> None:
        """Apply the catalog events (µs, instant, event) up to until (µs), each once the run
        has made what was due before it happen."""
        if events is not self.events:  # read anew: look at every event again
            self.events, self.next_event = events, 0
        n = self.next_event
        while n < len(events) and events[n][0] <= until_us:
            _, at, event = events[n]
            if event_key(event) not in self.view.applied:
                self.run.advance(at)
                self.view.apply(event)
            n += 1
        self.next_event = n

    def reach(self, batch: Batch, events: list, arrival_us: int) -> None:
        """The partition's clock moves to the arrival (never back): catalog events and
        everything due up to then happen first."""
        self.catch_up_catalog(events, arrival_us)
        self.run.advance(from_micros(arrival_us))
        self.set_clock(batch, arrival_us)

    def set_clock(self, batch: Batch, us: int) -> None:
        """The clock moves on (never back); its record is written once per transaction
        (``write_clock``)."""
        if us > self.clock_us:
            self.clock_us = us
            self.clock_moved = True

    def write_clock(self, batch: Batch) -> None:
        if self.clock_moved:
            self.clock_moved = False
            batch.original_due.setdefault(self.p, {}).setdefault(CLOCK, None)
            batch.states.setdefault(self.p, {})[CLOCK] = Clock(self.clock_us)
