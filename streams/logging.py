"""Structured (JSON) logs for every process, on stderr: one JSON object a line, whoever
writes it (our code through structlog, librdkafka through the stdlib logger below)."""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import structlog

from streams.config import log_level

# the stdlib logger every Kafka client is given (confluent-kafka's `logger` setting,
# streams/kafka/clients.py), so librdkafka's lines come out as JSON, not `%4|...|rdkafka#`
KAFKA_LOGGER = logging.getLogger("streambill.librdkafka")

_SHARED = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(level: str | None = None) -> None:
    level_no = getattr(logging, (level or log_level()).upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *_SHARED,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, _librdkafka_fields],
            pass_foreign_args=True,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    KAFKA_LOGGER.handlers[:] = [handler]
    KAFKA_LOGGER.setLevel(level_no)
    KAFKA_LOGGER.propagate = False


def _librdkafka_fields(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """confluent-kafka logs `"%s [%s] %s" % (facility, client name, message)`: keep the
    three as fields, the message as the event."""
    args = event.pop("positional_args", None)
    if isinstance(args, tuple) and len(args) == 3:
        facility, client, message = args
        thread, _, text = str(message).partition("]: ")  # "[thrd:<name>]: <text>"
        if thread.startswith("[thrd:") and text:
            event.update(event=text, thread=thread.removeprefix("[thrd:"))
        else:
            event.update(event=str(message))
        event.update(facility=facility, client=client, source="librdkafka")
    return event


P = ParamSpec("P")
R = TypeVar("R")


def fatal_errors_as_json(command: Callable[P, R]) -> Callable[P, R]:
    """A processor's fatal error as one JSON line (its class and message; the traceback
    too at DEBUG) and exit status 1, instead of a boxed traceback on stderr."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            import click
            import typer

            # typer.Exit is not click's Exit
            exits = (click.exceptions.ClickException, click.exceptions.Exit, typer.Exit)
            if isinstance(exc, exits):
                raise  # usage errors and explicit exits keep typer's handling
            log = structlog.get_logger("streambill")
            fields = {"error": type(exc).__name__, "message": str(exc)}
            if log.is_enabled_for(logging.DEBUG):
                log.critical("fatal error", **fields, exc_info=exc)
            else:
                log.critical("fatal error", **fields)
            raise SystemExit(1) from None

    return run


class ProgressLog:
    """A line every `every_s` seconds with what the process has done so far and since the
    last line, from its metrics registry: a thread of its own, nothing on the hot path."""

    def __init__(
        self, processor: str, every_s: float, read: Callable[[], Iterable[tuple[str, float]]]
    ) -> None:
        self.processor = processor
        self.every_s = every_s
        self.read = read  # (figure, value): summed per figure
        self.last: dict[str, float] = {}
        self.stopped = threading.Event()

    def start(self) -> ProgressLog:
        if self.every_s > 0:
            threading.Thread(target=self._loop, name="progress-log", daemon=True).start()
        return self

    def _loop(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.log_once()

    def log_once(self) -> None:
        now: dict[str, float] = {}
        for figure, value in self.read():
            now[figure] = now.get(figure, 0) + value
        totals = {k: int(v) for k, v in sorted(now.items())}
        since = {k: int(v - self.last.get(k, 0)) for k, v in sorted(now.items())
                 if not k.startswith("lag")}  # fmt: skip
        self.last = now
        structlog.get_logger("streambill").info(
            "progress", processor=self.processor, every_s=self.every_s, totals=totals,
            since_last=since,
        )  # fmt: skip
