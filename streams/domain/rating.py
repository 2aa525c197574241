"""The per-subscription rating state machine.

One ``SubscriptionState`` per subscription; ``apply_event`` and
``close_periods`` are the only transitions. Both are pure functions of
(state, event/time, catalog) apart from one deliberate shortcut: they update
the given state in place and return it (copying the seen-event-id set on every
usage event would make a busy period quadratic). Keep ``state.to_bytes()`` (or
``state.copy()``) if you need the previous version, e.g. to retry after an
aborted transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson

from streams.domain.catalog import Aggregation, Catalog, Plan, UnknownPlan
from streams.domain.events import (
    Cancelled,
    Event,
    PlanChanged,
    SubscriptionCreated,
    Usage,
    UsageRecord,
)
from streams.domain.invoice import (
    KIND_PRORATION_CHARGE,
    KIND_PRORATION_CREDIT,
    KIND_USAGE,
    REASON_CANCELLED,
    REASON_CREATED,
    REASON_PERIOD_END,
    REASON_PLAN_CHANGED,
    Invoice,
    InvoiceLine,
    flat_lines,
    make_invoice,
    proration_lines,
)
from streams.domain.money import CTX, ONE, ZERO, round_money
from streams.domain.periods import Interval, period_start
from streams.domain.pricing import price_usage
from streams.domain.timestamps import require_utc, to_micros

STATUS_ACTIVE = "active"
STATUS_CANCELLING = "cancelling"  # end_of_period cancellation scheduled
STATUS_ENDED = "ended"
_STATUSES = (STATUS_ACTIVE, STATUS_CANCELLING, STATUS_ENDED)

# Periods are computed up to a year past any accepted timestamp; stopping here
# keeps datetime (max year 9999) from overflowing.
HORIZON = datetime(9000, 1, 1, tzinfo=UTC)

_STATE_VERSION = 2  # 2 added payment_method; version 1 states are still read


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    event: object


@dataclass(slots=True)
class SubscriptionState:
    subscription_id: str
    account_id: str
    plan_id: str
    currency: str  # fixed at creation; plan changes must keep it
    interval: Interval  # fixed at creation; plan changes must keep it
    anchor: datetime  # start of period 0
    period_index: int  # the open period k: [start(k), start(k + 1))
    segment_start: datetime  # start of the part of period k rated under plan_id
    # metric -> aggregation -> value over [segment_start, now), for the metrics
    # the current plan bills
    usage: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    # usage event ids seen in the open period (dedup of retries)
    seen_event_ids: set[str] = field(default_factory=set)
    status: str = STATUS_ACTIVE
    # plan changes applied at the instant segment_start, so that several changes
    # at the same instant still get distinct invoice ids
    changes_at_segment_start: int = 0
    payment_method: str | None = None  # gateway token given at creation
    # period k -> start of period k, for the current (anchor, interval): derived data,
    # not serialized and not compared (see _period_start)
    _starts: tuple[datetime, Interval, dict[int, datetime]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # (segment_start, its µs, the period's end µs, at most HORIZON): UsageTally's bounds,
    # derived like _starts (the processor makes a tally per subscription per transaction,
    # mostly for the same open segment). Keyed by the identity of segment_start: every
    # transition that moves the segment or the period assigns a new one.
    _segment_us: tuple[datetime, int, int] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def copy(self) -> SubscriptionState:
        return SubscriptionState.from_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        """Compact positional orjson array; timestamps as epoch microseconds,
        decimals as strings (lossless). Sorted keys/ids keep it deterministic."""
        return orjson.dumps(
            [
                _STATE_VERSION,
                self.subscription_id,
                self.account_id,
                self.plan_id,
                self.currency,
                self.interval,  # a StrEnum: orjson writes its value
                to_micros(self.anchor),
                self.period_index,
                to_micros(self.segment_start),
                self.status,
                {m: {a: str(v) for a, v in aggs.items()} for m, aggs in self.usage.items()},
                sorted(self.seen_event_ids),
                self.changes_at_segment_start,
                self.payment_method,
            ],
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_bytes(cls, b: bytes) -> SubscriptionState:
        v = orjson.loads(b)
        if type(v) is not list or (v[0], len(v)) not in ((1, 13), (2, 14)):
            raise ValueError("not a version-1 or version-2 SubscriptionState")
        status = v[9]
        if status not in _STATUSES:
            raise ValueError(f"invalid status {status!r}")
        try:
            interval = _INTERVALS[v[5]]
        except (KeyError, TypeError):
            interval = Interval(v[5])  # ValueError, as before
        usage = {}
        for m, aggs in v[10].items():
            usage[m] = values = {}
            for a, x in aggs.items():
                values[a] = Decimal(x)
        return cls(
            v[1],  # subscription_id
            v[2],  # account_id
            v[3],  # plan_id
            v[4],  # currency
            interval,
            _EPOCH + timedelta(0, 0, v[6]),  # anchor (from_micros, inlined)
            v[7],  # period_index
            _EPOCH + timedelta(0, 0, v[8]),  # segment_start
            usage,
            set(v[11]),  # seen_event_ids
            status,
            v[12],  # changes_at_segment_start
            v[13] if len(v) > 13 else None,  # payment_method
        )

    def _period_start(self, k: int) -> datetime:
        """period_start(anchor, interval, k), memoized per state: close_periods,
        next_period_end and the transitions ask for the same few periods again and
        again. Keyed by the identity of anchor and interval, so re-assigning either
        (which the transitions never do) just starts a new memo."""
        memo = self._starts
        if memo is None or memo[0] is not self.anchor or memo[1] is not self.interval:
            memo = self._starts = (self.anchor, self.interval, {})
        starts = memo[2]
        start = starts.get(k)
        if start is None:
            if len(starts) >= 8:
                starts.clear()
            start = starts[k] = period_start(self.anchor, self.interval, k)
        return start

    def period_bounds(self) -> tuple[datetime, datetime]:
        k = self.period_index
        return self._period_start(k), self._period_start(k + 1)


_INTERVALS: dict[str, Interval] = {i.value: i for i in Interval}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def plan_missing(state: SubscriptionState, catalog: Catalog) -> bool:
    """A running subscription whose plan the catalog no longer has (a catalog file that
    dropped it before a restart): its events are refused and its periods stay open until
    the plan is back, rather than stopping the rater."""
    return state.status != STATUS_ENDED and state.plan_id not in catalog


def next_period_end(state: SubscriptionState) -> datetime | None:
    """When close_periods next has work to do; None once the subscription ended."""
    if state.status == STATUS_ENDED:
        return None
    return state._period_start(state.period_index + 1)


# --- line builders ---------------------------------------------------------------


def _usage_lines(
    plan: Plan, state: SubscriptionState, start: datetime, end: datetime
) -> list[InvoiceLine]:
    lines = []
    for charge in plan.usage_charges:
        q = state.usage.get(charge.metric, {}).get(charge.aggregation.value, ZERO)
        amount = round_money(price_usage(charge, q), state.currency)
        lines.append(InvoiceLine(charge.charge_id, KIND_USAGE, start, end, q, amount))
    return lines


def _start_segment(state: SubscriptionState, t: datetime) -> None:
    state.segment_start = t
    state.usage = {}


# --- transitions -------------------------------------------------------------------


def close_periods(
    state: SubscriptionState, until: datetime, catalog: Catalog
) -> tuple[SubscriptionState, list[Invoice]]:
    """Issue the invoice of every period end <= until (usage in arrears for the
    ended period, flat charges in advance for the next one). A subscription whose plan
    is no longer in the catalog cannot be priced: nothing closes (see plan_missing)."""
    until = min(require_utc(until), HORIZON)
    invoices: list[Invoice] = []
    if plan_missing(state, catalog):
        return state, invoices
    while state.status != STATUS_ENDED:
        end = state._period_start(state.period_index + 1)
        if end > until:
            break
        plan = catalog.plan(state.plan_id)
        lines = _usage_lines(plan, state, state.segment_start, end)
        if state.status == STATUS_CANCELLING:
            state.status = STATUS_ENDED  # last invoice: no new flat charge
        else:
            next_end = state._period_start(state.period_index + 2)
            lines += flat_lines(plan, end, next_end)
        invoices.append(_invoice(state, end, REASON_PERIOD_END, lines))
        state.period_index += 1
        _start_segment(state, end)
        state.seen_event_ids = set()
        state.changes_at_segment_start = 0
    return state, invoices


def apply_event(
    state: SubscriptionState | None, event: Event, catalog: Catalog
) -> tuple[SubscriptionState | None, list[Invoice], list[Rejection]]:
    """Apply one event: first close every period that ended at or before the
    event's timestamp, then apply the event itself."""
    t = require_utc(event.timestamp)
    if t >= HORIZON:
        return state, [], [Rejection(f"timestamp not before {HORIZON.year}-01-01", event)]
    if isinstance(event, SubscriptionCreated):
        if state is not None:
            return state, [], [Rejection("duplicate subscription.created", event)]
        return _create(event, t, catalog)
    if state is None:
        return None, [], [Rejection("unknown subscription", event)]
    if state.subscription_id != event.subscription_id:
        raise ValueError("event is for another subscription than the state")
    if plan_missing(state, catalog):
        return state, [], [Rejection(f"the subscription's plan {state.plan_id!r} is not in "
                                     "the catalog", event)]  # fmt: skip

    due = next_period_end(state)
    if due is not None and due <= t:
        state, invoices = close_periods(state, t, catalog)
    else:
        invoices = []  # nothing due: what close_periods would find (the usual case)

    if isinstance(event, Usage) and state.status != STATUS_ENDED and t >= state.segment_start:
        _add_usage(state, event, catalog.plan(state.plan_id))  # the hot path, first
        return state, invoices, []

    def reject(reason: str) -> tuple[SubscriptionState, list[Invoice], list[Rejection]]:
        return state, invoices, [Rejection(reason, event)]

    if state.status == STATUS_ENDED:
        return reject("subscription has ended")
    if t < state.segment_start:
        # only possible with out-of-order delivery: that span is already invoiced
        return reject("late event: its billing segment is already invoiced")
    if isinstance(event, PlanChanged):
        reason = _change_plan(state, event, t, catalog, invoices)
        return reject(reason) if reason else (state, invoices, [])
    if isinstance(event, Cancelled):
        if event.mode == "end_of_period":
            if state.status == STATUS_CANCELLING:
                return reject("cancellation already scheduled")
            state.status = STATUS_CANCELLING
            return state, invoices, []
        invoices.append(_cancel_now(state, t, catalog))
        return state, invoices, []
    raise TypeError(f"not an event: {event!r}")


