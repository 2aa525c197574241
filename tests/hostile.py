"""Hostile input for the bad-input tests: Avro records carrying any value their binary
layout allows (timestamps as raw longs, decimals as raw unscaled integers of any size),
fake consumed messages, and one scenario of valid and hostile rating inputs whose every
outcome is known in advance (used by the unit model and by the real-broker test)."""

from __future__ import annotations

import copy
import io
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any

import fastavro
from fastavro.schema import parse_schema

from streams.codec import SCHEMAS_DIR, codec, load_schema_json

CODEC_REASONS = frozenset({"empty_value", "invalid_avro", "unknown_schema"})


def _loosen(t: Any) -> Any:
    """The same binary layout without logical types: timestamp-micros -> long, decimal ->
    bytes (so any long or any unscaled integer can be written)."""
    if isinstance(t, dict):
        if t.get("logicalType") == "timestamp-micros":
            return "long"
        if t.get("logicalType") == "decimal":
            return "bytes"
        return {k: _loosen(v) for k, v in t.items()}
    if isinstance(t, list):
        return [_loosen(x) for x in t]
    return t


@cache
def raw_schema(name: str) -> dict[str, Any]:
    """The schema as JSON, logical types removed."""
    return _loosen(copy.deepcopy(load_schema_json(SCHEMAS_DIR / f"{name}.avsc")))


@cache
def _parsed_raw(name: str) -> Any:
    return parse_schema(raw_schema(name))


def hostile_encode(name: str, raw_record: dict[str, Any]) -> bytes:
    """A record in the raw layout of schema `name`, framed with that schema's real header:
    what a producer that skips every check could publish."""
    buf = io.BytesIO()
    buf.write(codec(name).header)
    fastavro.schemaless_writer(buf, _parsed_raw(name), raw_record)
    return buf.getvalue()


def micros(dt: datetime) -> int:
    d = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def unscaled(n: int) -> bytes:
    """An Avro decimal's bytes: the unscaled value, big-endian two's complement."""
    return n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True)


def ms(dt: datetime) -> int:
    return micros(dt) // 1000


@dataclass
class Msg:
    """A consumed Kafka message, as the processors see one."""

    topic_: str
    value_: bytes | None
    key_: bytes | None = b"k"
    partition_: int = 0
    offset_: int = 0
    timestamp_ms: int | None = None

    def topic(self) -> str:
        return self.topic_

    def value(self) -> bytes | None:
        return self.value_

    def key(self) -> bytes | None:
        return self.key_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def timestamp(self) -> tuple[int, int]:
        return (1, self.timestamp_ms) if self.timestamp_ms is not None else (0, -1)

    def error(self) -> None:
        return None


@dataclass
class FakeProducer:
    """Records what a processor produces (dead letters, forwarded records)."""

    produced: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)

    def produce(self, topic: str, key: Any = None, value: Any = None, **_: Any) -> None:
        self.produced.append((topic, key, value))

    def flush(self, *_: Any) -> int:
        return 0

    def poll(self, *_: Any) -> int:
        return 0


# --- a scenario of rating inputs ---------------------------------------------------------

PLAN = "starter-eur"  # EUR, monthly; api_calls per unit
OTHER_CURRENCY_PLAN = "pro-usd"
T0 = datetime(2026, 1, 5, tzinfo=UTC)  # anchors: first periods end in early February
SUBSCRIPTIONS, USAGE = "subscriptions", "usage"


@dataclass(frozen=True)
class Input:
    topic: str  # SUBSCRIPTIONS or USAGE
    key: bytes
    value: bytes
    # (reason, a fragment of the detail) of the one dead letter it must give; None: it is
    # processed (applied, or a duplicate usage event counted once)
    expect: tuple[str, str] | None
    what: str
    at: datetime = T0  # its event time (sorts billing.subscriptions records)


@dataclass
class Scenario:
    inputs: list[Input]
    # subscription -> api_calls of its first period: its valid usage, each event id once
    first_period_usage: dict[str, Decimal]
    accounts: list[str]
    subscriptions: list[str]

    @property
    def hostile(self) -> list[Input]:
        return [i for i in self.inputs if i.expect is not None]

    @property
    def valid(self) -> list[Input]:
        return [i for i in self.inputs if i.expect is None]


def _sub_event(
    kind: str, at: datetime, account: str, sub: str, event_id: str, **over: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": kind,
        "timestamp": micros(at),
        "account_id": account,
        "subscription_id": sub,
        "plan_id": None,
        "mode": None,
        "payment_method": "tok_visa",
        **over,
    }


