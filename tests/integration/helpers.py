"""Running the real pipeline (processors as OS processes) from tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from streams.config import Settings
from streams.publish import bill_run_done, issue_bill_run
from streams.stack import ProcessorProcess, wait_for_warehouse_endpoint, wait_while_running
from streams.testbed.demo import DEMO_CATALOG
from streams.warehouse import query


class Procs:
    """Processes a test started; the `procs` fixture stops them all, whatever happened."""

    def __init__(self) -> None:
        self.started: list[ProcessorProcess] = []

    def add(self, proc: ProcessorProcess) -> ProcessorProcess:
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


def start_rating(
    settings: Settings, bootstrap: str, env: dict[str, str] | None = None
) -> ProcessorProcess:
    return ProcessorProcess(
        settings, bootstrap, "rating", "--catalog", str(DEMO_CATALOG), "--clock", "event",
        env=env,
    ).start()  # fmt: skip


def start_sink(settings: Settings, bootstrap: str) -> ProcessorProcess:
    sink = ProcessorProcess(settings, bootstrap, "sink").start()
    wait_for_warehouse_endpoint(settings, sink)
    return sink


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    procs: Iterable[ProcessorProcess] = (),
) -> None:
    wait_while_running(check, procs, timeout, what)


def run_bill_run(
    settings: Settings, bootstrap: str, until: datetime, procs: Iterable[ProcessorProcess]
) -> None:
    offsets = issue_bill_run(settings, bootstrap, until)
    wait_until(
        lambda: bill_run_done(settings, bootstrap, offsets) == len(offsets),
        180,
        "the bill run",
        procs,
    )


def scalar(settings: Settings, sql: str) -> Any:
    return query(settings, sql)["rows"][0][0]


# The streaming rater carries no credit balance yet (rule 21 of the rating contract's
# version 2): its invoices' amount due is the total when positive. Compared with
# `streambill rate`, which carries a credit into the next invoices, they differ in these.
NOT_STREAMED_YET = ("credit_applied", "amount_due")


def as_streamed(invoice: dict[str, Any]) -> dict[str, Any]:
    """An invoice's public JSON less what the streaming rater does not compute yet."""
    return {k: v for k, v in invoice.items() if k not in NOT_STREAMED_YET}