def _create(
    event: SubscriptionCreated, t: datetime, catalog: Catalog
) -> tuple[SubscriptionState | None, list[Invoice], list[Rejection]]:
    try:
        plan = catalog.plan(event.plan_id)
    except UnknownPlan as e:
        return None, [], [Rejection(str(e), event)]
    state = SubscriptionState(
        subscription_id=event.subscription_id,
        account_id=event.account_id,
        plan_id=plan.plan_id,
        currency=plan.currency,
        interval=plan.interval,
        anchor=t,
        period_index=0,
        segment_start=t,
        payment_method=event.payment_method,
    )
    start, end = state.period_bounds()
    return state, [_invoice(state, t, REASON_CREATED, flat_lines(plan, start, end))], []


def _add_usage(state: SubscriptionState, event: Usage, plan: Plan) -> None:
    if event.event_id in state.seen_event_ids:
        return  # a retried delivery: counted once (the first), not an error
    state.seen_event_ids.add(event.event_id)
    # A metric the plan has no charge for is not billed: it is valid usage the
    # plan simply does not price, so it is neither aggregated nor dead-lettered.
    aggs = plan.aggregation_names().get(event.metric)
    if not aggs:
        return
    values = state.usage.setdefault(event.metric, {})
    q = event.quantity
    for agg in aggs:
        old = values.get(agg)
        if agg == _SUM:
            values[agg] = q if old is None else CTX.add(old, q)
        elif agg == _MAX:
            values[agg] = q if old is None else max(old, q)
        else:
            values[agg] = ONE if old is None else CTX.add(old, ONE)