def _usage(at: datetime, account: str, sub: str, event_id: str, quantity: int) -> dict[str, Any]:
    """quantity: the unscaled value (scale 9)."""
    return {
        "event_id": event_id,
        "timestamp": micros(at),
        "account_id": account,
        "subscription_id": sub,
        "metric": "api_calls",
        "quantity": unscaled(quantity),
    }


HOSTILE_KINDS = (
    "not_avro",
    "empty",
    "truncated",
    "trailing_bytes",
    "usage_on_subscriptions",
    "subscription_on_usage",
    "negative_quantity",
    "enormous_quantity",
    "far_future_usage",
    "far_past_usage",
    "far_future_created",
    "empty_subscription_id",
    "unknown_event_type",
    "unknown_subscription_usage",
    "other_accounts_subscription",
    "duplicate_created",
    "currency_mismatch",
    "unknown_plan",
    "cancel_unknown_subscription",
    "late_usage",
)


def rating_scenario(
    prefix: str, accounts: int, hostile: list[str], published: datetime, seed: int = 0
) -> Scenario:
    """`accounts` accounts with one subscription each on PLAN: created, four usage events
    in the first period (two of them out of order), a duplicate of the first, and one in
    the second period that closes the first (so each subscription has two invoices:
    created and period_end). Plus one hostile input per entry of `hostile` (kinds from
    HOSTILE_KINDS, repeats allowed), each with the dead letter it must give. Records of
    billing.subscriptions are in event-time order; late usage comes after every closing
    one. `published`: when the records are published (the far-future bound's origin)."""
    rng = random.Random(seed)
    us, ue = "usage_event", "subscription_event"
    inputs: list[Input] = []
    usage_lanes: list[list[Input]] = []
    totals: dict[str, Decimal] = {}
    accts = [f"{prefix}acct-{i}" for i in range(accounts)]
    subs = [f"{prefix}sub-{i}" for i in range(accounts)]
    anchors = [T0 + timedelta(hours=i) for i in range(accounts)]
    for acct, sub, anchor in zip(accts, subs, anchors, strict=True):
        key = acct.encode()
        created = _sub_event(
            "subscription.created", anchor, acct, sub, f"{sub}-created", plan_id=PLAN
        )
        inputs.append(
            Input(SUBSCRIPTIONS, key, hostile_encode(ue, created), None, "created", anchor)
        )
        lane = []
        total = 0
        for n, days in enumerate((1, 5, 3, 7)):  # 5 then 3: out of order, same period
            q = rng.randrange(0, 10**13)  # up to 10,000 api_calls, 9 decimals
            total += q
            at = anchor + timedelta(days=days, minutes=rng.randrange(600))
            lane.append(
                Input(
                    USAGE,
                    key,
                    hostile_encode(us, _usage(at, acct, sub, f"{sub}-u{n}", q)),
                    None,
                    f"usage {n}",
                    at,
                )
            )
        lane.append(Input(USAGE, key, lane[0].value, None, "duplicate usage", lane[0].at))
        closer = anchor + timedelta(days=32)
        lane.append(
            Input(
                USAGE,
                key,
                hostile_encode(us, _usage(closer, acct, sub, f"{sub}-close", 10**9)),
                None,
                "usage closing the first period",
                closer,
            )
        )
        usage_lanes.append(lane)
        totals[sub] = Decimal(total).scaleb(-9)
    # usage lanes interleaved at random, each account's own order kept
    while any(usage_lanes):
        lane = rng.choice([lane for lane in usage_lanes if lane])
        inputs.append(lane.pop(0))

    acct, sub, anchor, key = accts[0], subs[0], anchors[0], accts[0].encode()
    valid_usage = hostile_encode(us, _usage(anchor + timedelta(days=2), acct, sub, "x", 10**9))
    late: list[Input] = []

    def add(
        topic: str,
        value: bytes,
        expect: tuple[str, str],
        what: str,
        at: datetime = anchor,
        k: bytes = key,
    ) -> None:
        inputs.insert(rng.randrange(len(inputs) + 1), Input(topic, k, value, expect, what, at))

    for n, kind in enumerate(hostile):
        eid = f"{prefix}hostile-{n}"
        at = anchor + timedelta(days=2, minutes=n)
        if kind == "not_avro":
            add(
                USAGE,
                b"\x00this is not avro " + rng.randbytes(8),
                ("invalid_avro", "not Avro"),
                kind,
            )
        elif kind == "empty":
            add(SUBSCRIPTIONS, b"", ("empty_value", "no value"), kind)
        elif kind == "truncated":
            add(
                USAGE, valid_usage[: rng.randrange(1, len(valid_usage))], ("invalid_avro", ""), kind
            )
        elif kind == "trailing_bytes":
            add(USAGE, valid_usage + b"\x00", ("invalid_avro", "trailing bytes"), kind)
        elif kind == "usage_on_subscriptions":
            add(SUBSCRIPTIONS, valid_usage, ("unknown_schema", "writer fingerprint"), kind)
        elif kind == "subscription_on_usage":
            rec = _sub_event("subscription.cancelled", at, acct, sub, eid, mode="immediate")
            add(USAGE, hostile_encode(ue, rec), ("unknown_schema", "writer fingerprint"), kind)
        elif kind == "negative_quantity":
            add(
                USAGE,
                hostile_encode(us, _usage(at, acct, sub, eid, -(10**9))),
                ("invalid_event", "negative quantity"),
                kind,
            )
        elif kind == "enormous_quantity":
            add(
                USAGE,
                hostile_encode(us, _usage(at, acct, sub, eid, 10**39)),
                ("invalid_event", "too large"),
                kind,
            )
        elif kind == "far_future_usage":
            future = published + timedelta(days=30)
            add(
                USAGE,
                hostile_encode(us, _usage(future, acct, sub, eid, 10**9)),
                ("invalid_event", "after the record was published"),
                kind,
            )
        elif kind == "far_past_usage":
            past = datetime(1999, 6, 1, tzinfo=UTC)
            add(
                USAGE,
                hostile_encode(us, _usage(past, acct, sub, eid, 10**9)),
                ("invalid_event", "before 2000-01-01"),
                kind,
            )
        elif kind == "far_future_created":
            future = datetime(2100, 1, 1, tzinfo=UTC)
            rec = _sub_event(
                "subscription.created", future, acct, f"{sub}-future", eid, plan_id=PLAN
            )
            add(
                SUBSCRIPTIONS,
                hostile_encode(ue, rec),
                ("invalid_event", "after the record was published"),
                kind,
                future,
            )
        elif kind == "empty_subscription_id":
            rec = _sub_event("subscription.created", at, acct, "", eid, plan_id=PLAN)
            add(
                SUBSCRIPTIONS,
                hostile_encode(ue, rec),
                ("invalid_event", "non-empty string"),
                kind,
                at,
            )
        elif kind == "unknown_event_type":
            rec = _sub_event("subscription.paused", at, acct, sub, eid)
            add(
                SUBSCRIPTIONS,
                hostile_encode(ue, rec),
                ("invalid_event", "unknown event type"),
                kind,
                at,
            )
        elif kind == "unknown_subscription_usage":
            add(
                USAGE,
                hostile_encode(us, _usage(at, acct, f"{sub}-nobody", eid, 10**9)),
                ("rejected", "unknown subscription"),
                kind,
            )
        elif kind == "other_accounts_subscription":
            # under the owner's key (its partition), but naming another account
            add(
                USAGE,
                hostile_encode(us, _usage(at, f"{prefix}intruder", sub, eid, 10**9)),
                ("rejected", "belongs to another account"),
                kind,
            )
        elif kind == "duplicate_created":
            rec = _sub_event(
                "subscription.created", anchor + timedelta(minutes=30), acct, sub, eid, plan_id=PLAN
            )
            add(
                SUBSCRIPTIONS,
                hostile_encode(ue, rec),
                ("rejected", "duplicate subscription.created"),
                kind,
                anchor + timedelta(minutes=30),
            )
        elif kind == "currency_mismatch":
            rec = _sub_event(
                "subscription.plan_changed", at, acct, sub, eid, plan_id=OTHER_CURRENCY_PLAN
            )
            add(SUBSCRIPTIONS, hostile_encode(ue, rec), ("rejected", "another currency"), kind, at)
        elif kind == "unknown_plan":
            rec = _sub_event("subscription.plan_changed", at, acct, sub, eid, plan_id="gold")
            add(
                SUBSCRIPTIONS,
                hostile_encode(ue, rec),
                ("rejected", "unknown plan 'gold'"),
                kind,
                at,
            )
        elif kind == "cancel_unknown_subscription":
            rec = _sub_event(
                "subscription.cancelled", at, acct, f"{sub}-nobody", eid, mode="immediate"
            )
            add(
                SUBSCRIPTIONS,
                hostile_encode(ue, rec),
                ("rejected", "unknown subscription"),
                kind,
                at,
            )
        elif kind == "late_usage":
            # after the usage that closed the first period: that span is invoiced already
            i = rng.randrange(accounts)
            rec = _usage(anchors[i] + timedelta(days=10), accts[i], subs[i], eid, 10**9)
            late.append(
                Input(
                    USAGE,
                    accts[i].encode(),
                    hostile_encode(us, rec),
                    ("rejected", "late event"),
                    kind,
                )
            )
        else:
            raise ValueError(f"unknown hostile kind {kind!r}")
    # billing.subscriptions in event-time order (a stable sort: the undecodable ones stay
    # where they are relative to their neighbours), billing.usage as built, late ones last
    by_topic = [i for i in inputs if i.topic == SUBSCRIPTIONS]
    by_topic.sort(key=lambda i: i.at)
    ordered = iter(by_topic)
    inputs = [next(ordered) if i.topic == SUBSCRIPTIONS else i for i in inputs] + late
    return Scenario(inputs, totals, accts, subs)


