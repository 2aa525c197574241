"""Every example query for analysts (docs/analysts.md, which the README's "For analysts"
points to), run against a demo data set that went through the real pipeline (Kafka, the
rating processor, the sink, chDB), its result checked against figures computed here from
the events that were published.

Payment results are published directly to billing.payment-results: they stand in for
the payments processor (issue 4), with outcomes chosen per invoice below."""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from streams.config import REPO_ROOT, Settings
from streams.domain.catalog import Interval
from streams.domain.invoice import Invoice
from streams.domain.periods import period_bounds, period_index_at
from streams.kafka import clients
from streams.kafka.topics import CUSTOMERS, PAYMENT_RESULTS, SUBSCRIPTIONS, USAGE, ensure_topics
from streams.offline import rate_events, record_to_json_line
from streams.publish import publish, publish_in_time_order
from streams.testbed.generator import DEFAULT_UNTIL, Dataset, subscription_events, usage_events
from streams.warehouse import query
from tests.integration.helpers import (
    Procs,
    run_bill_run,
    scalar,
    start_rating,
    start_sink,
    wait_until,
)
from tests.integration.test_pipeline import CATALOG, lifecycle_events

pytestmark = pytest.mark.kafka
BAD_USAGE = 3  # undecodable usage records published: dead-lettered by rating and sink
RECURRING = {"flat", "proration_credit", "proration_charge"}


def readme_queries() -> dict[str, str]:
    """name -> SQL of every ```sql block of the analysts' example queries (docs/analysts.md,
    which the README's "For analysts" section points to)."""
    text = (REPO_ROOT / "docs" / "analysts.md").read_text()
    assert "docs/analysts.md" in (REPO_ROOT / "README.md").read_text().split(
        "## For analysts", 1)[1].split("\n## ", 1)[0]  # fmt: skip
    out = {}
    for block in re.findall(r"```sql\n(.*?)```", text, re.S):
        first, sql = block.split("\n", 1)
        assert first.startswith("-- "), "each README query starts with `-- <name>`"
        out[first[3:].strip()] = sql.strip()
    return out


@dataclass
class Truth:
    """What the published events imply, computed without the warehouse."""

    invoices: list[Invoice]
    plan_of_invoice: dict[str, str]
    subs: list[dict]
    changes: list[dict]
    usage: list[dict]
    rating_rejections: int
    payments: list[dict] = field(default_factory=list)
    customers: list[dict] = field(default_factory=list)  # billing.customers, in order
    plans: dict[str, Any] = field(default_factory=dict)  # billing.catalog: id -> PlanHistory


def plan_timeline(subs: list[dict], changes: list[dict]) -> dict[str, list[tuple]]:
    timeline = defaultdict(list)
    for e in sorted(subs + changes, key=lambda e: e["timestamp"]):
        if e["plan_id"]:
            timeline[e["subscription_id"]].append((e["timestamp"], e["plan_id"]))
    return timeline


def plan_at(timeline: list[tuple], t: datetime) -> str:
    return [plan for at, plan in timeline if at <= t][-1]


def synthetic_payments(invoices: list[Invoice], today: date) -> list[dict]:
    """Outcomes per invoice with an amount due: 1 in 10 declined (still in dunning), 1 in
    10 failed, 1 in 10 declined then written off, the rest paid; spread over 4 days."""
    out = []
    due = [inv for inv in invoices if inv.total > 0]
    for i, inv in enumerate(due):
        day = datetime.combine(today - timedelta(days=i % 4), time(12), tzinfo=UTC)
        base = {"invoice_id": inv.invoice_id, "account_id": inv.account_id,
                "amount": inv.total, "currency": inv.currency,
                "gateway_account": f"gw-{i % 4}", "latency_ms": 120.0 + i % 50}  # fmt: skip

        def attempt(n: int, status: str, at: datetime, base: dict = base) -> dict:
            return {
                **base,
                "payment_id": f"{base['invoice_id']}-{n}",
                "attempt": n,
                "status": status,
                "completed_at": at,
                "decline_code": "insufficient_funds" if status == "declined" else None,
                "gateway_reference": f"ch_{base['invoice_id']}" if status == "succeeded" else None,
            }

        if i % 10 == 0:
            out.append(attempt(1, "declined", day))
        elif i % 10 == 1:
            out.append(attempt(1, "failed", day))
        elif i % 10 == 2:
            out += [attempt(1, "declined", day - timedelta(days=7)),
                    attempt(2, "uncollectible", day)]  # fmt: skip
        else:
            out.append(attempt(1, "succeeded", day))
    return out


