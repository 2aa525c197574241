"""faust-streaming's side of `streambill bench peers`, run by the python of its own venv:
an agent updating a Table (faust's recommended pattern), the Table in RocksDB behind its
changelog topic, exactly once (faust's ``processing_guarantee="exactly_once"``: Kafka
transactions). On SIGTERM the worker stops and the totals are written."""

from __future__ import annotations

from decimal import Decimal

import faust
from peer_common import (
    UsageDecoder,
    mark_ready,
    parse_args,
    total_key,
    unmark_ready,
    write_result,
)

args = parse_args(__doc__ or "")
decode = UsageDecoder(args.schema, args.header)
app = faust.App(
    args.group,
    broker=f"kafka://{args.bootstrap}",
    broker_client_id=f"{args.group}-{args.worker}",
    store="rocksdb://",
    processing_guarantee="exactly_once",
    broker_commit_interval=args.commit_interval,
    consumer_auto_offset_reset="earliest",
    topic_partitions=args.partitions,
    topic_replication_factor=1,
    # no standby copies of the other workers' tables: neither streambill nor Quix Streams
    # keeps one, and a standby consumes every changelog record the others write
    table_standby_replicas=0,
    web_enabled=False,
    datadir=args.state_dir,
)
usage = app.topic(
    args.topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
)
# the Table's values go through its JSON serializer, which writes a Decimal as a string
totals = app.Table("usage-totals", default=Decimal, partitions=args.partitions)
returned: dict[str, Decimal] = {}  # what the Table returned, for the check at the end
events = 0


@app.agent(usage)
async def add_up(stream):  # type: ignore[no-untyped-def]
    global events
    async for value in stream:
        event = decode(value)
        key = total_key(event)
        total = Decimal(totals[key]) + event["quantity"]
        totals[key] = total
        returned[key] = total
        events += 1


@app.on_partitions_revoked.connect
async def rebalancing(sender, revoked, **kwargs):  # type: ignore[no-untyped-def]
    unmark_ready(args.ready)


@app.on_rebalance_complete.connect
async def ready(sender, **kwargs):  # type: ignore[no-untyped-def]
    # sent once the tables of the partitions assigned are recovered
    mark_ready(args.ready)


if __name__ == "__main__":
    try:
        faust.Worker(app, loglevel="WARNING").execute_from_commandline()
    finally:
        write_result(args.result, "faust", faust.__version__, events, returned)
