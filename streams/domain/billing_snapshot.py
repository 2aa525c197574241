"""Snapshots of a contract run (``billing.ContractRun``): its whole state (plan versions,
accounts, subscriptions with their retained segments and held invoices) as deterministic
bytes, and a run restored from them that goes on exactly as the original would. This is
what a rating worker keeps between transactions and restores after a restart."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

import orjson

from streams.domain.billing import (
    Account,
    ContractRun,
    Coupon,
    Customer,
    Draft,
    Segment,
    Subscription,
    Tally,
)
from streams.domain.catalog import Catalog, Plan, parse_plan, plan_to_dict
from streams.domain.invoice import InvoiceLine
from streams.domain.periods import Interval
from streams.domain.timestamps import from_micros, to_micros


def _us(t: datetime | None) -> int | None:
    return None if t is None else to_micros(t)


def _at(us: int | None) -> datetime | None:
    return None if us is None else from_micros(us)


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _line_out(ln: InvoiceLine) -> list:
    q = None if ln.quantity is None else str(ln.quantity)
    return [ln.charge_id, ln.kind, _us(ln.period_start), _us(ln.period_end), q, str(ln.amount)]


def _line_in(v: list) -> InvoiceLine:
    return InvoiceLine(v[0], v[1], _at(v[2]), _at(v[3]), _dec(v[4]), Decimal(v[5]))


def _tally_out(t: Tally) -> list:
    return [None if t.sum is None else str(t.sum), None if t.max is None else str(t.max),
            t.count, None if t.latest is None else str(t.latest), _us(t.latest_at),
            {f: sorted(v) for f, v in t.uniques.items()}]  # fmt: skip


def _tally_in(v: list) -> Tally:
    uniques = {f: set(values) for f, values in v[5].items()}
    return Tally(_dec(v[0]), _dec(v[1]), v[2], _dec(v[3]), _at(v[4]), uniques)


def _segment_out(s: Segment) -> list:
    billed = None if s.billed is None else {c: str(a) for c, a in s.billed.items()}
    return [_us(s.start), s.period, s.plan.plan_id, s.plan.version, _us(s.end),
            {m: _tally_out(t) for m, t in s.tallies.items()}, billed, sorted(s.late)]  # fmt: skip


def _subscription_out(sub: Subscription) -> dict:
    index = {id(s): n for n, s in enumerate(sub.closed)}
    coupon = sub.coupon
    return {
        "id": [sub.subscription_id, sub.account_id, sub.currency, sub.interval.value],
        "at": [_us(sub.created_at), _us(sub.anchor), _us(sub.paused_at), _us(sub.ended_at),
               _us(sub.adjustment_due)],
        "plan": [sub.plan.plan_id, sub.plan.version],
        "status": [sub.status, sub.cancel_at_period_end, sub.period, sub.changes_at_segment_start],
        "segment": None if sub.segment is None else _segment_out(sub.segment),
        "closed": [_segment_out(s) for s in sub.closed],
        "seen": {str(k): sorted(ids) for k, ids in sub.seen.items()},
        "coupon": None if coupon is None else [
            coupon.coupon_id, None if coupon.percent_off is None else str(coupon.percent_off),
            None if coupon.amount_off is None else str(coupon.amount_off), coupon.remaining],
        "drafts": [[d.reason, d.reason_key, _us(d.issued_at), _us(d.finalize_at),
                    None if d.segment is None else index[id(d.segment)],
                    [_line_out(ln) for ln in d.fixed_lines]] for d in sub.drafts],
        "keys_at": [_us(sub.keys_at[0]), sub.keys_at[1]],
        "payment_method": sub.payment_method,
    }  # fmt: skip


def _subscription_in(v: dict, version: Callable[[str, int], Plan]) -> Subscription:
    def segment(s: list) -> Segment:
        tallies = {m: _tally_in(t) for m, t in s[5].items()}
        billed = None if s[6] is None else {c: Decimal(a) for c, a in s[6].items()}
        return Segment(_at(s[0]), s[1], version(s[2], s[3]), _at(s[4]), tallies, billed,
                       set(s[7]))  # fmt: skip

    sub_id, account, currency, interval = v["id"]
    created, anchor, paused, ended, adjustment = (_at(x) for x in v["at"])
    status, cancelling, period, changes = v["status"]
    closed = [segment(s) for s in v["closed"]]
    c = v["coupon"]
    return Subscription(
        sub_id, account, currency, Interval(interval), created, anchor,  # type: ignore[arg-type]
        version(*v["plan"]), status, cancelling, period,
        None if v["segment"] is None else segment(v["segment"]), closed,
        {int(k): set(ids) for k, ids in v["seen"].items()}, paused, ended,
        None if c is None else Coupon(c[0], _dec(c[1]), _dec(c[2]), c[3]),
        [Draft(d[0], d[1], _at(d[2]), _at(d[3]), None if d[4] is None else closed[d[4]],  # type: ignore[arg-type]
               [_line_in(ln) for ln in d[5]]) for d in v["drafts"]],
        adjustment, changes, (_at(v["keys_at"][0]), dict(v["keys_at"][1])),
        v.get("payment_method"),
    )  # fmt: skip


def snapshot(run: ContractRun) -> bytes:
    """The run's whole state (not the invoices it issued): plan versions, accounts and
    subscriptions, as sorted-key JSON; restore() reads it back."""
    book, accounts = run.book, run.accounts
    return orjson.dumps(
        {
            "plans": {pid: [plan_to_dict(p) for p in vs] for pid, vs in book.versions.items()},
            "retired": sorted(book.retired),
            "next_period": {pid: p.version for pid, p in book.next_period.items()},
            "accounts": {a: _account_out(acc) for a, acc in accounts.records.items()},
            "credit_ids": None if accounts.credit_ids is None else sorted(accounts.credit_ids),
            "subscriptions": {s: _subscription_out(sub) for s, sub in run.subs.items()},
        },
        option=orjson.OPT_SORT_KEYS,
    )


def restore(catalog: Catalog, data: bytes) -> ContractRun:
    """A run that goes on from a snapshot (the catalog gives tax rates and the late-usage
    window; the plan versions are the snapshot's)."""
    v = orjson.loads(data)
    run = ContractRun(catalog)
    run.book.versions = {
        pid: [parse_plan(p, f"plans.{pid}[{n}]", version=n + 1) for n, p in enumerate(ps)]
        for pid, ps in v["plans"].items()
    }
    run.book.retired = set(v["retired"])
    run.book.next_period = {pid: run.book.version(pid, n) for pid, n in v["next_period"].items()}
    run.accounts.records = {a: _account_in(acc) for a, acc in v["accounts"].items()}
    run.accounts.credit_ids = None if v["credit_ids"] is None else set(v["credit_ids"])
    for sub_id, s in v["subscriptions"].items():
        run.subs[sub_id] = _subscription_in(s, run.book.version)
        run.schedule(run.subs[sub_id])
    return run


def _account_out(acc: Account) -> list:
    c = acc.customer
    customer = None if c is None else [c.country, c.tax_exempt, c.grace_hours]
    balances = {cur: str(b) for cur, b in sorted(acc.balances.items())}
    return [customer, balances, sorted(acc.credit_ids)]


def _account_in(v: list) -> Account:
    return Account(None if v[0] is None else Customer(*v[0]),
                   {cur: Decimal(b) for cur, b in v[1].items()}, set(v[2]))  # fmt: skip


# --- one record at a time: what a rating worker keeps in its state store --------------------


def subscription_to_bytes(sub: Subscription) -> bytes:
    """One subscription, self-contained: with the definitions of the plan versions it
    refers to, so that it reads back whatever the catalog holds by then (a plan dropped
    from a catalog file goes on billing the subscriptions on it)."""
    v = _subscription_out(sub)
    plans = {(sub.plan.plan_id, sub.plan.version): sub.plan}
    for seg in (sub.segment, *sub.closed):
        if seg is not None:
            plans[(seg.plan.plan_id, seg.plan.version)] = seg.plan
    v["plans"] = [[pid, n, _plan_text(p)] for (pid, n), p in sorted(plans.items())]
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS)


