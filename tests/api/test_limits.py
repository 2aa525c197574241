"""Per-tenant admission: the token bucket and the concurrency cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.api.limits import Admission, TokenBucket


@given(
    rate=st.floats(1, 10_000),
    gaps=st.lists(st.floats(0, 0.05), min_size=1, max_size=300),
)
def test_a_bucket_never_admits_more_than_burst_plus_rate_times_time(
    rate: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, max(1.0, rate))
    now, taken = 0.0, 0
    for gap in gaps:
        now += gap
        if bucket.take(now) == 0.0:
            taken += 1
    assert taken <= max(1.0, rate) + rate * now + 1e-6


def test_a_refusal_says_when_to_come_back() -> None:
    bucket = TokenBucket(rate=2, burst=2)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.5  # one token every half second
    assert bucket.take(0.5) == 0.0


def test_admission_caps_concurrency_and_answers_retry_after_in_whole_seconds() -> None:
    adm = Admission(max_concurrency=2, rate_per_s=1000)
    assert adm.admit(0.0) is None and adm.admit(0.0) is None
    assert adm.admit(0.0) == 1  # over the cap
    adm.release()
    assert adm.admit(0.0) is None
    slow = Admission(max_concurrency=10, rate_per_s=0.25)
    assert slow.admit(0.0) is None
    assert slow.admit(0.0) == 4  # a token every 4 s
    slow.reconfigure(10, 100)  # a new limit applies at once
    assert slow.admit(0.0) is None
