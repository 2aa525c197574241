"""The rating contract, version 2, as one ordered run: what `streambill rate` computes.

Events are processed in order of arrival. Before each, everything due at or before its
arrival happens (period ends, trial ends, finalizations of held invoices, adjustment
invoices) in order of (due instant, subscription_id, finalization first). The state has
three parts: the plan versions (``PlanBook``), the accounts (customer records, credit
balances: ``Accounts``) and the subscriptions (``Subscription``). A subscription issues an
invoice; finalizing it takes two steps: the subscription's own (the usage lines of a held
segment, usage adjustments, the coupon) and the account's (tax, credit).

A *segment* is the part of a period rated under one plan version; closed segments are kept
while late usage can still reach them (``late_usage_periods``), with what was billed for
each charge, so that a late event re-rates its segment exactly.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from streams.domain.catalog import Catalog, PercentageCharge, Plan, aggregation_key
from streams.domain.events import (
    AnyEvent,
    Cancelled,
    CouponApplied,
    CreditGranted,
    CustomerUpdated,
    Paused,
    PlanChanged,
    PlanPublished,
    PlanRetired,
    Resumed,
    SubscriptionCreated,
    Usage,
    UsageRecord,
)
from streams.domain.invoice import (
    KIND_DISCOUNT,
    KIND_PRORATION_CHARGE,
    KIND_PRORATION_CREDIT,
    KIND_TAX,
    KIND_USAGE,
    KIND_USAGE_ADJUSTMENT,
    REASON_ADJUSTMENT,
    REASON_CANCELLED,
    REASON_CREATED,
    REASON_PAUSED,
    REASON_PERIOD_END,
    REASON_PLAN_CHANGED,
    REASON_RESUMED,
    REASON_TRIAL_ENDED,
    Invoice,
    InvoiceLine,
    flat_lines,
    make_invoice,
    proration_lines,
)
from streams.domain.money import CTX, ONE, ZERO, round_money, total
from streams.domain.periods import Interval, period_index_at, period_start
from streams.domain.pricing import price_usage
from streams.domain.rating import HORIZON
from streams.domain.timestamps import from_micros, to_micros

TRIALING = "trialing"
ACTIVE = "active"
PAUSED = "paused"
ENDED = "ended"

ADJUSTMENT_DELAY = timedelta(hours=24)  # rule 18: an ended subscription's adjustment invoice
TRIAL_KEY = -1  # the trial's usage ids, apart from the periods'

# the order of a subscription's due items at one instant
_FINALIZE, _PERIOD_END, _ADJUST = 0, 1, 2


class Rejected(Exception):
    """An event the contract rejects: a dead letter with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- the catalog's plan versions -------------------------------------------------------


class PlanBook:
    """Every version of every plan, the retired plans and the pending `next_period` moves."""

    def __init__(self, catalog: Catalog) -> None:
        self.versions: dict[str, list[Plan]] = {pid: [p] for pid, p in catalog.plans.items()}
        self.retired: set[str] = set()
        # plan id -> the version a next_period publication moves older versions to
        self.next_period: dict[str, Plan] = {}

    def latest(self, plan_id: str) -> Plan:
        """The version a creation or plan change takes now."""
        versions = self.versions.get(plan_id)
        if versions is None:
            raise Rejected(f"unknown plan {plan_id!r}")
        if plan_id in self.retired:
            raise Rejected(f"plan {plan_id!r} is retired")
        return versions[-1]

    def publish(self, event: PlanPublished) -> Plan:
        plan = event.plan
        versions = self.versions.get(plan.plan_id)
        if versions is None:
            self.versions[plan.plan_id] = [plan]
        else:
            if plan.plan_id in self.retired:
                raise Rejected(f"plan {plan.plan_id!r} is retired")
            last = versions[-1]
            if (plan.currency, plan.interval) != (last.currency, last.interval):
                raise Rejected(
                    f"a new version of {plan.plan_id!r} must keep its currency and interval "
                    f"({last.currency}/{last.interval}, got {plan.currency}/{plan.interval})"
                )
            plan = Plan(
                plan.plan_id, plan.currency, plan.interval, plan.charges, plan.trial_days,
                len(versions) + 1,
            )  # fmt: skip
            versions.append(plan)
        if event.existing == "next_period":
            self.next_period[plan.plan_id] = plan  # replaces an earlier mark
        return plan

    def retire(self, plan_id: str) -> None:
        if plan_id not in self.versions:
            raise Rejected(f"unknown plan {plan_id!r}")
        if plan_id in self.retired:
            raise Rejected(f"plan {plan_id!r} is already retired")
        self.retired.add(plan_id)

    def version(self, plan_id: str, version: int) -> Plan:
        return self.versions[plan_id][version - 1]

    def move_target(self, plan: Plan) -> Plan | None:
        """The version a subscription on `plan` moves to at its next boundary, if any."""
        target = self.next_period.get(plan.plan_id)
        return target if target is not None and target.version > plan.version else None