def subscription_from_bytes(data: bytes | memoryview) -> Subscription:
    v = orjson.loads(data)
    plans = {(pid, n): _plan_from_text(text, n) for pid, n, text in v["plans"]}
    return _subscription_in(v, lambda pid, n: plans[(pid, n)])


def account_to_bytes(acc: Account) -> bytes:
    return orjson.dumps(_account_out(acc))


def account_from_bytes(data: bytes | memoryview) -> Account:
    return _account_in(orjson.loads(data))


_PLAN_TEXTS: dict[int, tuple[Plan, str]] = {}  # id -> (the plan, kept alive; its text)


def _plan_text(plan: Plan) -> str:
    """Plans are immutable and few: each is written once. Looked up by identity (a
    plan's hash walks all its charges)."""
    hit = _PLAN_TEXTS.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    text = orjson.dumps(plan_to_dict(plan), option=orjson.OPT_SORT_KEYS).decode()
    if len(_PLAN_TEXTS) >= 4096:
        _PLAN_TEXTS.clear()
    _PLAN_TEXTS[id(plan)] = (plan, text)
    return text


@functools.lru_cache(maxsize=4096)
def _plan_from_text(text: str, version: int) -> Plan:
    """Plans are immutable and few: each definition is parsed once."""
    return parse_plan(orjson.loads(text), "plan", version=version)
