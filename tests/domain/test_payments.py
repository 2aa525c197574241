"""The payment attempt state machine: ids, dunning and backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.domain.payments import (
    DEFAULT_DUNNING,
    Final,
    Retry,
    after_attempt,
    backoff,
    idempotency_key,
    parse_schedule,
    payable,
    payment_id,
)

T = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def test_default_dunning_retries_after_1_3_and_7_days_then_gives_up() -> None:
    assert after_attempt("declined", 1, T) == Retry(2, T + timedelta(days=1))
    assert after_attempt("declined", 2, T) == Retry(3, T + timedelta(days=3))
    assert after_attempt("declined", 3, T) == Retry(4, T + timedelta(days=7))
    assert after_attempt("declined", 4, T) == Final("uncollectible")
    assert after_attempt("failed", 4, T) == Final("uncollectible")


@given(st.integers(1, 10), st.sampled_from(["succeeded", "declined", "failed"]))
def test_a_success_ends_collection_and_every_other_outcome_moves_forward(attempt, outcome):
    step = after_attempt(outcome, attempt, T)
    if outcome == "succeeded":
        assert step == Final("succeeded")
    elif isinstance(step, Retry):
        assert step.attempt == attempt + 1 and step.not_before > T
    else:
        assert step == Final("uncollectible") and attempt > len(DEFAULT_DUNNING)


@given(st.text(min_size=1, max_size=40), st.integers(1, 50), st.integers(1, 50))
def test_ids_are_deterministic_and_distinct_per_attempt(invoice, a, b):
    assert idempotency_key(invoice, a) == idempotency_key(invoice, a)
    assert payment_id(invoice, a) == payment_id(invoice, a)
    assert (idempotency_key(invoice, a) == idempotency_key(invoice, b)) == (a == b)


def test_parse_schedule() -> None:
    assert parse_schedule("1d,3d,7d") == DEFAULT_DUNNING
    assert parse_schedule("2s, 1.5m") == (timedelta(seconds=2), timedelta(seconds=90))
    for bad in ("", "3", "1w", "x,1d", "-1d"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_payable() -> None:
    from decimal import Decimal

    assert payable(Decimal("0.01"), "tok_1")
    assert not payable(Decimal(0), "tok_1")
    assert not payable(Decimal("-5"), "tok_1")
    assert not payable(Decimal(5), None)
    assert not payable(Decimal(5), "")


@given(st.integers(0, 30))
def test_backoff_is_jittered_under_an_exponential_ceiling(retry) -> None:
    rng = random.Random(retry)
    delays = [backoff(retry, base=0.2, cap=10.0, rng=rng) for _ in range(50)]
    assert all(0 <= d <= min(10.0, 0.2 * 2**retry) for d in delays)
    assert len(set(delays)) > 1  # jitter: retries do not arrive together


def test_after_attempt_refuses_attempt_zero() -> None:
    with pytest.raises(ValueError):
        after_attempt("declined", 0, T)
