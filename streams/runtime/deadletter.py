"""Dead letters: every input that cannot be processed, with its reason and original bytes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from streams.codec import codec
from streams.kafka.topics import DEAD_LETTER
from streams.metrics import DEAD_LETTERS

_NAMESPACE = uuid.UUID("5b0c3f0e-7d59-4c1e-9a35-4b8e8f1f0d11")


def dead_letter_record(msg: Any, reason: str, detail: str, processor: str) -> dict[str, Any]:
    """A dead-letter record for a consumed Kafka message; its id is deterministic
    (topic, partition, offset, reason, processor), so re-processing after a crash lands
    it once."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    identity = f"{topic}|{partition}|{offset}|{reason}|{processor}"
    return {
        "dead_letter_id": str(uuid.uuid5(_NAMESPACE, identity)),
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": msg.key(),
        "value": msg.value(),
        "reason": reason,
        "detail": detail[:2000],
        "processor": processor,
        "failed_at": datetime.now(UTC),
    }


def produce_dead_letter(
    producer: Any, msg: Any, reason: str, detail: str, processor: str, **produce_args: Any
) -> None:
    DEAD_LETTERS.labels(processor, reason).inc()
    producer.produce(
        DEAD_LETTER.name,
        key=msg.key(),
        value=codec(DEAD_LETTER.schema).encode(dead_letter_record(msg, reason, detail, processor)),
        partition=msg.partition(),  # co-partitioned with its source
        **produce_args,
    )
