"""Test bed: faults injected into a real processor from outside its code (`streambill
chaos`).

The warehouse outage: chDB runs inside the sink, so its outage cannot be made from
outside the process, the way chaos kills a broker or switches the gateway off. Instead
chaos starts the production sink through this module (``OutageSwitchedSink``: ``python
-m streams.testbed.faults sink``, built as ``streambill run sink`` builds it, with the
same options) with its warehouse client wrapped in ``OutageSwitchedClient``: while the
outage switch file exists, every call raises ``WarehouseUnavailable``, as a lost server
connection does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from streams.config import Settings
from streams.stack import ProcessorProcess
from streams.warehouse import WarehouseUnavailable


def outage_switch(settings: Settings) -> Path:
    """While this file exists, a sink started as ``OutageSwitchedSink`` finds its
    warehouse down."""
    return settings.home / "faults" / "warehouse-down"


class OutageSwitchedClient:
    """A warehouse client whose every call raises WarehouseUnavailable while the outage
    switch is on."""

    def __init__(self, client: Any, switch: Path) -> None:
        self._client = client
        self._switch = switch

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._switch.exists():
                raise WarehouseUnavailable("warehouse outage (injected by streambill chaos)")
            return attr(*args, **kwargs)

        return call


class OutageSwitchedSink(ProcessorProcess):
    """The sink as a child process, its warehouse behind the outage switch."""

    def __init__(self, settings: Settings, bootstrap: str, *args: str, **options: Any) -> None:
        super().__init__(settings, bootstrap, "sink", *args, **options)

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", __name__, *self.args]


def run_sink(argv: list[str]) -> None:
    """`streambill run sink [options]` with the warehouse client wrapped: the command's own
    options and defaults, the same start-up, the production Sink."""
    import typer.main

    from streams.cli import _processor_start, run_app
    from streams.domain.catalog import Catalog
    from streams.logging import configure, fatal_errors_as_json
    from streams.processors.sink import make_sink
    from streams.warehouse import open_warehouse

    configure()
    with typer.main.get_command(run_app).commands["sink"].make_context("sink", argv) as ctx:
        options = ctx.params

    @fatal_errors_as_json
    def run() -> None:
        settings, bootstrap = _processor_start("sink")
        raw = json.loads(Path(options["catalog"]).read_text())
        topics = options["topics"]
        client = OutageSwitchedClient(open_warehouse(settings), outage_switch(settings))
        make_sink(settings, bootstrap, client,
                  topics=[t for t in topics.split(",") if t] if topics else None,
                  max_rows=options["max_rows"], max_seconds=options["max_seconds"],
                  catalog=(Catalog.from_dict(raw), raw)).run()  # fmt: skip

    run()


if __name__ == "__main__":
    if sys.argv[1:2] != ["sink"]:
        sys.exit("usage: python -m streams.testbed.faults sink [streambill run sink options]")
    run_sink(sys.argv[2:])