_SUM = Aggregation.SUM.value
_MAX = Aggregation.MAX.value
_HORIZON_US = to_micros(HORIZON)
_NANO = -9  # UsageTally's quantities: integers of 10^-9 units


class UsageTally:
    """Usage of one subscription that only adds up, totalled before it touches the state.

    Equivalent to ``apply_event`` of each of its events in turn, as long as they are
    *plain*: the subscription has not ended and each event falls inside its open segment
    (``start_us <= timestamp < end_us``: no period to close, nothing late). The caller
    checks that and appends the events to ``records``; ``settle`` de-duplicates their ids
    against the state (the first counts), sums, maxes and counts each metric's quantities
    as integers and adds the results to the state's Decimal aggregates once. CTX's 100
    digits keep every sum exact, so one addition of the total leaves the same value, with
    the same digits and exponent, as one addition per event.
    """

    __slots__ = ("end_us", "plan", "records", "start_us", "state")

    def __init__(self, state: SubscriptionState, plan: Plan) -> None:
        if state.status == STATUS_ENDED or plan.plan_id != state.plan_id:
            raise ValueError("no tally for an ended subscription or another plan")
        self.state = state
        self.plan = plan
        memo = state._segment_us
        if memo is None or memo[0] is not state.segment_start:
            end = state._period_start(state.period_index + 1)  # next_period_end: not ended
            memo = state._segment_us = (
                state.segment_start,
                to_micros(state.segment_start),
                min(to_micros(end), _HORIZON_US),
            )
        _, self.start_us, self.end_us = memo
        # plain events in order: (event_id, timestamp µs, account_id, subscription_id,
        # metric, quantity in integer 10^-9 units > 0), as the processor reads them
        self.records: list[UsageRecord] = []

    def settle(self) -> SubscriptionState:
        """Apply the recorded events to the state (once: the tally is empty afterwards)."""
        seen = self.state.seen_event_ids
        aggs = self.plan.aggregation_names()
        totals: dict[str, list[int]] = {}  # metric -> [sum, max, count]
        for event_id, _, _, _, metric, nanos in self.records:
            if event_id in seen:
                continue  # a retried delivery: counted once (the first)
            seen.add(event_id)
            if not aggs.get(metric):
                continue  # a metric the plan does not price (see _add_usage)
            t = totals.get(metric)
            if t is None:
                totals[metric] = [nanos, nanos, 1]
            else:
                t[0] += nanos
                if nanos > t[1]:
                    t[1] = nanos
                t[2] += 1
        self.records = []
        usage = self.state.usage
        for metric, (total, top, n) in totals.items():
            values = usage.setdefault(metric, {})
            for agg in aggs[metric]:
                old = values.get(agg)
                if agg == _SUM:
                    q = Decimal(total).scaleb(_NANO, CTX)
                    values[agg] = q if old is None else CTX.add(old, q)
                elif agg == _MAX:
                    q = Decimal(top).scaleb(_NANO, CTX)
                    values[agg] = q if old is None else max(old, q)
                else:
                    q = Decimal(n)
                    values[agg] = q if old is None else CTX.add(old, q)
        return self.state