# --- accounts ---------------------------------------------------------------------------


@dataclass(slots=True)
class Customer:
    country: str | None = None
    tax_exempt: bool = False
    grace_hours: int = 0


@dataclass(slots=True)
class Account:
    """What the contract keeps of an account: its customer record (None until one is
    given) and its credit balance per currency."""

    customer: Customer | None = None
    balances: dict[str, Decimal] = field(default_factory=dict)
    # the credit ids granted to it: with ``Accounts.credit_ids`` None, a repeat is known
    # per account (a rating worker holds one partition's accounts, not all of them)
    credit_ids: set[str] = field(default_factory=set)


class Accounts:
    """The accounts by id: a dict (``streambill rate``) or a mapping a rating worker
    loads from its state store as accounts are touched."""

    def __init__(
        self, records: MutableMapping[str, Account] | None = None, *, global_credit_ids: bool = True
    ) -> None:
        self.records: MutableMapping[str, Account] = {} if records is None else records
        # the credit ids granted to any account: a repeated credit_id counts once overall
        self.credit_ids: set[str] | None = set() if global_credit_ids else None

    def _account(self, account_id: str) -> Account:
        acc = self.records.get(account_id)
        if acc is None:
            acc = self.records[account_id] = Account()
        return acc

    def update(self, event: CustomerUpdated) -> None:
        acc = self._account(event.account_id)
        c = acc.customer = acc.customer or Customer()
        if event.country is not None:
            c.country = event.country
        if event.tax_exempt is not None:
            c.tax_exempt = event.tax_exempt
        if event.grace_hours is not None:
            c.grace_hours = event.grace_hours

    def grant(self, event: CreditGranted) -> None:
        acc = self._account(event.account_id)
        seen = self.credit_ids if self.credit_ids is not None else acc.credit_ids
        if event.credit_id in seen:
            return  # a repeat counts once
        seen.add(event.credit_id)
        acc.balances[event.currency] = CTX.add(acc.balances.get(event.currency, ZERO), event.amount)

    def customer(self, account_id: str) -> Customer | None:
        acc = self.records.get(account_id)
        return acc.customer if acc is not None else None

    def grace(self, account_id: str) -> timedelta:
        c = self.customer(account_id)
        return timedelta(hours=c.grace_hours if c else 0)

    def tax_rate(self, account_id: str, rates: Mapping[str, Decimal]) -> tuple[str, Decimal] | None:
        c = self.customer(account_id)
        if c is None or c.tax_exempt or c.country not in rates:
            return None
        return c.country, rates[c.country]  # type: ignore[index]

    def settle(self, account_id: str, currency: str, amount: Decimal) -> tuple[Decimal, Decimal]:
        """Rule 21: (credit_applied, amount_due) of an invoice total, moving the balance."""
        acc = self.records.get(account_id)
        balance = acc.balances.get(currency, ZERO) if acc is not None else ZERO
        if amount < 0:
            self._account(account_id).balances[currency] = CTX.subtract(balance, amount)
            return ZERO, ZERO
        applied = min(balance, amount)
        if applied:
            self._account(account_id).balances[currency] = CTX.subtract(balance, applied)
        return applied, CTX.subtract(amount, applied)


# --- subscriptions ----------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """One metric's aggregates over one segment, from its counted events."""

    sum: Decimal | None = None
    max: Decimal | None = None
    count: int = 0
    latest: Decimal | None = None
    latest_at: datetime | None = None
    uniques: dict[str, set[str]] = field(default_factory=dict)  # property -> values

    def add(self, usage: Usage, fields: tuple[str, ...] = ()) -> None:
        """Count an event; distinct values are kept only of the properties in `fields`
        (those a unique_count charge counts), so the state holds nothing else."""
        q = usage.quantity
        self.add_totals(q, q, 1, q, usage.timestamp)
        props = usage.properties
        if props:
            for name in fields:
                if name in props:
                    self.uniques.setdefault(name, set()).add(props[name])

    def add_totals(
        self, total: Decimal, top: Decimal, count: int, latest: Decimal, latest_at: datetime
    ) -> None:
        """Count `count` events at once (one event: ``add``; many: PlainUsage), given their
        sum, max and latest."""
        self.sum = total if self.sum is None else CTX.add(self.sum, total)
        self.max = top if self.max is None else max(self.max, top)
        self.count += count
        if self.latest_at is None or latest_at >= self.latest_at:  # ties: the later one
            self.latest, self.latest_at = latest, latest_at

    def value(self, key: str) -> Decimal:
        if key == "sum":
            return ZERO if self.sum is None else self.sum
        if key == "max":
            return ZERO if self.max is None else self.max
        if key == "count":
            return Decimal(self.count)
        if key == "latest":
            return ZERO if self.latest is None else self.latest
        return Decimal(len(self.uniques.get(key.removeprefix("unique_count:"), ())))


