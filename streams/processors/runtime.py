"""What every processor process shares: graceful stop on SIGTERM/SIGINT, batch polling."""

from __future__ import annotations

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
