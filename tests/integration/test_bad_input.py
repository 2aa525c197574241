"""Bad input on the real broker and chDB: a known mix of valid and hostile records on the
rating processor's inputs (random bytes, empty, truncated, trailing bytes, another
topic's schema, negative and enormous quantities, timestamps far in the past and future,
unknown subscriptions and plans, another account's subscription, a currency mismatch,
duplicates, out of order and late events). The rating processor stays up; every hostile
record has exactly one dead letter with its expected reason and its original bytes, no
valid one has any, and every valid one had its effect (duplicates once): inputs =
processed + dead letters, by its own counters and in the warehouse. The sink, which
lands every record it can decode, adds up too: inputs = rows + its dead letters."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import SUBSCRIPTIONS, USAGE
from tests.hostile import HOSTILE_KINDS, rating_scenario
from tests.integration.helpers import Procs, scalar, start_rating, start_sink, wait_until
from tests.integration.test_operations import sample, scrape

pytestmark = pytest.mark.kafka
TOPICS = {"subscriptions": SUBSCRIPTIONS, "usage": USAGE}


def test_hostile_mix_on_the_rating_inputs(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = pipeline_env
    hostile = [*HOSTILE_KINDS, "late_usage", "late_usage", "not_avro", "truncated"]
    scenario = rating_scenario("bad-", 8, hostile, datetime.now(UTC), seed=11)
    n_valid, n_hostile = len(scenario.valid), len(scenario.hostile)
    assert (n_valid, n_hostile) == (8 * 7, len(hostile))

    sink = procs.add(start_sink(settings, kafka_bootstrap))
    # everything is published before rating starts, billing.subscriptions first: the
    # event-time order the scenario's outcomes assume does not depend on timing then
    producer = clients.producer(settings, kafka_bootstrap)
    where: dict[tuple[str, int, int], int] = {}  # (topic, partition, offset) -> input index
    for kind in ("subscriptions", "usage"):
        for n, inp in enumerate(scenario.inputs):
            if inp.topic == kind:
                producer.produce(
                    TOPICS[kind].name, key=inp.key, value=inp.value,
                    on_delivery=lambda err, msg, n=n: where.__setitem__(
                        (msg.topic(), msg.partition(), msg.offset()), n),
                )  # fmt: skip
        producer.flush()
    assert len(where) == len(scenario.inputs)
    rating = procs.add(start_rating(settings, kafka_bootstrap))

    invoices = "SELECT count() FROM invoices FINAL"
    rated_dead = "SELECT count() FROM dead_letters FINAL WHERE processor = 'rating'"
    wait_until(
        lambda: scalar(settings, invoices) >= 2 * 8 and scalar(settings, rated_dead) >= n_hostile,
        60, "invoices and dead letters", [sink, rating],
    )  # fmt: skip

    # the warehouse: one dead letter per hostile record, with its reason and bytes
    rows = scalar(settings, (
        "SELECT groupArray((source_topic, source_partition, source_offset, reason, detail, "
        "hex(ifNull(value, '')))) FROM dead_letters FINAL WHERE processor = 'rating'"
    ))  # fmt: skip
    got = {(t, int(p), int(o)): (reason, detail, value) for t, p, o, reason, detail, value in rows}
    assert len(got) == len(rows) == n_hostile
    for coordinates, (reason, detail, value) in got.items():
        inp = scenario.inputs[where[coordinates]]
        assert inp.expect is not None, f"valid input dead-lettered: {inp.what}: {detail}"
        assert (reason, inp.expect[1] in detail) == (inp.expect[0], True), (inp.what, detail)
        assert bytes.fromhex(value) == inp.value, inp.what
    assert {where[c] for c in got} == {n for n, i in enumerate(scenario.inputs) if i.expect}

    # every valid record had its effect: two invoices per subscription, the first period
    # billing its usage exactly (the duplicate once, the out-of-order ones included)
    assert scalar(settings, invoices) == 2 * 8
    lines = scalar(settings, (
        "SELECT groupArray((subscription_id, toString(quantity))) FROM invoice_lines FINAL "
        "WHERE kind = 'usage'"
    ))  # fmt: skip
    assert {s: Decimal(q) for s, q in lines} == scenario.first_period_usage
    reasons = scalar(settings, "SELECT groupArray(reason) FROM invoices FINAL")
    assert Counter(reasons) == {"created": 8, "period_end": 8}

    # the processor's own counters: inputs = processed + dead letters, by reason
    text = scrape(settings, "rating")
    consumed = sum(sample(text, "streambill_records_total", processor="rating", topic=t.name)
                   for t in TOPICS.values())  # fmt: skip
    assert consumed == n_valid + n_hostile
    by_reason = Counter(i.expect[0] for i in scenario.hostile if i.expect)
    for reason, n in by_reason.items():
        assert sample(text, "streambill_dead_letters_total", processor="rating",
                      reason=reason) == n, reason  # fmt: skip
    assert sample(text, "streambill_dead_letters_total", processor="rating") == n_hostile
    assert sample(text, "streambill_invoices_total") == 2 * 8

    # the sink lands what it can decode and dead-letters the rest: it adds up too
    landed = (
        "SELECT (SELECT count() FROM subscription_events FINAL) + "
        "(SELECT count() FROM usage_events FINAL) + (SELECT count() FROM dead_letters FINAL "
        "WHERE processor = 'sink')"
    )
    wait_until(lambda: scalar(settings, landed) >= len(scenario.inputs), 30, "the sink", [sink])
    assert scalar(settings, landed) == len(scenario.inputs)
    assert rating.alive and sink.alive