class OfflineConsumer:
    """A consumer without a broker: hands out the given polls in turn, each cut to the
    records asked for (the rest comes next, as from Kafka's fetch queue), then nothing;
    records what it was asked and what it paused. Every partition is caught up: its
    position is where OfflineAdmin puts the end."""

    def __init__(self, polls: list[list[Any]] | None = None) -> None:
        self.polls = [poll for poll in polls or [] if poll]
        self.asked: list[tuple[int, float]] = []  # (max records, timeout) per poll
        self.paused: set[tuple[str, int]] = set()

    def hand_out(self, polls: list[list[Any]]) -> None:
        """These polls next (what was left is dropped), asked afresh."""
        self.polls, self.asked = [poll for poll in polls if poll], []

    def consume(self, n: int, timeout: float) -> list[Any]:
        self.asked.append((n, timeout))
        if not self.polls:
            return []
        poll, rest = self.polls[0][:n], self.polls[0][n:]
        self.polls[:1] = [rest] if rest else []
        return poll

    def position(self, tps: list[Any]) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(tp.topic, tp.partition, 0) for tp in tps]

    def pause(self, tps: list[Any]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps: list[Any]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def seek(self, _tp: Any) -> None:
        pass

    def consumer_group_metadata(self) -> str:
        return "group"

    def get_watermark_offsets(self, _tp: Any, *_: Any) -> tuple[int, int]:
        return 0, 0  # an empty changelog: nothing to restore

    def close(self) -> None:
        pass


class OfflineAdmin:
    """Every partition's end is offset `end`: at 0, where OfflineConsumer says it is
    (caught up); beyond, records are still to come."""

    def __init__(self, end: int = 0) -> None:
        self.end = end

    def list_offsets(self, specs: dict[Any, Any], **_: Any) -> dict[Any, Any]:
        from concurrent.futures import Future

        from confluent_kafka import TopicPartition

        futures = {}
        for tp in specs:
            future: Future[Any] = Future()
            future.set_result(TopicPartition(tp.topic, tp.partition, self.end))
            futures[tp] = future
        return futures


class TransactionalProducer(FakeProducer):
    """A FakeProducer with transactions: what a transaction produced is kept in
    ``produced`` once it commits, dropped if it aborts; the offsets of each committed one
    in ``offsets``. ``fail_commits``: how many of the next commits fail."""

    def __init__(self) -> None:
        super().__init__()
        self.offsets: list[dict[tuple[str, int], int]] = []  # per committed transaction
        self.fail_commits = 0
        self._pending: dict[tuple[str, int], int] = {}
        self._before = 0

    def init_transactions(self) -> None:
        pass

    def begin_transaction(self) -> None:
        self._pending, self._before = {}, len(self.produced)

    def send_offsets_to_transaction(self, offsets: list, _metadata: Any) -> None:
        self._pending.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def commit_transaction(self) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            raise RuntimeError("commit failed")
        self.offsets.append(self._pending)

    def abort_transaction(self) -> None:
        del self.produced[self._before :]


def rating_processor(
    catalog: Any,
    home: Any,
    consumer: OfflineConsumer | None = None,
    admin: OfflineAdmin | None = None,
    **options: Any,
) -> Any:
    """A RatingProcessor with partition 0 assigned and no broker: an OfflineConsumer and
    OfflineAdmin (by default both topics caught up), a TransactionalProducer, its state
    under `home`. options: RatingProcessor's, and rating_* settings."""
    from confluent_kafka import TopicPartition

    from streams.config import Settings
    from streams.kafka.topics import SUBSCRIPTIONS
    from streams.processors import rating
    from streams.runtime.loop import StreamLoop

    sizes = {k: options.pop(k) for k in list(options) if k.startswith("rating_")}
    settings = Settings(home=home, **sizes)
    consumer = consumer or OfflineConsumer()
    stream = StreamLoop(rating.NAME, consumer, TransactionalProducer())
    proc = rating.RatingProcessor(
        settings, catalog, stream, admin or OfflineAdmin(), OfflineConsumer, **options
    )
    proc.on_assign(consumer, [TopicPartition(SUBSCRIPTIONS.name, 0)])
    return proc
