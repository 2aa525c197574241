"""Capacity answers from a measured rate: the time with today's workers, the workers the
window needs, and the first bound in the way (gateway ceiling, API limit, partitions,
CPU, else workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams.config import Settings
from streams.ops.capacity import Measurement, answer, latest_measurement, record_run

# 3,000 payments in 60 s with 2 workers: 25/s per worker; the gateway takes 200/s at most
PAY = Measurement("payments", 3_000, 60.0, 2, "test", ceiling_per_s=200.0)


def test_the_time_now_and_the_workers_the_window_needs() -> None:
    a = answer(PAY, 90_000, 3_600, workers_now=2, partitions=12, cores=8)
    assert a.rate_now_per_s == 50 and a.seconds_now == 1_800 and a.fits_now
    assert a.workers_needed == 1 and a.bound == "workers"
    a = answer(PAY, 360_000, 3_600, workers_now=2, partitions=12, cores=8)
    assert a.needed_per_s == 100 and a.workers_needed == 4 and not a.fits_now
    assert a.bound == "workers" and "run 4 worker(s)" in a.advice


def test_the_first_bound_in_the_way() -> None:
    # 150/s: 6 workers, more than 4 cores
    assert answer(PAY, 540_000, 3_600, 2, partitions=12, cores=4).bound == "cpu"
    # ... and than 4 partitions: partitions come first
    a = answer(PAY, 540_000, 3_600, 2, partitions=4, cores=4)
    assert a.bound == "partitions" and "--partitions 6" in a.advice
    # 250/s is past the gateway's ceiling, whatever the workers
    a = answer(PAY, 900_000, 3_600, 2, partitions=64, cores=64)
    assert a.bound == "gateway ceiling" and "1.2x" in a.advice
    # the API tenant's limit bounds signups
    signups = Measurement("signups", 1_000, 1.0, 1, "test")
    a = answer(signups, 100_000, 10.0, 2, 10**6, 64, api_limit_per_s=5_000)
    assert a.bound == "api limit" and a.rate_now_per_s == 2_000
    # with more workers than partitions, only as many as partitions work
    assert answer(PAY, 1_000, 3_600, workers_now=8, partitions=3, cores=8).rate_now_per_s == 75


def test_a_run_recorded_here_is_preferred_to_the_benchmark(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    bench = latest_measurement(settings, "payments")
    assert bench is not None and bench.source.startswith("benchmark")
    assert bench.ceiling_per_s and bench.ceiling_per_s > 0
    record_run(settings, "payment-run", 800, 20.0, 1)
    record_run(settings, "payment-run", 400, 16.0, 2)  # the latest
    record_run(settings, "bill-run", 0, 0.0, 1)  # no work: not a rate
    got = latest_measurement(settings, "payments")
    assert got is not None and got.source.startswith("run recorded")
    assert (got.items, got.seconds, got.workers, got.per_worker_per_s) == (400, 16.0, 2, 12.5)
    kinds = {json.loads(p.read_text())["kind"] for p in (tmp_path / "runs").glob("*.json")}
    assert kinds == {"payment-run", "bill-run"}
    with pytest.raises(ValueError, match="no rate"):
        answer(Measurement("payments", 0, 1, 1, "t"), 5, 10, 1, 1, 1)
