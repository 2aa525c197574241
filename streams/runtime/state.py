"""Per-partition state: RocksDB (rocksdict) backed by a compacted changelog topic, with a
cache of decoded states in front; ``PartitionStates`` holds them for the partitions a
worker owns, restores them on assignment and follows each Kafka transaction.

The local RocksDB is a cache of the changelog partition up to a checkpoint offset kept
inside it. It is written only *after* the Kafka transaction carrying the same changes
committed, so it can lag the changelog but never run ahead of it; on assignment the
missing tail is restored from the changelog (read_committed). Deleting the directory is
always safe: the whole partition is then restored from the changelog.

Keys: ``s|<subscription_id>`` -> domain state bytes; ``d|<period end µs, 20 digits>|<id>``
-> b"" (the due index, so closing periods up to T is a range scan); ``c|checkpoint`` ->
next changelog offset to restore from.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from streams.kafka import clients

log = structlog.get_logger(__name__)

CHECKPOINT = b"c|checkpoint"
MEMTABLE_BYTES = 8 << 20


def due_key(period_end_us: int, subscription_id: str) -> bytes:
    return b"d|%020d|" % period_end_us + subscription_id.encode()


def state_key(subscription_id: str) -> bytes:
    return b"s|" + subscription_id.encode()


class PartitionStore:
    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        # a worker holds many partitions' stores: RocksDB's default 64 MiB memtables each
        # would dominate its memory. State is a cache of the changelog; small is fine.
        options.set_write_buffer_size(MEMTABLE_BYTES)
        options.set_max_write_buffer_number(2)
        self.db = Rdict(str(path), options)
        # No write-ahead log: the store is a cache of the changelog, and each write is one
        # atomic batch carrying its checkpoint. A crash loses at most the memtables' batches
        # (a clean close flushes them), i.e. the store falls back to an earlier checkpoint
        # whose states are consistent with it, and PartitionStates.restore replays the
        # changelog from there.
        write_options = WriteOptions()
        write_options.disable_wal = True
        self.db.set_write_options(write_options)

    def get(self, subscription_id: str) -> bytes | None:
        return self.db.get(state_key(subscription_id))

    @property
    def checkpoint(self) -> int:
        raw = self.db.get(CHECKPOINT)
        return int(raw) if raw else 0

    def due_after(self, cursor: bytes, until_us: int) -> Iterator[tuple[bytes, str]]:
        """(due key, subscription id) of periods ending <= until (µs), after `cursor`,
        earliest first."""
        it = self.db.iter()
        it.seek(cursor + b"\x00" if cursor else b"d|")
        stop = b"d|%020d|\xff" % until_us
        while it.valid():
            key = it.key()
            if key > stop or not key.startswith(b"d|"):
                break
            yield key, key[23:].decode()
            it.next()

    def write(
        self,
        states: dict[str, bytes | None],
        due_moves: list[tuple[bytes | None, bytes | None]],
        checkpoint: int | None,
    ) -> None:
        """Apply one committed transaction's changes atomically."""
        batch = WriteBatch(raw_mode=True)
        for sub, value in states.items():
            if value is None:
                batch.delete(state_key(sub))
            else:
                batch.put(state_key(sub), value)
        for old, new in due_moves:
            if old == new:
                continue  # unchanged (`old` is the key the committed state was indexed under)
            if old is not None:
                batch.delete(old)
            if new is not None:
                batch.put(new, b"")
        if checkpoint is not None:
            batch.put(CHECKPOINT, b"%d" % checkpoint)
        self.db.write(batch)

    def close(self) -> None:
        self.db.close()

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


