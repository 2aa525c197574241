"""What both peer programs of `streambill bench peers` share (peer_faust.py, peer_quix.py).

They run in the peers' own virtual environments, not in streambill's: this module needs
only the standard library and fastavro, and nothing of `streams`. A peer reads the
project's usage records as streambill writes them (Avro single-object encoding: the
``C3 01`` marker and the writer schema's fingerprint, then the schemaless body), adds up
``quantity`` (a Decimal) per (subscription_id, metric) in its framework's state, and on
its way out writes the totals its state returned and its own CPU time to a JSON file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    p.add_argument("--topic", required=True, help="the usage topic")
    p.add_argument("--group", required=True, help="consumer group / application id")
    p.add_argument("--partitions", type=int, required=True)
    p.add_argument("--worker", type=int, default=0, help="this process's index")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--schema", required=True, help="usage_event.avsc")
    p.add_argument("--header", required=True, help="hex: C3 01 + the schema's fingerprint")
    p.add_argument("--commit-interval", type=float, default=1.0, help="seconds")
    p.add_argument("--ready", required=True, help="file made once partitions are assigned")
    p.add_argument("--result", required=True, help="the totals and CPU time, on exit")
    return p.parse_args()


class UsageDecoder:
    """A usage record's value -> its fields (quantity a Decimal), through fastavro."""

    def __init__(self, schema_path: str, header_hex: str) -> None:
        self.schema = fastavro.parse_schema(json.loads(Path(schema_path).read_text()))
        self.header = bytes.fromhex(header_hex)
        self.skip = len(self.header)

    def __call__(self, value: bytes) -> dict[str, Any]:
        if value[: self.skip] != self.header:
            raise ValueError(f"not a usage_event record: starts {value[: self.skip].hex()}")
        return fastavro.schemaless_reader(io.BytesIO(value[self.skip :]), self.schema, None)


def total_key(event: dict[str, Any]) -> str:
    """The key a total is kept under: subscription and metric."""
    return f"{event['subscription_id']}|{event['metric']}"


def mark_ready(path: str) -> None:
    """Partitions assigned and state recovered: the benchmark may start its clock."""
    Path(path).touch()


def unmark_ready(path: str) -> None:
    """A rebalance began: not ready again until it is done."""
    Path(path).unlink(missing_ok=True)


def write_result(
    path: str, peer: str, version: str, events: int, totals: dict[str, Decimal]
) -> None:
    """The totals as the framework's state returned them, the events this process added
    up, and its CPU time over its whole life (start-up included), written atomically."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    payload = {
        "peer": peer,
        "version": version,
        "pid": os.getpid(),
        "events": events,
        "cpu_s_process": round(usage.ru_utime + usage.ru_stime, 3),
        "totals": {key: str(value) for key, value in totals.items()},
    }
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)