@dataclass(slots=True)
class Segment:
    start: datetime
    period: int  # the index of the period it lies in
    plan: Plan  # the version that rates it
    end: datetime | None = None  # None while open
    tallies: dict[str, Tally] = field(default_factory=dict)
    # charge_id -> the amount billed for it so far; None until its invoice is finalized
    billed: dict[str, Decimal] | None = None
    late: set[str] = field(default_factory=set)  # metrics with late usage not billed yet

    def contains(self, t: datetime) -> bool:
        return self.start <= t and (self.end is None or t < self.end)

    def add(self, usage: Usage) -> bool:
        """Count an event; True if the segment's plan prices its metric."""
        keys = self.plan.aggregation_names().get(usage.metric)
        if not keys:
            return False
        fields = tuple(k.removeprefix("unique_count:") for k in keys if k.startswith("unique_"))
        self.tallies.setdefault(usage.metric, Tally()).add(usage, fields)
        return True

    def price(self, charge) -> tuple[Decimal, Decimal]:
        """(quantity, rounded amount) of a usage charge over this segment."""
        tally = self.tallies.get(charge.metric) or Tally()
        q = tally.value(aggregation_key(charge))
        events = Decimal(tally.count) if isinstance(charge, PercentageCharge) else ZERO
        return q, round_money(price_usage(charge, q, events), self.plan.currency)


_HORIZON_US = to_micros(HORIZON)
_NANO = -9  # a usage record's quantity is in 10^-9 units


class PlainUsage:
    """Usage of one subscription that only adds up, totalled before it touches the state:
    what a rating worker does with most usage records.

    Equivalent to ``ContractRun.apply`` of each of its records in turn, after
    ``advance`` to each one's arrival, as long as each is *plain* (``takes``): the
    subscription is active, the record names its account, and the event falls inside the
    open segment and arrives before anything of the subscription falls due (no period
    end, finalization or lateness in between); the reader only gives records without
    properties. Other subscriptions' due items and catalog events do not touch an open
    segment, so they may happen before or after. ``settle`` de-duplicates the ids against
    the period's (the first counts), sums, maxes and counts each metric's quantities as
    integers and adds the results to the segment's Decimal tallies once: CTX's 100 digits
    keep every sum exact, so the value, digits and exponent are those of one addition per
    event; the latest is the record with the latest timestamp, the later one on ties.
    """

    __slots__ = ("due_us", "records", "segment", "start_us", "sub")

    def __init__(self, sub: Subscription) -> None:
        if sub.status != ACTIVE or sub.segment is None:
            raise ValueError("plain usage needs an active subscription")
        self.sub, self.segment = sub, sub.segment
        self.start_us = to_micros(sub.segment.start)
        nxt = sub.next_due()  # active: at the latest its period's end
        self.due_us = min(to_micros(nxt[0]), _HORIZON_US) if nxt is not None else _HORIZON_US
        self.records: list[UsageRecord] = []  # (event_id, µs, account, sub, metric, 10^-9)

    def takes(self, timestamp_us: int, arrival_us: int, account_id: str) -> bool:
        return (
            self.start_us <= timestamp_us <= arrival_us < self.due_us
            and account_id == self.sub.account_id
        )

    def settle(self) -> None:
        """Count the records taken so far (once: the list is empty afterwards)."""
        records, self.records = self.records, []
        if not records:
            return
        seg = self.segment
        seen = self.sub.seen.setdefault(seg.period, set())
        priced = seg.plan.aggregation_names()
        totals: dict[str, list[int]] = {}  # metric -> [sum, max, count, latest µs, latest]
        for event_id, us, _, _, metric, units in records:
            if event_id in seen:
                continue  # a repeat: the first counts
            seen.add(event_id)
            if not priced.get(metric):
                continue  # a metric its plan does not price: counted, never tallied
            t = totals.get(metric)
            if t is None:
                totals[metric] = [units, units, 1, us, units]
                continue
            t[0] += units
            if units > t[1]:
                t[1] = units
            t[2] += 1
            if us >= t[3]:
                t[3], t[4] = us, units
        for metric, (total_units, top, count, latest_us, latest) in totals.items():
            seg.tallies.setdefault(metric, Tally()).add_totals(
                Decimal(total_units).scaleb(_NANO, CTX), Decimal(top).scaleb(_NANO, CTX),
                count, Decimal(latest).scaleb(_NANO, CTX), from_micros(latest_us),
            )  # fmt: skip


