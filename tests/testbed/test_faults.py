"""The warehouse outage of `streambill chaos` is injected from the test bed: the sink
started as OutageSwitchedSink (the production sink, its warehouse client wrapped) finds
its warehouse down while the switch is on, and up again after; `streambill run sink`
ignores the switch. On the real broker and chDB."""

from __future__ import annotations

import pytest

from streams.config import Settings
from streams.stack import ProcessorProcess, wait_for_warehouse_endpoint
from streams.testbed.faults import OutageSwitchedSink, outage_switch
from streams.warehouse import QueryError, query

pytestmark = pytest.mark.kafka


def plans(settings: Settings) -> int:
    return int(query(settings, "SELECT count() FROM plans")["rows"][0][0])


def test_the_switch_takes_the_warehouse_down_only_in_the_switched_sink(
    pipeline_env: Settings, kafka_bootstrap: str
) -> None:
    switch = outage_switch(pipeline_env)
    switch.parent.mkdir(parents=True, exist_ok=True)
    sink = OutageSwitchedSink(pipeline_env, kafka_bootstrap).start()
    try:
        wait_for_warehouse_endpoint(pipeline_env, sink)
        assert plans(pipeline_env) > 0  # built as `streambill run sink` builds it: the catalog
        switch.touch()
        with pytest.raises(QueryError, match="injected by streambill chaos"):
            plans(pipeline_env)
        switch.unlink()
        assert plans(pipeline_env) > 0
    finally:
        sink.stop()

    switch.touch()
    production = ProcessorProcess(pipeline_env, kafka_bootstrap, "sink").start()
    try:
        wait_for_warehouse_endpoint(pipeline_env, production)
        assert plans(pipeline_env) > 0
    finally:
        production.stop()
