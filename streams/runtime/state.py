"""Per-partition state store: RocksDB (rocksdict) backed by a compacted changelog topic.

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
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

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
        # whose states are consistent with it, and _restore replays the changelog from there.
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

    An entry is always a committed version. The rating processor takes an entry out
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