@dataclass(slots=True)
class Coupon:
    coupon_id: str
    percent_off: Decimal | None
    amount_off: Decimal | None
    remaining: int | None  # invoices it still applies to; None: forever

    def discount(self, subtotal: Decimal, currency: str) -> Decimal:
        if self.percent_off is not None:
            return round_money(CTX.divide(CTX.multiply(subtotal, self.percent_off), 100), currency)
        return round_money(min(self.amount_off, subtotal), currency)  # type: ignore[type-var]


@dataclass(slots=True)
class Draft:
    """An issued invoice not finalized yet (a period end in its grace period)."""

    reason: str
    reason_key: str
    issued_at: datetime
    finalize_at: datetime
    segment: Segment | None  # its usage lines are rated when it is finalized
    fixed_lines: list[InvoiceLine]  # the lines fixed when it was issued (after the usage)


@dataclass(slots=True)
class Subscription:
    subscription_id: str
    account_id: str
    currency: str
    interval: Interval
    created_at: datetime
    anchor: datetime  # start of period 0: the creation, or the end of the trial
    plan: Plan
    status: str
    cancel_at_period_end: bool = False
    period: int = 0  # the open period, while active
    segment: Segment | None = None  # the open segment, while active
    closed: list[Segment] = field(default_factory=list)  # retained for late usage
    seen: dict[int, set[str]] = field(default_factory=dict)  # period -> counted usage ids
    paused_at: datetime | None = None
    ended_at: datetime | None = None
    coupon: Coupon | None = None
    drafts: list[Draft] = field(default_factory=list)
    adjustment_due: datetime | None = None
    changes_at_segment_start: int = 0  # as in version 1: distinct plan_changed ids
    keys_at: tuple[datetime | None, dict[str, int]] = (None, {})
    payment_method: str | None = None  # the creation's: where its invoices are collected from
    generation: int = 0  # bumped on every change: stale heap entries are skipped
    # (k, start, end) of the period asked for last: the anchor and interval never change
    bounds_memo: tuple[int, datetime, datetime] | None = field(
        default=None, repr=False, compare=False
    )

    def period_bounds(self, k: int) -> tuple[datetime, datetime]:
        memo = self.bounds_memo
        if memo is None or memo[0] != k:
            start, end = (
                period_start(self.anchor, self.interval, k),
                period_start(self.anchor, self.interval, k + 1),
            )
            memo = self.bounds_memo = (k, start, end)
        return memo[1], memo[2]

    def period_of(self, t: datetime) -> int:
        return period_index_at(self.anchor, self.interval, t) if t >= self.anchor else TRIAL_KEY

    def next_due(self) -> tuple[datetime, int] | None:
        due: list[tuple[datetime, int]] = [(d.finalize_at, _FINALIZE) for d in self.drafts]
        if self.status == TRIALING:
            due.append((self.anchor, _PERIOD_END))
        elif self.status == ACTIVE:
            due.append((self.period_bounds(self.period)[1], _PERIOD_END))
        if self.adjustment_due is not None:
            due.append((self.adjustment_due, _ADJUST))
        return min(due) if due else None

    def key(self, reason: str, at: datetime) -> str:
        """A distinct invoice id key for a new reason issued again at the same instant."""
        if self.keys_at[0] != at:
            self.keys_at = (at, {})
        counts = self.keys_at[1]
        n = counts[reason] = counts.get(reason, 0) + 1
        return reason if n == 1 else f"{reason}#{n}"


# --- the run ----------------------------------------------------------------------------


def _span(lines: list[InvoiceLine]) -> tuple[datetime | None, datetime | None]:
    """Rule 22: the earliest start and the latest end of the lines (None without lines)."""
    if not lines:
        return None, None
    return min(ln.period_start for ln in lines), max(ln.period_end for ln in lines)  # type: ignore[type-var]


DueItem = tuple[datetime, str, int, int]  # (instant, subscription_id, kind, generation)


