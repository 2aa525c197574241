from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from streams.config import Settings
from streams.testbed.gateway_simulator import AccountConfig, SimulatorConfig, SimulatorProcess
from tests.integration.helpers import Procs


@pytest.fixture
def procs() -> Iterator[Procs]:
    started = Procs()
    yield started
    started.stop_all()


@pytest.fixture
def simulator(pipeline_env: Settings) -> Iterator[Any]:
    account = AccountConfig(max_concurrency=20, latency_median_ms=10, latency_p99_ms=40,
                            refund_latency_median_ms=10, refund_latency_p99_ms=40,
                            decline_rate=0.0)  # fmt: skip
    config = SimulatorConfig(accounts={"merchant-1": account, "merchant-2": account}, seed=5)
    sim = SimulatorProcess.start(config, pipeline_env.home / "logs")
    yield sim
    sim.stop()
