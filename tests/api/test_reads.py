"""The API's warehouse reads: cursors and an event's status from what the warehouse
and the consumer groups hold (streams.api.reads)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from streams.api.reads import (
    Copy,
    decode_cursor,
    encode_cursor,
    is_foreign_account,
    is_unknown_subscription,
    settle,
    string_literal,
)
from streams.domain.cancellations import Subscription, cancellation_refusal
from streams.domain.catalog import Catalog
from streams.domain.events import SubscriptionCreated, Usage
from streams.domain.rating import apply_input
from streams.testbed.demo import DEMO_CATALOG


def test_cursors_round_trip_and_refuse_anything_else() -> None:
    cursor = encode_cursor(1_764_000_000_123_456, "inv:acme-1-s1:created")
    assert decode_cursor(cursor) == (1_764_000_000_123_456, "inv:acme-1-s1:created")
    for bad in ("", "x", "!!!", encode_cursor(1, "it's"), "MTIz"):
        assert decode_cursor(bad) is None, bad
    assert string_literal("a'b\\c") == "'a\\'b\\\\c'"


def copy(offset: int, ts: int = 1, kind: str = "usage", **state: object) -> Copy:
    c = Copy("t.billing.usage", 0, offset, "acme-1", "s-1", ts, kind)
    for k, v in state.items():
        setattr(c, k, v)
    return c


def test_applied_only_when_rated_and_every_dead_letter_has_landed() -> None:
    rated = copy(5, rated=True)
    assert settle([rated], dead_letters_landed=True) == "applied"
    assert settle([rated], dead_letters_landed=False) == "pending"
    assert rated.status == "pending"
    assert settle([copy(5, rated=False)], dead_letters_landed=True) == "pending"
    dead = copy(5, dead_letter=("rejected", "unknown subscription", "rating"))
    assert settle([dead], dead_letters_landed=False) == "dead_lettered"


def test_a_repeat_is_ignored_and_says_so() -> None:
    first, again, later = copy(5, rated=True), copy(9, rated=True), copy(12, ts=2, rated=True)
    assert settle([again, first, later], dead_letters_landed=True) == "applied"
    assert (first.status, again.status) == ("applied", "ignored_repeat")
    assert later.status == "applied"  # another timestamp: possibly another period
    # a creation sent twice: the second is dead-lettered as a duplicate, i.e. ignored
    created = copy(3, kind="subscription", rated=True)
    dup = copy(4, kind="subscription",
               dead_letter=("rejected", "duplicate subscription.created", "rating"))  # fmt: skip
    assert settle([created, dup], dead_letters_landed=True) == "applied"
    assert dup.status == "ignored_repeat"


def test_the_reasons_of_a_foreign_account_and_an_unknown_subscription_are_told_apart() -> None:
    """From the rating processor's and the lane's own words (not copies of them)."""
    catalog = Catalog.from_dict(json.loads(DEMO_CATALOG.read_text()))
    t = datetime(2026, 1, 1, tzinfo=UTC)
    state, _, _ = apply_input(None, SubscriptionCreated(t, "acme-1", "s-1", "pro-usd"),
                              "acme-1", catalog)  # fmt: skip
    used = Usage("u-1", t, "s-1", "api_calls", Decimal(1))
    _, _, (foreign,) = apply_input(state, used, "acme-2", catalog)  # same partition
    _, _, (unknown,) = apply_input(None, used, "acme-2", catalog)  # another partition
    assert is_foreign_account("rejected", foreign) and not is_unknown_subscription(
        "rejected", foreign
    )
    assert is_unknown_subscription("rejected", unknown) and not is_foreign_account(
        "rejected", unknown
    )
    cancel = {"event_id": "c-1", "account_id": "acme-2", "subscription_id": "s-1"}
    lane_foreign = cancellation_refusal(cancel, Subscription("acme-1"))
    lane_unknown = cancellation_refusal(cancel, None)
    assert lane_foreign is not None and lane_unknown is not None
    assert is_foreign_account(*lane_foreign) and not is_unknown_subscription(*lane_foreign)
    assert is_unknown_subscription(*lane_unknown) and not is_foreign_account(*lane_unknown)


def test_an_invoice_document_is_asked_for_by_suffix_or_accept_header() -> None:
    from streams.api.reads import document_format

    assert document_format("inv-1", None) == ("inv-1", "json")
    assert document_format("inv-1", "*/*") == ("inv-1", "json")
    assert document_format("inv-1.pdf", "application/json") == ("inv-1", "pdf")
    assert document_format("inv-1.html", None) == ("inv-1", "html")
    # a browser's header: the first of the three it lists
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    assert document_format("inv-1", browser) == ("inv-1", "html")
    assert document_format("inv-1", "Application/PDF; q=1, text/html") == ("inv-1", "pdf")
    assert document_format("inv-1", "application/json, application/pdf") == ("inv-1", "json")