class DueHeap:
    """What is due next, in the contract's order: (instant, subscription_id, kind). An
    entry whose generation is not its subscription's any more is stale (skipped)."""

    def __init__(self) -> None:
        self.heap: list[DueItem] = []

    def push(self, item: DueItem) -> None:
        heapq.heappush(self.heap, item)

    def pop(self, until: datetime) -> DueItem | None:
        """The earliest entry due at or before `until`, taken out; None if there is none."""
        heap = self.heap
        return heapq.heappop(heap) if heap and heap[0][0] <= until else None


class ContractRun:
    """The whole state of one run of the contract; feed events in arrival order.

    By default everything is held in memory (``streambill rate``). A rating worker gives
    its own parts instead: the plan versions its partition sees, and the subscriptions,
    accounts and due entries loaded from its state store as they are touched."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        book: PlanBook | None = None,
        subs: MutableMapping[str, Subscription] | None = None,
        accounts: Accounts | None = None,
        due: DueHeap | None = None,
    ) -> None:
        self.book = book if book is not None else PlanBook(catalog)
        self.tax_rates = dict(catalog.tax_rates)
        self.late_periods = catalog.late_usage_periods
        self.accounts = accounts if accounts is not None else Accounts()
        self.subs: MutableMapping[str, Subscription] = {} if subs is None else subs
        self.invoices: list[Invoice] = []
        self.due = due if due is not None else DueHeap()

    # -- driving ---------------------------------------------------------------------

    def advance(
        self,
        until: datetime,
        limit: int | None = None,
        only: Callable[[Subscription], bool] | None = None,
    ) -> bool:
        """Everything due at an instant <= until, in the contract's order; at most `limit`
        due items (None: all), of the subscriptions `only` accepts (None: all; the others'
        stay due). True when nothing due <= until is left (False: the limit was reached
        first)."""
        pop = self.due.pop
        done = 0
        left: list[DueItem] = []  # due items `only` leaves for later
        try:
            while limit is None or done < limit:
                item = pop(until)
                if item is None:
                    return True
                at, sub_id, _, generation = item
                sub = self.subs[sub_id]
                if generation != sub.generation:
                    continue  # the subscription changed since: a newer entry stands for it
                if only is not None and not only(sub):
                    left.append(item)
                    continue
                self._do_due(sub, at)
                self.schedule(sub)
                done += 1
            return False  # the limit was reached: there may be more
        finally:
            for item in left:
                self.due.push(item)

    def apply(self, event: AnyEvent, arrival: datetime) -> None:
        """Apply one event (after `advance(arrival)`); Rejected is its dead letter."""
        if event.timestamp >= HORIZON or arrival >= HORIZON:
            raise Rejected(f"timestamp not before {HORIZON.year}-01-01")
        if isinstance(event, Usage):
            if event.timestamp > arrival:
                raise Rejected("usage timestamp is later than its arrival")
            self._usage(self._sub(event.subscription_id), event, arrival)
            return
        if isinstance(event, SubscriptionCreated):
            if event.subscription_id in self.subs:
                raise Rejected("duplicate subscription.created")
            self._create(event)
        elif isinstance(event, PlanPublished):
            self.book.publish(event)
        elif isinstance(event, PlanRetired):
            self.book.retire(event.plan_id)
        elif isinstance(event, CustomerUpdated):
            self.accounts.update(event)
        elif isinstance(event, CreditGranted):
            self.accounts.grant(event)
        else:
            sub = self._sub(event.subscription_id)
            if sub.status == ENDED:
                raise Rejected("subscription has ended")
            handler = _HANDLERS.get(type(event))
            if handler is None:
                raise TypeError(f"not an event: {event!r}")
            handler(self, sub, event)
            self.schedule(sub)

    def _sub(self, subscription_id: str) -> Subscription:
        sub = self.subs.get(subscription_id)
        if sub is None:
            raise Rejected("unknown subscription")
        return sub

    def schedule(self, sub: Subscription) -> None:
        """(Re)schedule the subscription's next due item; an older entry becomes stale."""
        sub.generation += 1
        nxt = sub.next_due()
        if nxt is not None:
            self.due.push((nxt[0], sub.subscription_id, nxt[1], sub.generation))

    # -- due items -------------------------------------------------------------------

    def _do_due(self, sub: Subscription, at: datetime) -> None:
        nxt = sub.next_due()
        assert nxt is not None and nxt[0] == at
        kind = nxt[1]
        if kind == _FINALIZE:
            draft = min((d for d in sub.drafts if d.finalize_at == at), key=lambda d: d.issued_at)
            sub.drafts.remove(draft)
            self._finalize(sub, draft, at)
        elif kind == _PERIOD_END:
            if sub.status == TRIALING:
                self._end_trial(sub)
            else:
                self._end_period(sub)
        else:
            sub.adjustment_due = None
            if any(seg.late and seg.billed is not None for seg in sub.closed):
                self._issue(
                    sub, REASON_ADJUSTMENT, at, None, [], key=sub.key(REASON_ADJUSTMENT, at)
                )

    def _end_trial(self, sub: Subscription) -> None:
        if sub.cancel_at_period_end:
            sub.status, sub.ended_at = ENDED, sub.anchor
            return
        sub.status, sub.period = ACTIVE, 0
        sub.segment = Segment(sub.anchor, 0, sub.plan)
        start, end = sub.period_bounds(0)
        lines = flat_lines(sub.plan, start, end)
        self._issue(
            sub, REASON_TRIAL_ENDED, start, None, lines, key=sub.key(REASON_TRIAL_ENDED, start)
        )

    def _end_period(self, sub: Subscription) -> None:
        k = sub.period
        _, end = sub.period_bounds(k)
        seg = self._close_segment(sub, end)
        lines: list[InvoiceLine] = []
        if sub.cancel_at_period_end:
            sub.status, sub.ended_at = ENDED, end
        else:
            target = self.book.move_target(sub.plan)
            if target is not None:
                sub.plan = target
            lines = flat_lines(sub.plan, end, sub.period_bounds(k + 1)[1])
            sub.period = k + 1
            sub.segment = Segment(end, k + 1, sub.plan)
        sub.changes_at_segment_start = 0
        grace = self.accounts.grace(sub.account_id)
        self._issue(sub, REASON_PERIOD_END, end, seg, lines, finalize_at=end + grace)
        self._forget_old(sub, k + 1)

    def _forget_old(self, sub: Subscription, k: int) -> None:
        """Drop what late usage can no longer reach: arrivals are in period >= k from now."""
        oldest = k - self.late_periods
        # a segment still to be billed (held, or re-rated by late usage) stays until it is
        if any(s.period < oldest for s in sub.closed):
            sub.closed = [s for s in sub.closed
                          if s.period >= oldest or s.billed is None or s.late]  # fmt: skip
        if any(p < oldest for p in sub.seen):
            keep = {s.period for s in sub.closed} | {k, TRIAL_KEY}
            sub.seen = {p: ids for p, ids in sub.seen.items() if p in keep or p >= oldest}

    def _close_segment(self, sub: Subscription, at: datetime) -> Segment:
        seg = sub.segment
        assert seg is not None
        seg.end = at
        sub.closed.append(seg)
        sub.segment = None
        return seg

    # -- issuing and finalizing --------------------------------------------------------

    def _issue(
        self,
        sub: Subscription,
        reason: str,
        at: datetime,
        segment: Segment | None,
        lines: list[InvoiceLine],
        *,
        key: str | None = None,
        finalize_at: datetime | None = None,
    ) -> None:
        draft = Draft(reason, key or reason, at, finalize_at or at, segment, lines)
        if draft.finalize_at == at:
            self._finalize(sub, draft, at)  # what the due order would do next anyway
        else:
            sub.drafts.append(draft)

    def _finalize(self, sub: Subscription, draft: Draft, at: datetime) -> None:
        lines: list[InvoiceLine] = []
        seg = draft.segment
        if seg is not None:
            seg.billed = {}
            for charge in seg.plan.usage_charges:
                q, amount = seg.price(charge)
                seg.billed[charge.charge_id] = amount
                lines.append(
                    InvoiceLine(charge.charge_id, KIND_USAGE, seg.start, seg.end, q, amount)
                )  # type: ignore[arg-type]
            seg.late.clear()
        lines += draft.fixed_lines
        lines += self._adjustments(sub)
        currency = sub.currency
        subtotal = total([ln.amount for ln in lines])
        if sub.coupon is not None and subtotal > 0:
            coupon = sub.coupon
            amount = coupon.discount(subtotal, currency)
            start, end = _span(lines)
            lines.append(
                InvoiceLine(
                    coupon.coupon_id,
                    KIND_DISCOUNT,
                    start,
                    end,
                    ONE,  # printed as null (invoice_to_contract_dict), as a flat line's
                    CTX.minus(amount) if amount else amount,
                )
            )  # type: ignore[arg-type]
            if coupon.remaining is not None:
                coupon.remaining -= 1
                if coupon.remaining == 0:
                    sub.coupon = None
        tax = self.accounts.tax_rate(sub.account_id, self.tax_rates)
        if tax is not None:
            country, rate = tax
            base = total([ln.amount for ln in lines])
            start, end = _span(lines)
            amount = round_money(CTX.multiply(base, rate), currency)
            lines.append(InvoiceLine(f"tax:{country}", KIND_TAX, start, end, base, amount))  # type: ignore[arg-type]
        invoice = make_invoice(
            subscription_id=sub.subscription_id,
            account_id=sub.account_id,
            currency=currency,
            issued_at=draft.issued_at,
            reason=draft.reason,
            lines=lines,
            reason_key=draft.reason_key,
        )
        applied, due = self.accounts.settle(sub.account_id, currency, invoice.total)
        self.invoices.append(invoice.settled(at, applied, due))

    def _adjustments(self, sub: Subscription) -> list[InvoiceLine]:
        """Rule 18: re-rate every billed segment that counted late usage since."""
        lines = []
        for seg in sorted(sub.closed, key=lambda s: s.start):
            if not seg.late or seg.billed is None:
                continue
            for charge in seg.plan.usage_charges:
                if charge.metric not in seg.late:
                    continue
                q, amount = seg.price(charge)
                delta = CTX.subtract(amount, seg.billed.get(charge.charge_id, ZERO))
                seg.billed[charge.charge_id] = amount
                lines.append(
                    InvoiceLine(charge.charge_id, KIND_USAGE_ADJUSTMENT, seg.start, seg.end, q,  # type: ignore[arg-type]
                                round_money(delta, sub.currency))
                )  # fmt: skip
            seg.late.clear()
        return lines

    # -- events ----------------------------------------------------------------------

    def _create(self, event: SubscriptionCreated) -> None:
        plan = self.book.latest(event.plan_id)
        t = event.timestamp
        trialing = plan.trial_days > 0
        sub = Subscription(
            event.subscription_id,
            event.account_id,
            plan.currency,
            plan.interval,
            created_at=t,
            anchor=t + timedelta(days=plan.trial_days) if trialing else t,
            plan=plan,
            status=TRIALING if trialing else ACTIVE,
            payment_method=event.payment_method,
        )
        self.subs[sub.subscription_id] = sub
        if not trialing:
            sub.segment = Segment(t, 0, plan)
            start, end = sub.period_bounds(0)
            self._issue(sub, REASON_CREATED, t, None, flat_lines(plan, start, end))
        self.schedule(sub)

    def _usage(self, sub: Subscription, event: Usage, arrival: datetime) -> None:
        ts = event.timestamp
        if ts < sub.created_at:
            raise Rejected("usage before the subscription started")
        if sub.ended_at is not None and ts >= sub.ended_at:
            raise Rejected("subscription has ended")
        if sub.status == PAUSED and ts >= sub.paused_at:  # type: ignore[operator]
            raise Rejected("subscription is paused")
        seg = sub.segment
        # the usual case, the open segment, needs no period arithmetic
        k = seg.period if seg is not None and seg.contains(ts) else sub.period_of(ts)
        if k == TRIAL_KEY:
            sub.seen.setdefault(TRIAL_KEY, set()).add(event.event_id)  # counted, never billed
            return
        if seg is None or not seg.contains(ts):
            seg = next((s for s in sub.closed if s.contains(ts)), None)
            if seg is None or seg.billed is not None:
                if k < sub.period_of(arrival) - self.late_periods:
                    raise Rejected("late usage older than late_usage_periods")
                if seg is None:
                    raise Rejected("usage outside any billable span of its subscription")
        seen = sub.seen.setdefault(k, set())
        if event.event_id in seen:
            return  # a repeat: the first counts
        seen.add(event.event_id)
        if seg.add(event) and seg.billed is not None:  # late: re-rated on the next invoice
            seg.late.add(event.metric)
            if sub.status == ENDED and sub.adjustment_due is None:
                sub.adjustment_due = arrival + ADJUSTMENT_DELAY
                self.schedule(sub)

    def _change_plan(self, sub: Subscription, event: PlanChanged) -> None:
        if sub.status == PAUSED:
            raise Rejected("plan change while paused")
        if event.plan_id == sub.plan.plan_id:
            raise Rejected(f"subscription is already on plan {event.plan_id!r}")
        new = self.book.latest(event.plan_id)
        if new.currency != sub.currency:
            raise Rejected(f"plan change to another currency ({sub.currency} -> {new.currency})")
        if new.interval != sub.interval:
            raise Rejected(f"plan change to another interval ({sub.interval} -> {new.interval})")
        t = event.timestamp
        if sub.status == TRIALING:
            sub.plan = new  # the trial goes on: nothing issued, same end
            return
        old = sub.plan
        start, end = sub.period_bounds(sub.period)
        seg = self._close_segment(sub, t)
        lines = proration_lines(old, KIND_PRORATION_CREDIT, t, start, end)
        lines += proration_lines(new, KIND_PRORATION_CHARGE, t, start, end)
        n = sub.changes_at_segment_start + 1 if t == seg.start else 1
        key = f"{REASON_PLAN_CHANGED}:{new.plan_id}" + (f"#{n}" if n > 1 else "")
        sub.plan = new
        sub.segment = Segment(t, sub.period, new)
        sub.changes_at_segment_start = n
        self._issue(sub, REASON_PLAN_CHANGED, t, seg, lines, key=key)

    def _cancel(self, sub: Subscription, event: Cancelled) -> None:
        t = event.timestamp
        if sub.status == PAUSED:
            sub.status, sub.ended_at = ENDED, t  # at once, with no invoice (both modes)
            return
        if event.mode == "end_of_period":
            if sub.cancel_at_period_end:
                raise Rejected("cancellation already scheduled")
            sub.cancel_at_period_end = True
            return
        if sub.status == TRIALING:
            sub.status, sub.ended_at = ENDED, t
            return
        start, end = sub.period_bounds(sub.period)
        seg = self._close_segment(sub, t)
        lines = proration_lines(sub.plan, KIND_PRORATION_CREDIT, t, start, end)
        sub.status, sub.ended_at = ENDED, t
        self._issue(sub, REASON_CANCELLED, t, seg, lines)

    def _pause(self, sub: Subscription, event: Paused) -> None:
        if sub.status != ACTIVE or sub.cancel_at_period_end:
            state = "trialing" if sub.status == TRIALING else sub.status
            raise Rejected(f"only an active subscription can pause (this one is {state}"
                           f"{', cancelling' if sub.cancel_at_period_end else ''})")  # fmt: skip
        t = event.timestamp
        start, end = sub.period_bounds(sub.period)
        seg = self._close_segment(sub, t)
        lines = proration_lines(sub.plan, KIND_PRORATION_CREDIT, t, start, end)
        sub.status, sub.paused_at = PAUSED, t
        self._issue(sub, REASON_PAUSED, t, seg, lines, key=sub.key(REASON_PAUSED, t))

    def _resume(self, sub: Subscription, event: Resumed) -> None:
        if sub.status != PAUSED:
            raise Rejected("only a paused subscription can resume")
        r = event.timestamp
        target = self.book.move_target(sub.plan)
        if target is not None:
            sub.plan = target
        k = sub.period_of(r)
        start, end = sub.period_bounds(k)
        lines = proration_lines(sub.plan, KIND_PRORATION_CHARGE, r, start, end)
        sub.status, sub.paused_at, sub.period = ACTIVE, None, k
        sub.segment = Segment(r, k, sub.plan)
        sub.changes_at_segment_start = 0
        self._issue(sub, REASON_RESUMED, r, None, lines, key=sub.key(REASON_RESUMED, r))

    def _apply_coupon(self, sub: Subscription, event: CouponApplied) -> None:
        remaining = {"once": 1, "repeating": event.periods, "forever": None}[event.duration]
        sub.coupon = Coupon(event.coupon_id, event.percent_off, event.amount_off, remaining)