def _change_plan(
    state: SubscriptionState,
    event: PlanChanged,
    t: datetime,
    catalog: Catalog,
    invoices: list[Invoice],
) -> str | None:
    """Apply a plan change; return a rejection reason instead if it is invalid."""
    if event.plan_id == state.plan_id:
        return f"subscription is already on plan {event.plan_id!r}"
    try:
        new = catalog.plan(event.plan_id)
    except UnknownPlan as e:
        return str(e)
    if new.currency != state.currency:
        return f"plan change to another currency ({state.currency} -> {new.currency})"
    if new.interval != state.interval:
        # the anchor/period index would no longer describe the periods
        return f"plan change to another interval ({state.interval} -> {new.interval})"
    old = catalog.plan(state.plan_id)
    start, end = state.period_bounds()
    lines = _usage_lines(old, state, state.segment_start, t)
    lines += proration_lines(old, KIND_PRORATION_CREDIT, t, start, end)
    lines += proration_lines(new, KIND_PRORATION_CHARGE, t, start, end)
    n = state.changes_at_segment_start + 1 if t == state.segment_start else 1
    key = f"{REASON_PLAN_CHANGED}:{new.plan_id}" + (f"#{n}" if n > 1 else "")
    invoices.append(_invoice(state, t, REASON_PLAN_CHANGED, lines, key))
    state.plan_id = new.plan_id
    _start_segment(state, t)
    state.changes_at_segment_start = n
    return None


def _cancel_now(state: SubscriptionState, t: datetime, catalog: Catalog) -> Invoice:
    plan = catalog.plan(state.plan_id)
    start, end = state.period_bounds()
    lines = _usage_lines(plan, state, state.segment_start, t)
    lines += proration_lines(plan, KIND_PRORATION_CREDIT, t, start, end)
    state.status = STATUS_ENDED
    invoice = _invoice(state, t, REASON_CANCELLED, lines)
    _start_segment(state, t)
    state.seen_event_ids = set()
    return invoice


def _invoice(
    state: SubscriptionState,
    at: datetime,
    reason: str,
    lines: list[InvoiceLine],
    reason_key: str | None = None,
) -> Invoice:
    return make_invoice(
        subscription_id=state.subscription_id,
        account_id=state.account_id,
        currency=state.currency,
        issued_at=at,
        reason=reason,
        lines=lines,
        reason_key=reason_key,
    )


def apply_input(
    state: SubscriptionState | None, event: Event, account_id: str | None, catalog: Catalog
) -> tuple[SubscriptionState | None, list[Invoice], list[str]]:
    """``apply_event`` plus what only a record from Kafka needs checking: the account it
    names must own the subscription (usage, a plan change or a cancellation under another
    account's key is refused, not billed to that other account). Returns the new state, the
    invoices, and the reasons of the rejections (one dead letter "rejected" each)."""
    if (
        state is not None
        and account_id is not None
        and account_id != state.account_id
        and not isinstance(event, SubscriptionCreated)
    ):
        sub = event.subscription_id
        return state, [], [f"subscription {sub!r} belongs to another account than {account_id!r}"]
    new_state, invoices, rejections = apply_event(state, event, catalog)
    return new_state, invoices, [r.reason for r in rejections]