def synthetic_customers(accounts: list[str]) -> list[dict]:
    """A customer record for 3 accounts in 4 (countries in turn, 1 in 5 tax exempt, 1 in 3
    without a payment method); every 7th gives a second record later, moving it to CH
    with a new card."""
    out = []
    at = datetime(2026, 3, 1, tzinfo=UTC)
    for i, account in enumerate(accounts):
        if i % 4 == 3:
            continue
        out.append({"account_id": account, "timestamp": at, "name": f"Customer {i}",
                    "email": None, "address": None,
                    "country": ("FR", "DE", "US", None)[i % 4 if i % 8 else 3],
                    "tax_exempt": i % 5 == 0, "grace_hours": 24 * (i % 3),
                    "payment_method": None if i % 3 == 0 else f"tok_ok_{i}"})  # fmt: skip
        if i % 7 == 0:
            out.append({**out[-1], "timestamp": at + timedelta(days=2), "country": "CH",
                        "payment_method": f"tok_ok_{i}_new"})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def demo(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """The demo data set through the whole pipeline, once for every query."""
    from streams.kafka.topics import namespace, set_namespace

    home: Path = tmp_path_factory.mktemp("analysts") / "home"
    ns = f"t{uuid.uuid4().hex[:10]}."
    env = {"STREAMBILL_NAMESPACE": ns, "STREAMBILL_HOME": str(home),
           "STREAMBILL_PARTITIONS": "4", "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}  # fmt: skip
    previous_ns = namespace()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("CLICKHOUSE_DSN", raising=False)
        set_namespace(ns)
        procs = Procs()
        try:
            settings = Settings()
            ensure_topics(clients.admin(settings, kafka_bootstrap), settings)
            yield settings, build(settings, kafka_bootstrap, procs)
        finally:
            procs.stop_all()
            set_namespace(previous_ns)


def build(settings: Settings, bootstrap: str, procs: Procs) -> Truth:
    ds = Dataset(accounts=500, seed=13)
    subs = list(subscription_events(ds, CATALOG))
    usage = list(usage_events(ds, CATALOG))
    changes = lifecycle_events(ds)
    lines = [record_to_json_line("sub", r) for r in subs + changes]
    lines += [record_to_json_line("usage", r) for r in usage]
    reference = rate_events(CATALOG, lines, DEFAULT_UNTIL)
    timelines = plan_timeline(subs, changes)
    truth = Truth(
        invoices=reference.invoices,
        plan_of_invoice={
            inv.invoice_id: plan_at(timelines[inv.subscription_id], inv.issued_at)
            for inv in reference.invoices
        },
        subs=subs,
        changes=changes,
        usage=usage,
        rating_rejections=len(reference.dead_letters),
        payments=synthetic_payments(reference.invoices, datetime.now(UTC).date()),
        customers=synthetic_customers(sorted({e["account_id"] for e in subs})),
    )

    sink = procs.add(start_sink(settings, bootstrap))
    rating = procs.add(start_rating(settings, bootstrap))
    producer = clients.producer(settings, bootstrap)
    publish_in_time_order(producer, [(SUBSCRIPTIONS, subs + changes), (USAGE, usage)])
    for n in range(BAD_USAGE):
        producer.produce(USAGE.name, key=b"acct-bad", value=b"\xc3\x01garbage%d" % n)
    producer.flush()
    run_bill_run(settings, bootstrap, DEFAULT_UNTIL, [sink, rating])
    publish(producer, PAYMENT_RESULTS, truth.payments)
    publish(producer, CUSTOMERS, truth.customers)

    landed = {
        "invoices": len(truth.invoices),
        "payment_attempts": len(truth.payments),
        "usage_events": len(usage),
        "subscription_events": len(subs) + len(changes),
        "dead_letters": truth.rating_rejections + 2 * BAD_USAGE,
        "customers": len(truth.customers),
    }
    for table, n in landed.items():
        sql = f"SELECT count() FROM {table} FINAL"
        wait_until(lambda sql=sql, n=n: scalar(settings, sql) >= n, 120, table, [sink, rating])
    growth_signups = sorted(inv.issued_at for inv in truth.invoices if inv.reason == "created"
                            and truth.plan_of_invoice[inv.invoice_id] == "growth-eur")  # fmt: skip
    truth.plans = publish_plan_history(settings, bootstrap,
                                       growth_signups[len(growth_signups) // 2])  # fmt: skip
    versions = sum(len(h.versions) for h in truth.plans.values())
    sql = ("SELECT count(), countIf(retired_at IS NOT NULL) FROM plans FINAL "
           "WHERE _offset IS NOT NULL")  # fmt: skip
    wait_until(lambda: [int(x) for x in query(settings, sql)["rows"][0]] == [versions, 1], 60,
               "the plan versions", [sink])  # fmt: skip
    return truth


def publish_plan_history(settings: Settings, bootstrap: str, at: datetime) -> dict[str, Any]:
    """The demo catalog imported into billing.catalog (as `streambill catalog publish`),
    then, once every invoice of the data set has landed: a version 2 of growth-eur in
    effect from `at` (halfway through its signups; another storage price, the same fee:
    the MRR and what the invoices billed stay those of the catalog file) and team-jpy
    retired now. Returns the histories."""
    from streams.catalog_store import publish_file, publish_plans, read_histories, retire_plan

    now = datetime.now(UTC)
    publish_file(settings, bootstrap, CATALOG, now)
    growth = CATALOG.plans["growth-eur"]
    cheaper_storage = replace(growth, charges=tuple(
        replace(c, package_amount=Decimal("3.00")) if c.charge_id == "storage" else c
        for c in growth.charges))  # fmt: skip
    publish_plans(settings, bootstrap, [(cheaper_storage, "keep")], at)
    retire_plan(settings, bootstrap, "team-jpy", now)
    return read_histories(settings, bootstrap)


# --- checks: one per README query, each from the published events -------------------


def D(x: Any) -> Decimal:
    return Decimal(str(x))


def check_top_accounts_by_revenue(rows: list, t: Truth) -> None:
    revenue, count = Counter(), Counter()
    for inv in t.invoices:
        if inv.currency == "EUR":
            revenue[inv.account_id] += inv.total
            count[inv.account_id] += 1
    top = sorted(revenue, key=lambda a: (-revenue[a], a))[:10]
    assert [(r[0], D(r[1]), int(r[2])) for r in rows] == [(a, revenue[a], count[a]) for a in top]


def _month(d: datetime | date) -> str:
    return f"{d.year:04d}-{d.month:02d}-01"


def check_revenue_by_month_and_plan(rows: list, t: Truth) -> None:
    want: dict[tuple, list] = defaultdict(lambda: [Decimal(0)] * 3)
    for inv in t.invoices:
        acc = want[(_month(inv.issued_at), inv.currency, t.plan_of_invoice[inv.invoice_id])]
        acc[0] += inv.total
        for ln in inv.lines:
            acc[1 if ln.kind in RECURRING else 2] += ln.amount
    got = {(str(r[0])[:10], r[1], r[2]): [D(x) for x in r[3:]] for r in rows}
    assert got == dict(want)
    assert len(rows) == len(want)


def mrr_of(plan_id: str) -> Decimal:
    plan = CATALOG.plan(plan_id)
    flat = sum((c.amount for c in plan.flat_charges), Decimal(0))
    return flat if plan.interval == Interval.MONTH else (flat / 12).quantize(Decimal("1e-9"))


def mrr_movements(t: Truth) -> list[tuple]:
    """(at, subscription, account, currency, movement, delta) from the lifecycle events."""
    out = []
    created = {e["subscription_id"]: e for e in t.subs}
    current = {s: e["plan_id"] for s, e in created.items()}
    for e in t.subs:
        plan = CATALOG.plan(e["plan_id"])
        out.append((e["timestamp"], e["subscription_id"], e["account_id"], plan.currency,
                    "new", mrr_of(e["plan_id"])))  # fmt: skip
    for e in sorted(t.changes, key=lambda e: e["timestamp"]):
        sub, at = e["subscription_id"], e["timestamp"]
        currency = CATALOG.plan(current[sub]).currency
        if e["type"] == "subscription.plan_changed":
            delta = mrr_of(e["plan_id"]) - mrr_of(current[sub])
            if delta:
                kind = "expansion" if delta > 0 else "contraction"
                out.append((at, sub, e["account_id"], currency, kind, delta))
            current[sub] = e["plan_id"]
            continue
        if e["mode"] == "end_of_period":  # churns at the end of the period it falls in
            plan = CATALOG.plan(current[sub])
            anchor, k = created[sub]["timestamp"], 0
            while period_bounds(anchor, plan.interval, k)[1] <= at:
                k += 1
            at = period_bounds(anchor, plan.interval, k)[1]
            if at > DEFAULT_UNTIL:
                continue
        if mrr_of(current[sub]):
            out.append((at, sub, e["account_id"], currency, "churn", -mrr_of(current[sub])))
    return out


def check_mrr_by_month(rows: list, t: Truth) -> None:
    per_month: dict[tuple, Counter] = defaultdict(Counter)
    for at, _, _, currency, kind, delta in mrr_movements(t):
        per_month[(currency, _month(at))][kind] += delta
    want, running = [], Counter()
    for currency, month in sorted(per_month):
        moves = per_month[(currency, month)]
        running[currency] += sum(moves.values())
        want.append((month, currency, running[currency], moves["new"], moves["expansion"],
                     moves["contraction"], moves["churn"]))  # fmt: skip
    got = [(str(r[0])[:10], r[1], *(D(x) for x in r[2:])) for r in rows]
    assert got == want


def check_churned_in_february(rows: list, t: Truth) -> None:
    want = sorted(
        (sub, acct, currency, -delta)
        for at, sub, acct, currency, kind, delta in mrr_movements(t)
        if kind == "churn" and _month(at) == "2026-02-01"
    )
    assert want, "the data set must have churn in February"
    assert [(r[0], r[1], r[2], D(r[3])) for r in rows] == want


def _yesterday() -> date:
    return datetime.now(UTC).date() - timedelta(days=1)


def check_failed_payments_yesterday(rows: list, t: Truth) -> None:
    want = sorted(
        (
            p["invoice_id"],
            p["account_id"],
            p["amount"],
            p["currency"],
            p["status"],
            p["decline_code"],
            p["gateway_account"],
        )
        for p in t.payments
        if p["status"] in ("declined", "failed") and p["completed_at"].date() == _yesterday()
    )
    assert want
    assert [(r[0], r[1], D(r[2]), *r[3:]) for r in rows] == want


def check_success_rate_by_gateway(rows: list, t: Truth) -> None:
    since = datetime.now(UTC).date() - timedelta(days=6)
    attempts, ok = Counter(), Counter()
    for p in t.payments:
        if p["status"] != "uncollectible" and p["completed_at"].date() >= since:
            attempts[p["gateway_account"]] += 1
            ok[p["gateway_account"]] += p["status"] == "succeeded"
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [
        (g, attempts[g], ok[g]) for g in sorted(attempts)
    ]
    for r in rows:
        assert abs(float(r[3]) - ok[r[0]] / attempts[r[0]]) < 1e-4


def check_receivables_by_age(rows: list, t: Truth) -> None:
    closed = {p["invoice_id"] for p in t.payments if p["status"] in ("succeeded", "uncollectible")}
    declined = {p["invoice_id"] for p in t.payments if p["status"] == "declined"}
    today = datetime.now(UTC).date()
    want: dict[tuple, list] = defaultdict(lambda: [0, Decimal(0), 0])
    for inv in t.invoices:
        # what the streaming rater leaves due: the total when positive (it carries no
        # credit balance yet)
        due = max(inv.total, Decimal(0))
        if due == 0 or inv.invoice_id in closed:
            continue
        age = (today - inv.issued_at.date()).days
        bucket = "0-30" if age <= 30 else "31-60" if age <= 60 else "61-90" if age <= 90 else "90+"
        acc = want[(inv.currency, bucket)]
        acc[0] += 1
        acc[1] += due
        acc[2] += inv.invoice_id in declined
    got = {(r[0], r[1]): [int(r[2]), D(r[3]), int(r[4])] for r in rows}
    assert got == dict(want)


def check_usage_first_week(rows: list, t: Truth) -> None:
    first: dict[tuple, dict] = {}
    for u in t.usage:
        first.setdefault((u["subscription_id"], u["event_id"]), u)
    want: dict[tuple, list] = defaultdict(lambda: [0, Decimal(0)])
    for u in first.values():
        day = u["timestamp"].date()
        if date(2026, 1, 1) <= day <= date(2026, 1, 7):
            want[(str(day), u["metric"])][0] += 1
            want[(str(day), u["metric"])][1] += u["quantity"]
    assert [(str(r[0])[:10], r[1], int(r[2]), D(r[3])) for r in rows] == [
        (*k, *want[k]) for k in sorted(want)
    ]


def check_dead_letters_last_day(rows: list, t: Truth) -> None:
    want = [("rating", "rejected", t.rating_rejections), ("rating", "unknown_schema", BAD_USAGE),
            ("sink", "unknown_schema", BAD_USAGE)]  # fmt: skip
    assert [(r[0], r[1], int(r[2])) for r in rows] == [w for w in want if w[2]]


def check_largest_invoice_lines(rows: list, t: Truth) -> None:
    largest = sorted(t.invoices, key=lambda inv: (-inv.total, inv.invoice_id))[0]
    want = [
        (n, ln.charge_id, ln.kind, ln.quantity, ln.amount) for n, ln in enumerate(largest.lines)
    ]
    assert [(int(r[0]), r[1], r[2], D(r[3]), D(r[4])) for r in rows] == want


def check_subscriptions_by_plan_and_status(rows: list, t: Truth) -> None:
    plan = {e["subscription_id"]: e["plan_id"] for e in t.subs}
    status = dict.fromkeys(plan, "active")
    for e in sorted(t.changes, key=lambda e: e["timestamp"]):
        if e["type"] == "subscription.plan_changed":
            plan[e["subscription_id"]] = e["plan_id"]
        else:
            status[e["subscription_id"]] = "cancelled" if e["mode"] == "immediate" else "cancelling"
    want = Counter((plan[s], status[s]) for s in plan)
    assert {"cancelled", "cancelling"} <= set(status.values())
    assert [(r[0], r[1], int(r[2])) for r in rows] == sorted(
        (p, s, n) for (p, s), n in want.items()
    )


def check_arpa_february(rows: list, t: Truth) -> None:
    total: Counter = Counter()
    accounts: dict[tuple, set] = defaultdict(set)
    for inv in t.invoices:
        if _month(inv.issued_at) == "2026-02-01":
            key = (t.plan_of_invoice[inv.invoice_id], inv.currency)
            total[key] += inv.total
            accounts[key].add(inv.account_id)
    assert [(r[0], r[1]) for r in rows] == sorted(total)
    for r in rows:
        key = (r[0], r[1])
        assert abs(D(r[2]) - total[key] / len(accounts[key])) <= Decimal("0.005")


def check_customers_by_country(rows: list, t: Truth) -> None:
    current = {c["account_id"]: c for c in t.customers}  # the latest record wins
    per: dict[str, Counter] = defaultdict(Counter)
    for c in current.values():
        if c["country"] is not None:
            has_card = c["payment_method"] is not None
            per[c["country"]].update(customers=1, tax_exempt=c["tax_exempt"],
                                     with_payment_method=has_card)  # fmt: skip
    assert [r[0] for r in rows] == sorted(per)
    assert "CH" in per and len(per) == 4  # every country, the moves to CH included
    for country, customers, exempt, with_pm in rows:
        want = per[country]
        assert (int(customers), int(exempt), int(with_pm)) == (
            want["customers"],
            want["tax_exempt"],
            want["with_payment_method"],
        )


def _flat(plan: Any) -> Decimal:
    return sum((c.amount for c in plan.flat_charges), Decimal(0))


def check_plan_versions_and_signups(rows: list, t: Truth) -> None:
    """Each version of each plan, and the subscriptions created while it was the latest."""
    created = [(t.plan_of_invoice[inv.invoice_id], inv.issued_at)
               for inv in t.invoices if inv.reason == "created"]  # fmt: skip
    want = []
    for pid, h in sorted(t.plans.items()):
        ends = [v.published_at for v in h.versions[1:]] + [datetime.max.replace(tzinfo=UTC)]
        for v, end in zip(h.versions, ends, strict=True):
            signups = sum(1 for p, at in created if p == pid and v.published_at <= at < end)
            want.append((pid, v.plan.version, v.published_at, v.existing, _flat(v.plan), signups))
    growth = [w[5] for w in want if w[0] == "growth-eur"]
    assert len(growth) == 2 and min(growth) > 0  # signups on either version
    assert sum(w[5] for w in want) == len(created)
    got = [(r[0], int(r[1]), datetime.fromisoformat(str(r[2])).replace(tzinfo=UTC), r[3],
            D(r[4]), int(r[5])) for r in rows]  # fmt: skip
    assert got == want


def check_plans_now(rows: list, t: Truth) -> None:
    want = []
    for pid, h in sorted(t.plans.items()):
        p = h.latest
        flat = _flat(p)
        mrr = flat if p.interval == Interval.MONTH else (flat / 12).quantize(Decimal("1e-9"))
        want.append((pid, p.version, p.currency, str(p.interval), p.trial_days, flat, mrr,
                     h.retired_at is not None))  # fmt: skip
    assert ("growth-eur", 2) in [w[:2] for w in want] and want[-1][0] == "team-jpy"
    assert [(r[0], int(r[1]), r[2], r[3], int(r[4]), D(r[5]), D(r[6]), r[7] is not None)
            for r in rows] == want  # fmt: skip


def check_invoices_next_60_days(rows: list, t: Truth) -> None:
    """Every period end of the live subscriptions in the next 60 days, by the domain's
    period arithmetic (anchored at creation, month ends clamped)."""
    now = datetime.now(UTC)
    horizon = now + timedelta(days=60)
    plan = {e["subscription_id"]: e["plan_id"] for e in t.subs}
    anchor = {e["subscription_id"]: e["timestamp"] for e in t.subs}
    ended: dict[str, datetime | None] = {}  # -> the end of its last period, if any
    for e in sorted(t.changes, key=lambda e: e["timestamp"]):
        sub = e["subscription_id"]
        if e["type"] == "subscription.plan_changed":
            plan[sub] = e["plan_id"]
        elif e["mode"] == "immediate":
            ended[sub] = None
        else:  # at the end of the period it was asked in: one invoice left, no recurring
            p = CATALOG.plans[plan[sub]]
            k = period_index_at(anchor[sub], p.interval, e["timestamp"])
            ended[sub] = period_bounds(anchor[sub], p.interval, k)[1]
    want: dict[tuple, list] = defaultdict(lambda: [0, Decimal(0)])
    for sub, plan_id in plan.items():
        p = CATALOG.plans[plan_id]
        if sub in ended:
            last = ended[sub]
            if last is not None and now < last <= horizon:
                want[(last.date().isoformat(), p.currency)][0] += 1
            continue
        k = 0
        while (end := period_bounds(anchor[sub], p.interval, k)[1]) <= horizon:
            if end > now:
                cell = want[(end.date().isoformat(), p.currency)]
                cell[0] += 1
                cell[1] += sum((c.amount for c in p.flat_charges), Decimal(0))
            k += 1
    assert len(want) > 20  # a day per anchor day of the month, in two currencies
    assert [(r[0], r[1]) for r in rows] == sorted(want)
    for day, currency, invoices, recurring in rows:
        assert (int(invoices), D(recurring)) == tuple(want[(day, currency)])


CHECKS: dict[str, Callable[[list, Truth], None]] = {
    name.removeprefix("check_"): fn for name, fn in globals().items() if name.startswith("check_")
}


def test_readme_has_at_least_ten_checked_queries() -> None:
    queries = readme_queries()
    assert len(queries) >= 10
    assert set(queries) == set(CHECKS), "every README query has a check, and only those"


@pytest.mark.parametrize("name", sorted(readme_queries()))
def test_readme_query(demo: tuple[Settings, Truth], name: str) -> None:
    settings, truth = demo
    rows = query(settings, readme_queries()[name])["rows"]
    assert rows, f"{name}: no rows"
    CHECKS[name](rows, truth)


def test_query_formats(demo: tuple[Settings, Truth]) -> None:
    """`streambill query --format table|csv|json` through the running sink."""
    import csv
    import io
    import json
    import subprocess
    import sys

    _settings, truth = demo
    sql = "SELECT reason, count() AS n FROM invoices FINAL GROUP BY reason ORDER BY reason"
    want = sorted(Counter(inv.reason for inv in truth.invoices).items())

    def run(fmt: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "streams.cli", "query", sql, "--format", fmt],
            capture_output=True, text=True, check=True, env=os.environ | {"COLUMNS": "200"},
        ).stdout  # fmt: skip

    assert [(r["reason"], int(r["n"])) for r in json.loads(run("json"))] == want
    rows = list(csv.reader(io.StringIO(run("csv"))))
    assert rows[0] == ["reason", "n"] and [(r[0], int(r[1])) for r in rows[1:]] == want
    table = run("table")
    for reason, n in want:
        assert re.search(rf"{reason}\s*│\s*{n}\b", table), table


def test_the_load_calendar_counts_invoices_first_attempts_and_retries(
    demo: tuple[Settings, Truth], tmp_path: Path
) -> None:
    """`streambill calendar --days 60`: per day and currency, the upcoming invoices (as the
    checked query above), a payment for each with a recurring amount (every subscription
    of the data set has a payment method), and the dunning retries the default schedule
    (1d,3d,7d) sets after the synthetic declines and failures."""
    import json
    import subprocess
    import sys

    settings, truth = demo
    out = tmp_path / "calendar.json"
    run = subprocess.run([sys.executable, "-m", "streams.cli", "calendar", "--days", "60",
                          "--json", str(out)], capture_output=True, text=True,
                         env=os.environ | {"COLUMNS": "200"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "peak:" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    upcoming = query(
        settings,
        "SELECT count(), countIf(recurring_amount > 0) FROM "
        "upcoming_invoices WHERE due_at <= now() + INTERVAL 60 DAY",
    )["rows"]
    ((invoices, payable),) = upcoming
    assert sum(int(r["invoices"]) for r in rows) == int(invoices) > 0
    now = datetime.now(UTC)
    delays = [timedelta(days=d) for d in (1, 3, 7)]
    last: dict[str, dict] = {}
    for p in sorted(truth.payments, key=lambda p: p["attempt"]):
        last[p["invoice_id"]] = p
    retries = sum(
        1 for p in last.values()
        if p["status"] in ("declined", "failed") and p["attempt"] <= len(delays)
        and now < p["completed_at"] + delays[p["attempt"] - 1] <= now + timedelta(days=60)
    )  # fmt: skip
    assert retries > 0
    assert sum(int(r["retries"]) for r in rows) == retries
    assert sum(int(r["payments"]) for r in rows) == int(payable) + retries
