"""The catalog as a stream, on the real broker and chDB: `streambill catalog publish|list|
retire` and the API's /v1/plans write and read billing.catalog (a file imported twice
writes nothing the second time; a refused publication writes nothing at all), and the
sink lands every version into ``plans``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from streams.api.tenants import Tenant, hash_key, save
from streams.config import Settings
from streams.kafka.topics import CATALOG
from streams.publish import read_topic
from streams.stack import start_api
from streams.testbed.demo import DEMO_CATALOG
from streams.warehouse import query
from tests.integration.helpers import Procs, start_sink, wait_until

pytestmark = pytest.mark.kafka
OPS, ACME = "sb_ops_test-key", "sb_acme_test-key"
RAW = json.loads(DEMO_CATALOG.read_text())


def plan(plan_id: str, fee: str | None = None, **changes: Any) -> dict[str, Any]:
    """A plan of the demo catalog, its flat fee at `fee`."""
    p = next(p for p in RAW["plans"] if p["plan_id"] == plan_id)
    charges = [{**c, "amount": fee} if fee and c["model"] == "flat" else c for c in p["charges"]]
    return {**p, "charges": charges, **changes}


def catalog_file(tmp_path: Path, name: str, *changed: dict[str, Any]) -> Path:
    by_id = {p["plan_id"]: p for p in RAW["plans"]} | {p["plan_id"]: p for p in changed}
    path = tmp_path / name
    path.write_text(json.dumps({"plans": list(by_id.values())}))
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    assert os.environ.get("STREAMBILL_HOME"), "never a command without a home of its own"
    return subprocess.run([sys.executable, "-m", "streams.cli", "catalog", *args],
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"COLUMNS": "200"})  # fmt: skip


def records(settings: Settings, bootstrap: str) -> int:
    return len(read_topic(settings, bootstrap, CATALOG))


class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, key: str = OPS, body: Any = None) -> Any:
        return requests.request(method, self.base + path, json=body, timeout=30,
                                headers={"Authorization": f"Bearer {key}"})  # fmt: skip


def test_plans_published_listed_and_retired_by_cli_and_api_and_landed(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, tmp_path: Path
) -> None:
    settings, bootstrap = pipeline_env, kafka_bootstrap
    listed = cli("list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr

    # a catalog file, twice: its plans as version 1, then nothing at all
    first = cli("publish", str(DEMO_CATALOG))
    assert first.returncode == 0, first.stderr
    assert "5 added, 0 new version(s), 0 unchanged" in first.stdout
    written = records(settings, bootstrap)
    assert written == 5
    again = cli("publish", str(DEMO_CATALOG))
    assert again.returncode == 0 and "0 added, 0 new version(s), 5 unchanged" in again.stdout
    assert records(settings, bootstrap) == written

    # the API: an operator publishes, anyone reads, a refusal writes nothing
    save(settings.home / "api" / "tenants.json", {
        "ops": Tenant("ops", "ops-", [hash_key(OPS)], admin=True),
        "acme": Tenant("acme", "acme-", [hash_key(ACME)]),
    })  # fmt: skip
    proc, port = start_api(settings, bootstrap)
    procs.add(proc)
    api = Api(port)
    wait_until(lambda: api.call("GET", "/v1/plans", ACME).status_code == 200, 60,
               "the API's catalog", [proc])  # fmt: skip
    plans = api.call("GET", "/v1/plans", ACME).json()["plans"]
    assert [(p["plan_id"], p["version"], p["versions"], p["published_at"]) for p in plans] == [
        (p["plan_id"], 1, 1, "1970-01-01T00:00:00Z") for p in sorted(RAW["plans"],
                                                                   key=lambda p: p["plan_id"])
    ]  # fmt: skip
    assert api.call("POST", "/v1/plans", ACME, {"plan": plan("starter-eur", "11.00")}
                    ).status_code == 403  # fmt: skip
    before = datetime.now(UTC)
    posted = api.call("POST", "/v1/plans", OPS, {"plan": plan("starter-eur", "11.00")})
    assert posted.status_code == 201, posted.text
    body = posted.json()
    assert (body["plan_id"], body["version"], body["existing"]) == ("starter-eur", 2, "keep")
    assert body["plan"] == plan("starter-eur", "11.00")
    published = datetime.fromisoformat(body["published_at"].replace("Z", "+00:00"))
    assert before <= published <= datetime.now(UTC)
    same = api.call("POST", "/v1/plans", OPS, {"plan": plan("starter-eur", "11.00")})
    assert same.status_code == 200 and same.json()["version"] == 2  # nothing published
    written = records(settings, bootstrap)
    assert written == 6
    in_usd = api.call("POST", "/v1/plans", OPS, {"plan": plan("starter-eur", currency="USD")})
    assert in_usd.status_code == 422
    assert "must keep its currency and interval" in in_usd.json()["message"]
    invalid = api.call("POST", "/v1/plans", OPS, {"plan": {**plan("growth-eur"), "charges": 3}})
    assert invalid.status_code == 422
    assert "plan.charges: must be a list" in invalid.json()["message"]

    # the CLI: a changed file is a new version (here moving subscriptions at their next
    # period end); one refused plan and nothing of the file is published
    moved = cli("publish", str(catalog_file(tmp_path, "next.json", plan("starter-eur", "12.00"))),
                "--existing", "next_period")  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert "starter-eur: new version, version 3" in moved.stdout
    assert "existing next_period" in moved.stdout
    assert "0 added, 1 new version(s), 4 unchanged" in moved.stdout
    written = records(settings, bootstrap)
    refused = cli("publish", str(catalog_file(tmp_path, "bad.json", plan("growth-eur", "30.00"),
                                              plan("team-jpy", currency="EUR"))))  # fmt: skip
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "refused, nothing was published" in refused.stderr and "team-jpy" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert records(settings, bootstrap) == written
    bad_file = tmp_path / "broken.json"
    bad_file.write_text('{"plans": [{"plan_id": "x"}]}')
    unusable = cli("publish", str(bad_file))
    assert unusable.returncode == 2 and "invalid catalog" in unusable.stderr

    # retire: by the API (an operator's key) and by the CLI
    retired = api.call("POST", "/v1/plans/team-jpy/retire", OPS)
    assert retired.status_code == 200, retired.text
    assert retired.json()["plan_id"] == "team-jpy" and retired.json()["retired_at"]
    assert api.call("POST", "/v1/plans/team-jpy/retire", OPS).status_code == 409
    assert api.call("POST", "/v1/plans/no-such-plan/retire", OPS).status_code == 404
    assert api.call("POST", "/v1/plans/pro-usd/retire", ACME).status_code == 403
    assert cli("retire", "pro-usd").returncode == 0
    twice = cli("retire", "pro-usd")
    assert twice.returncode == 1 and "already retired" in twice.stderr
    after_retirement = api.call("POST", "/v1/plans", OPS, {"plan": plan("pro-usd", "50.00")})
    assert after_retirement.status_code == 422 and "retired" in after_retirement.json()["message"]

    # POST /v1/subscriptions knows the catalog as published: a plan the file never had is
    # taken, a retired one (still in the file) refused
    fresh = api.call("POST", "/v1/plans", OPS,
                     {"plan": {**plan("growth-eur", "5.00"), "plan_id": "new-eur"}})  # fmt: skip
    assert fresh.status_code == 201, fresh.text

    def subscribe(plan_id: str, n: int) -> Any:
        return api.call("POST", "/v1/subscriptions", ACME, {
            "type": "subscription.created", "account_id": f"acme-{n}",
            "subscription_id": f"acme-sub-{n}", "plan_id": plan_id})  # fmt: skip

    wait_until(lambda: subscribe("new-eur", 1).status_code == 202, 30,
               "the API's table to have new-eur", [proc])  # fmt: skip
    refused_sub = subscribe("team-jpy", 2)
    assert refused_sub.status_code == 422, refused_sub.text
    assert refused_sub.json()["errors"] == ["plan_id: plan 'team-jpy' is retired"]

    # list: the API and the CLI agree, every version or the latest of each
    wait_until(lambda: len(api.call("GET", "/v1/plans?all_versions=true", ACME).json()["plans"])
               == 8 and "pro-usd" in {p["plan_id"] for p in api.call("GET", "/v1/plans").json()[
                   "plans"] if p["retired_at"]}, 30, "the API's table", [proc])  # fmt: skip
    every = api.call("GET", "/v1/plans?all_versions=true", ACME).json()["plans"]
    by_cli = json.loads(cli("list", "--json", "--all-versions").stdout)
    assert every == by_cli
    assert [(p["version"], p["existing"]) for p in every if p["plan_id"] == "starter-eur"] == [
        (1, "keep"), (2, "keep"), (3, "next_period")
    ]  # fmt: skip
    assert {p["plan_id"] for p in every if p["retired_at"]} == {"team-jpy", "pro-usd"}
    latest = api.call("GET", "/v1/plans", ACME).json()["plans"]
    assert [(p["plan_id"], p["version"], p["versions"]) for p in latest
            if p["plan_id"] == "starter-eur"] == [("starter-eur", 3, 3)]  # fmt: skip
    assert api.call("GET", "/v1/plans?all_versions=maybe", ACME).status_code == 422
    table = cli("list", "--all-versions")
    assert table.returncode == 0 and "3 of 3" in table.stdout and "since always" in table.stdout

    # the sink lands every version (the catalog file's plans are all on the topic: none
    # of its rows comes from the file)
    sink = procs.add(start_sink(settings, bootstrap))

    def landed() -> list[list[Any]]:
        sql = ("SELECT plan_id, version, existing, flat_amount, retired_at, _offset IS NOT NULL "
               "FROM plans FINAL ORDER BY plan_id, version")  # fmt: skip
        return query(settings, sql)["rows"]

    wait_until(lambda: len(landed()) == 8 and sum(r[4] is not None for r in landed()) == 2,
               60, "the plan versions", [sink])  # fmt: skip
    rows = landed()
    assert all(r[5] for r in rows)
    assert [(r[1], r[2], Decimal(str(r[3]))) for r in rows if r[0] == "starter-eur"] == [
        (1, "keep", Decimal(9)), (2, "keep", Decimal(11)), (3, "next_period", Decimal(12))
    ]  # fmt: skip
    assert {r[0] for r in rows if r[4] is not None} == {"team-jpy", "pro-usd"}
    current = query(settings, "SELECT plan_id, version, retired_at IS NOT NULL FROM "
                    "plans_current ORDER BY plan_id")["rows"]  # fmt: skip
    assert [tuple(r) for r in current] == [
        ("growth-eur", 1, 0), ("new-eur", 1, 0), ("pro-usd", 1, 1), ("scale-usd-yearly", 1, 0),
        ("starter-eur", 3, 0), ("team-jpy", 1, 1),
    ]  # fmt: skip
    assert proc.alive, proc.tail()


def test_the_sink_lands_the_catalog_file_plans_the_topic_does_not_have(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, tmp_path: Path
) -> None:
    """`streambill run sink --catalog F`: a file plan the topic does not have is in `plans`
    at once (version 1, since always); one the topic has comes from the topic; a plan the
    topic gets later replaces the file's row."""
    from streams.catalog_store import publish_plans
    from streams.domain.catalog import parse_plan

    settings, bootstrap = pipeline_env, kafka_bootstrap
    publish_plans(settings, bootstrap, [(parse_plan(plan("starter-eur", "11.00")), "keep")],
                  datetime.now(UTC) - timedelta(days=1))  # fmt: skip
    sink = procs.add(start_sink(settings, bootstrap))
    rows = query(settings, "SELECT plan_id, version, toUnixTimestamp64Micro(published_at), "
                 "_offset IS NULL FROM plans FINAL ORDER BY plan_id")["rows"]  # fmt: skip
    from_file = [r for r in rows if r[3]]
    assert {r[0] for r in from_file} == {p["plan_id"] for p in RAW["plans"]} - {"starter-eur"}
    assert all((r[1], int(r[2])) == (1, 0) for r in from_file)

    def starter() -> list[list[Any]]:
        return query(settings, "SELECT version, flat_amount, _offset IS NULL FROM plans FINAL "
                     "WHERE plan_id = 'starter-eur'")["rows"]  # fmt: skip

    wait_until(lambda: [(r[0], Decimal(str(r[1])), r[2]) for r in starter()]
               == [(1, Decimal(11), 0)], 60, "starter-eur from the topic", [sink])  # fmt: skip
    # the file's team-jpy, then the topic's: the landed row replaces the file's
    publish_plans(settings, bootstrap, [(parse_plan(plan("team-jpy", "6000")), "keep")],
                  datetime.now(UTC))  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        team = query(settings, "SELECT version, flat_amount, _offset IS NULL FROM plans FINAL "
                     "WHERE plan_id = 'team-jpy'")["rows"]  # fmt: skip
        if [(r[0], Decimal(str(r[1])), r[2]) for r in team] == [(1, Decimal(6000), 0)]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"team-jpy still {team}")