class StateCache:
    """Committed states of one partition, kept decoded in memory: (state, its due key) by
    subscription id, the least recently committed first.

    An entry is always a committed version. ``PartitionStates`` takes an entry out
    (``take``) when a transaction first touches its subscription (the domain updates
    states in place) and puts the new version back (``put``) only once that transaction
    has committed, just as RocksDB is written only then: an aborted transaction leaves
    nothing of its own here, and a revoked partition's cache is dropped with its store.
    Bounded: beyond ``capacity`` entries the least recently committed are dropped, and
    read from RocksDB again when needed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[str, tuple[Any, bytes | None]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def take(self, subscription_id: str) -> tuple[Any, bytes | None] | None:
        return self.entries.pop(subscription_id, None)

    def put(self, subscription_id: str, state: Any, due: bytes | None) -> None:
        self.entries[subscription_id] = (state, due)

    def trim(self) -> None:
        """Drop the oldest entries beyond capacity, and a sixteenth more, so that a full
        cache is not trimmed again after every transaction."""
        excess = len(self.entries) - self.capacity
        if excess > 0:
            for key in list(islice(self.entries, excess + self.capacity // 16)):
                del self.entries[key]


@dataclass
class StateChanges:
    """The state changes of one transaction, per partition."""

    states: dict[int, dict[str, Any]] = field(default_factory=dict)  # None: deleted
    # the due-index key each subscription had before this transaction
    original_due: dict[int, dict[str, bytes | None]] = field(default_factory=dict)
    encoded: dict[int, dict[str, bytes | None]] = field(default_factory=dict)
    # subscriptions changed without moving in time (usage added up): due key unchanged
    due_unchanged: dict[int, set[str]] = field(default_factory=dict)


class PartitionStates:
    """The states of the partitions a worker owns, by subscription id: per partition a
    PartitionStore and a StateCache (the partitions share ``cache_entries``), restored
    from the changelog on assignment. A transaction reads states through ``get``, sends
    its changes to the changelog with ``produce``, and once it has committed ``apply``
    writes them to the stores and caches (never before: an aborted transaction leaves
    nothing here).

    The processor supplies how a state is read from its bytes (``decode``; a state
    writes itself with ``to_bytes()``) and when its next period ends (``due_us``, µs, None
    if never), which keys the due index."""

    def __init__(
        self,
        root: Path,
        changelog: str,
        cache_entries: int,
        restorer: Callable[[], Any],
        decode: Callable[[bytes], Any],
        due_us: Callable[[Any], int | None],
        encode: Callable[[Any], bytes] | None = None,
    ) -> None:
        """restorer: a new consumer to read the changelog with (assigned by hand,
        ``enable.partition.eof`` on), closed after each restore; encode: a state's bytes
        (default: its ``to_bytes()``)."""
        if cache_entries < 1:
            raise ValueError("the state cache must hold at least 1 entry")
        self.root, self.changelog, self.cache_entries = root, changelog, cache_entries
        self.restorer, self.decode, self.due_us = restorer, decode, due_us
        self.encode: Callable[[Any], bytes] = encode or (lambda state: state.to_bytes())
        self.stores: dict[int, PartitionStore] = {}
        self.caches: dict[int, StateCache] = {}
        self.changelog_next: dict[int, int] = {}  # partition -> next changelog offset
        self.on_failure: Callable[[Any, Any], None] = lambda _err, _msg: None

    # --- partitions -------------------------------------------------------------------

    def assign(self, partitions: list[int]) -> None:
        new = sorted(set(partitions) - set(self.stores))
        for p, store in self.restore(new).items():
            self.stores[p] = store
            self.caches[p] = StateCache(0)
        self._size_caches()

    def revoke(self, partitions: list[int]) -> None:
        for p in partitions:
            store = self.stores.pop(p, None)
            if store:
                store.close()
            self.caches.pop(p, None)
        self._size_caches()

    def close(self) -> None:
        for store in self.stores.values():
            store.close()

    def _size_caches(self) -> None:
        for cache in self.caches.values():
            cache.capacity = max(1, self.cache_entries // len(self.caches))
            cache.trim()

    def due_key(self, sub: str, state: Any) -> bytes | None:
        """The due-index key of a state (decoded or its bytes; None: no state)."""
        if state is None:
            return None
        end = self.due_us(self.decode(state) if isinstance(state, bytes) else state)
        return due_key(end, sub) if end is not None else None

    def restore(self, partitions: list[int]) -> dict[int, PartitionStore]:
        """Bring the RocksDB of each partition up to the end of its changelog partition:
        all of them through one consumer, each done at its end-of-partition event (a store
        already up to date still has the last transaction's commit marker ahead of it, so
        the event is what says so, promptly: polls wait 0.1 s at most)."""
        stores = {p: PartitionStore(self.root / f"p{p}") for p in partitions}
        if not stores:
            return stores
        restorer = self.restorer()
        try:
            todo = []
            for p, store in stores.items():
                changelog = TopicPartition(self.changelog, p)
                low, high = clients.retrying(
                    lambda changelog=changelog: restorer.get_watermark_offsets(changelog, 30)
                )
                start = max(store.checkpoint, low)
                if start < high:
                    todo.append(TopicPartition(self.changelog, p, start))
            if not todo:
                return stores
            restorer.assign(todo)
            restoring = {tp.partition for tp in todo}
            restored: Counter[int] = Counter()
            while restoring:
                # partition -> (states, due-index moves, next changelog offset)
                chunk: dict[int, tuple[dict[str, bytes | None], list, int]] = {}
                for msg in restorer.consume(10_000, timeout=0.1):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            restoring.discard(msg.partition())  # caught up
                        elif err.fatal():
                            raise KafkaException(err)
                        continue  # transient: librdkafka retries
                    p, sub = msg.partition(), msg.key().decode()
                    states, moves, _ = chunk.get(p) or ({}, [], 0)
                    old = stores[p].get(sub) if sub not in states else states[sub]
                    states[sub] = msg.value()
                    moves.append((self.due_key(sub, old), self.due_key(sub, msg.value())))
                    chunk[p] = (states, moves, msg.offset() + 1)
                    restored[p] += 1
                for p, (states, moves, next_offset) in chunk.items():
                    stores[p].write(states, moves, next_offset)
            log.info("state restored", partitions=[tp.partition for tp in todo],
                     records=sum(restored.values()))  # fmt: skip
            return stores
        except BaseException:
            for store in stores.values():
                store.close()
            raise
        finally:
            restorer.close()

    # --- a transaction ------------------------------------------------------------------

    def get(self, changes: StateChanges, p: int, sub: str) -> Any:
        """The subscription's state as this transaction sees it. Its first touch takes the
        committed version out of the cache (or reads it from RocksDB): the domain updates
        it in place, and only a commit puts it back (``apply``)."""
        dirty = changes.states.get(p)
        if dirty is None:
            dirty = changes.states[p] = {}
            changes.original_due[p] = {}
        elif sub in dirty:
            return dirty[sub]
        cached = self.caches[p].take(sub)
        if cached is not None:
            state, due = cached
        else:
            raw = self.stores[p].get(sub)
            state = self.decode(raw) if raw is not None else None
            due = self.due_key(sub, state)
        changes.original_due[p][sub] = due
        return state

    def put_back(self, changes: StateChanges, p: int, sub: str, state: Any) -> None:
        """A state ``get`` took but the transaction left as it was: the committed
        version, cached again (not written: nothing changed)."""
        self.caches[p].put(sub, state, changes.original_due[p][sub])

    def produce(
        self, producer: Any, changes: StateChanges, on_failure: Callable[[Any, Any], None]
    ) -> None:
        """The transaction's states to the changelog, each partition's to its partition;
        on_failure: the transaction's delivery report, for a failed delivery."""
        self.on_failure = on_failure
        # Only a partition's last record reports its delivery: it has the highest offset
        # (one producer, in order), which is all the checkpoint needs. Any record that
        # fails makes commit_transaction fail, so none goes unnoticed.
        produce, topic = producer.produce, self.changelog
        for p, states in changes.states.items():
            encoded = changes.encoded.setdefault(p, {})
            last = len(states) - 1
            for n, (sub, state) in enumerate(states.items()):
                value = encoded[sub] = self.encode(state) if state is not None else None
                if n < last:
                    produce(topic, key=sub.encode(), value=value, partition=p)
                else:
                    produce(topic, key=sub.encode(), value=value, partition=p,
                            on_delivery=self._delivered)  # fmt: skip

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.on_failure(err, msg)
        else:
            p = msg.partition()
            self.changelog_next[p] = max(self.changelog_next.get(p, 0), msg.offset() + 1)

    def apply(self, changes: StateChanges) -> None:
        """The committed transaction's states into the stores and caches."""
        for p, states in changes.states.items():
            store = self.stores.get(p)
            if store is None:
                continue
            cache = self.caches[p]
            original_due = changes.original_due.get(p, {})
            unchanged = changes.due_unchanged.get(p, set())
            moves = []
            for sub, state in states.items():
                due = original_due[sub] if sub in unchanged else self.due_key(sub, state)
                moves.append((original_due.get(sub), due))
                if state is not None:
                    cache.put(sub, state, due)
            store.write(changes.encoded[p], moves, self.changelog_next.get(p))
            cache.trim()
