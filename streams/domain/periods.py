"""Billing periods anchored at subscription creation.

Period k starts at ``anchor + k * interval``, always computed from the anchor
(never by chaining) so a Jan 31 anchor gives Feb 28 and then Mar 31 again.
"""

from __future__ import annotations

import calendar
from datetime import datetime
from enum import StrEnum


class Interval(StrEnum):
    MONTH = "month"
    YEAR = "year"

    @property
    def months(self) -> int:
        return 1 if self is Interval.MONTH else 12


_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def add_months(anchor: datetime, months: int) -> datetime:
    """Same day and time of day ``months`` later, clamped to the month's last day."""
    index = anchor.year * 12 + (anchor.month - 1) + months
    year, month0 = divmod(index, 12)
    month = month0 + 1
    day = anchor.day
    if day > 28:
        last = 29 if month == 2 and calendar.isleap(year) else _DAYS_IN_MONTH[month]
        if day > last:
            day = last
    return anchor.replace(year=year, month=month, day=day)


def period_start(anchor: datetime, interval: Interval, k: int) -> datetime:
    if k < 0:
        raise ValueError("period index must be >= 0")
    if interval is Interval.MONTH:
        months = 1
    elif interval is Interval.YEAR:
        months = 12
    else:
        months = Interval(interval).months  # a plain str, or ValueError
    return add_months(anchor, k * months)


def period_bounds(anchor: datetime, interval: Interval, k: int) -> tuple[datetime, datetime]:
    """Half-open [start, end) of period k; end is the start of period k + 1."""
    return period_start(anchor, interval, k), period_start(anchor, interval, k + 1)


def period_index_at(anchor: datetime, interval: Interval, t: datetime) -> int:
    """The k with start(k) <= t < start(k + 1), for t >= anchor."""
    if t < anchor:
        raise ValueError("t is before the anchor")
    step = Interval(interval).months
    months = (t.year - anchor.year) * 12 + (t.month - anchor.month)
    k = max(months // step, 0)
    # the month-difference estimate is off by at most one in either direction
    while k > 0 and period_start(anchor, interval, k) > t:
        k -= 1
    while period_start(anchor, interval, k + 1) <= t:
        k += 1
    return k
