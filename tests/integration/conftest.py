from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.helpers import Procs


@pytest.fixture
def procs() -> Iterator[Procs]:
    started = Procs()
    yield started
    started.stop_all()