_HANDLERS = {
    PlanChanged: ContractRun._change_plan,
    Cancelled: ContractRun._cancel,
    Paused: ContractRun._pause,
    Resumed: ContractRun._resume,
    CouponApplied: ContractRun._apply_coupon,
}


def arrival_of(event: AnyEvent) -> datetime:
    """A usage event arrives at its received_at when it has one, else at its timestamp."""
    if isinstance(event, Usage) and event.received_at is not None:
        return event.received_at
    return event.timestamp


def run_contract(
    catalog: Catalog, events: Iterable[tuple[AnyEvent, object]], until: datetime
) -> tuple[ContractRun, list[tuple[object, str]], int, int]:
    """Rate (event, tag) pairs as of `until`: (run, [(tag, reason)] dead letters in
    processing order, events applied, events arriving after until)."""
    ordered = sorted(events, key=lambda p: arrival_of(p[0]))  # stable: ties keep input order
    run = ContractRun(catalog)
    dead: list[tuple[object, str]] = []
    applied = deferred = 0
    for event, tag in ordered:
        arrival = arrival_of(event)
        if arrival > until:
            deferred += 1
            continue
        run.advance(arrival)
        try:
            run.apply(event, arrival)
        except Rejected as e:
            dead.append((tag, e.reason))
        else:
            applied += 1
    run.advance(until)
    return run, dead, applied, deferred
