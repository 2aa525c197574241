"""What an event's timestamp and a usage quantity may be: the rule, written once.

The ingestion API (against its clock), the rating processor and the lanes (against the
record's Kafka timestamp, for records published to Kafka directly) and the fast usage
reader (in integers) all refuse the same: an event from before 2000, or dated more than a
day ahead, would open or close decades of periods at once (thousands of invoices per
subscription). A bill run's `until` has the same bound after its issue. A usage quantity
is a decimal from 0 and below 10^MAX_INTEGER_DIGITS (``streams.domain.money``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from streams.domain.money import MAX_INTEGER_DIGITS
from streams.domain.timestamps import to_micros

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(days=1)
EARLIEST_US = to_micros(EARLIEST)
MAX_FUTURE_MS = MAX_FUTURE // timedelta(milliseconds=1)
MAX_FUTURE_TEXT = f"{MAX_FUTURE / timedelta(hours=1):g} hours"
QUANTITY_LIMIT = 10**MAX_INTEGER_DIGITS  # usage quantities are below it


def timestamp_problem(timestamp: datetime, published_ms: int | None) -> str | None:
    """Why an event's timestamp is refused, if it is: before EARLIEST, or more than
    MAX_FUTURE after the record was published (its Kafka timestamp, epoch ms; None when the
    record has none). Compared in whole milliseconds, as Kafka stamps records, so that what
    the API accepted (at most MAX_FUTURE after its clock, then published) passes here."""
    us = to_micros(timestamp)
    if us < EARLIEST_US:
        return f"timestamp before {EARLIEST.date()}"
    if published_ms is not None and us // 1000 > published_ms + MAX_FUTURE_MS:
        return f"timestamp more than {MAX_FUTURE_TEXT} after the record was published"
    return None


def quantity_problem(quantity: Decimal) -> str | None:
    """Why a usage quantity is refused, if it is."""
    if quantity < 0:
        return "must not be negative"
    if quantity >= QUANTITY_LIMIT:
        return f"at most {MAX_INTEGER_DIGITS} integer digits"
    return None
