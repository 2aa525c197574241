"""The benchmarks' generated inputs (streams.testbed.bench.inputs)."""

from __future__ import annotations

import json
from pathlib import Path

from streams.codec import codec
from streams.domain.catalog import Catalog
from streams.kafka.topics import SUBSCRIPTIONS, USAGE
from streams.testbed.bench.inputs import (
    UNIQUE_PLAN,
    UNIQUE_USERS,
    encoded_subscriptions,
    encoded_usage,
    unique_catalog,
)


def test_a_third_of_the_bench_subscriptions_count_distinct_users(tmp_path: Path) -> None:
    """bench billrun --unique-count-every 3: every third subscription on the unique_count
    plan of the bench catalog, and only its usage names a user (a bounded set of them)."""
    catalog = Catalog.from_dict(json.loads(unique_catalog(tmp_path / "c.json").read_text()))
    [charge] = catalog.plans[UNIQUE_PLAN].usage_charges
    assert (charge.aggregation.value, charge.unique_field) == ("unique_count", "user")
    subs = [codec(SUBSCRIPTIONS.schema).decode(v) for _, v in encoded_subscriptions(9, ["p"], 3)]
    assert [s["plan_id"] == UNIQUE_PLAN for s in subs] == [n % 3 == 0 for n in range(9)]
    usage = [codec(USAGE.schema).decode(v) for _, v in encoded_usage(9, 60, unique_every=3)]
    named = {(u["subscription_id"], u["properties"]["user"]) for u in usage if u["properties"]}
    assert {s for s, _ in named} == {"sub-00000000", "sub-00000003", "sub-00000006"}
    assert len({user for _, user in named}) == UNIQUE_USERS
