"""What every processor process shares: graceful stop on SIGTERM/SIGINT, batch polling,
the collector's and the allocator's tuning, worker indexes."""

from __future__ import annotations

import ctypes
import gc
import signal
import threading
from typing import Any


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop finishes its batch, commits and leaves."""

    def __init__(self) -> None:
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.event.set())

    def __bool__(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()


def poll_batch(consumer: Any, max_messages: int, timeout: float) -> list[Any]:
    """Consume up to max_messages; Kafka-level errors (not data) are raised."""
    from confluent_kafka import KafkaError, KafkaException

    messages = consumer.consume(max_messages, timeout=timeout)
    good = [m for m in messages if m.error() is None]
    if len(good) < len(messages):  # rare: look at the errors only then
        for m in messages:
            err = m.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF and err.fatal():
                raise KafkaException(err)
    return good


def tune_gc(young: int, older: int) -> None:
    """The cyclic collector for a processor that has many records or calls in flight,
    each a few tracked objects freed by reference counting (no cycles): at the default
    young-generation threshold (700 tracked objects allocated, net) young collections ran
    every few dozen records and promoted those in flight, and full ones walked them all.
    The thresholds are raised (young: objects; older: collections of the generation below
    per collection of the next), and what start-up allocated is frozen out of collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, older, older)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """At most `arenas` glibc malloc arenas for this process (mallopt M_ARENA_MAX; the
    default is 8 per core), set before librdkafka's and RocksDB's threads allocate: in a
    1M-subscription bill run a worker held six 64 MiB thread arenas beside its main heap,
    each keeping what was freed in it. False where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, arenas) == 1  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


class WorkerIndexTaken(Exception):
    """The worker index asked for is held by a live process of this installation."""


# Transactional ids: a worker's id must be unique among live workers (a second producer
# with the same id fences the first: a live worker would die), yet stable across the
# worker's restarts, so that the restarted worker's init_transactions fences its zombie
# and at once aborts the transaction it left open (with a fresh id per process, that
# transaction would hold every read_committed reader of its partitions back until
# transaction.timeout.ms). Hence the id is the host name (a StatefulSet pod's is its pod
# name, stable per ordinal; each container and machine has its own) and a worker index
# claimed under $STREAMBILL_HOME by an exclusive lock file per index (claim_worker_index):
# `run` and `scale` take the lowest free index, an index asked for (`--worker N`) is
# refused while a live process holds it, and the kernel releases a dead worker's lock, so
# its restart takes the same index back. A zombie that keeps its lock (a hung process) is
# kept out by the consumer group instead: the rating processor commits its offsets inside
# its transactions with the group's metadata (EOS v2), which the broker refuses from a
# member that is no longer in the group's generation.
_claimed: list[Any] = []  # the lock files this process holds, until it exits


def transactional_id(processor: str, worker: int) -> str:
    import socket

    from streams.kafka.topics import group_id

    return group_id(f"streambill-{processor}-{socket.gethostname()}-{worker}")


def claim_worker_index(settings: Any, processor: str, index: int | None = None) -> int:
    """Take `index`, or the lowest free one, for this process's life (see above)."""
    import fcntl
    import os

    from streams.kafka.topics import namespace

    lock_dir = settings.home / "workers"
    lock_dir.mkdir(parents=True, exist_ok=True)
    for n in [index] if index is not None else range(1024):
        handle = (lock_dir / f"{namespace()}{processor}-{n}.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            if index is None:
                continue
            raise WorkerIndexTaken(
                f"worker index {n} of {processor} is held by a running process (pid "
                f"{holder}); without --worker the lowest free index is taken"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _claimed.append(handle)
        return n
    raise WorkerIndexTaken(f"no free worker index for {processor}")