def test_writers_at_once_never_lose_a_version(pipeline_env: Settings, kafka_bootstrap: str) -> None:
    """Six writers publish a version of one plan at the same moment (each its own
    producer of the one transactional id, its own read of the topic): they fence each
    other and read again, so the history ends with every one of them, in some order."""
    from concurrent.futures import ThreadPoolExecutor

    from streams.catalog_store import publish_file, publish_plans, read_histories
    from streams.domain.catalog import Catalog, parse_plan

    settings, bootstrap = pipeline_env, kafka_bootstrap
    publish_file(settings, bootstrap, Catalog.from_dict(RAW), datetime.now(UTC))
    fees = [f"{10 + n}.00" for n in range(6)]
    at = datetime.now(UTC)

    def write(fee: str) -> int:
        (result,) = publish_plans(settings, bootstrap,
                                  [(parse_plan(plan("starter-eur", fee)), "keep")], at)  # fmt: skip
        return result.version.plan.version

    with ThreadPoolExecutor(len(fees)) as pool:
        versions = list(pool.map(write, fees))
    assert sorted(versions) == [2, 3, 4, 5, 6, 7]
    history = read_histories(settings, bootstrap)["starter-eur"]
    assert sorted(str(v.plan.flat_charges[0].amount) for v in history.versions[1:]) == fees
