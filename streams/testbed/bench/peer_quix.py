"""Quix Streams' side of `streambill bench peers`, run by the python of its own venv: a
StreamingDataFrame with a stateful apply, its state in RocksDB behind its changelog
topic, ``processing_guarantee="exactly-once"``. On SIGTERM the application stops (its
last checkpoint committed) and the totals are written."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import quixstreams
from peer_common import (
    UsageDecoder,
    mark_ready,
    parse_args,
    total_key,
    unmark_ready,
    write_result,
)
from quixstreams import Application

args = parse_args(__doc__ or "")
decode = UsageDecoder(args.schema, args.header)
returned: dict[str, Decimal] = {}  # what the state returned, for the check at the end
events = 0


class ReadyApplication(Application):
    """Says when its partitions are assigned (with empty changelogs, nothing to recover)
    and when a rebalance takes them away."""

    def _on_assign(self, consumer: Any, topic_partitions: list[Any]) -> None:
        super()._on_assign(consumer, topic_partitions)
        if topic_partitions:
            mark_ready(args.ready)

    def _on_revoke(self, consumer: Any, topic_partitions: list[Any]) -> None:
        unmark_ready(args.ready)
        super()._on_revoke(consumer, topic_partitions)


def add_up(value: bytes, state: Any) -> None:
    global events
    event = decode(value)
    key = total_key(event)
    # the state's values are JSON (orjson): a Decimal is kept as its string
    total = Decimal(state.get(key, "0")) + event["quantity"]
    state.set(key, str(total))
    returned[key] = total
    events += 1


app = ReadyApplication(
    broker_address=args.bootstrap,
    consumer_group=args.group,
    auto_offset_reset="earliest",
    commit_interval=args.commit_interval,
    state_dir=args.state_dir,
    processing_guarantee="exactly-once",
    loglevel="WARNING",
    consumer_extra_config={"client.id": f"{args.group}-{args.worker}"},
)
usage = app.topic(args.topic, key_deserializer="bytes", value_deserializer="bytes")
sdf = app.dataframe(usage)
sdf = sdf.apply(add_up, stateful=True)

if __name__ == "__main__":
    try:
        app.run()
    finally:
        write_result(args.result, "quix", quixstreams.__version__, events, returned)
