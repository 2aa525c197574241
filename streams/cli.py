"""The `streambill` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from streams.api.cli import api as api_cmd
from streams.api.cli import tenant_app
from streams.catalog_cli import catalog_app
from streams.config import DEFAULT_CATALOG, DEPLOY_DIR
from streams.config import settings as load_settings
from streams.customers import customer_app
from streams.logging import configure as configure_logging
from streams.logging import fatal_errors_as_json
from streams.payments.cli import gateway_app

app = typer.Typer(
    help="streambill: subscription billing as a Kafka stream-processing pipeline.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
run_app = typer.Typer(help="Run one processor in this process (until SIGTERM).")
kafka_app = typer.Typer(help="The project's local Kafka cluster (deploy/kafka/kafka.sh).")
app.add_typer(run_app, name="run")
app.add_typer(kafka_app, name="kafka")
bench_app = typer.Typer(help="Benchmarks: start what they need, print figures, write JSON.")
app.add_typer(bench_app, name="bench")
app.add_typer(gateway_app, name="gateway")
app.add_typer(tenant_app, name="tenant")
app.add_typer(customer_app, name="customer")
app.add_typer(catalog_app, name="catalog")
invoice_app = typer.Typer(help="Invoices: their documents.")
app.add_typer(invoice_app, name="invoice")
app.command("api")(api_cmd)
console = Console(stderr=True)
out = Console()


def _parse_ts(value: str) -> datetime:
    from streams.domain.timestamps import parse_timestamp

    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _write_json(path: Path | None, payload: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")


@app.callback()
def main(log_level: str = typer.Option("INFO", envvar="STREAMBILL_LOG_LEVEL")) -> None:
    configure_logging(log_level)


@app.command()
def demo(
    accounts: int = typer.Option(10_000, "--accounts", min=1, help="accounts (subscriptions)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """Run the whole pipeline end to end on real Kafka and embedded ClickHouse, in a
    namespace and home of its own (never a running stack's topics, groups or warehouse)."""
    from streams.testbed.benchmarks_doc import provenance
    from streams.testbed.demo import print_left_running, print_result, result_json, run_demo

    started = provenance()
    result = run_demo(load_settings(), accounts, console)
    print_result(out, result)
    print_left_running(out, result)
    _write_json(json_out, {**result_json(result, accounts), "provenance": started})
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def reset(
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Wipe this local installation: everything under $STREAMBILL_HOME (state, logs, the
    embedded warehouse, API tenants, demo homes) and the local Kafka broker's data after
    stopping it; with a configured cluster (KAFKA_BOOTSTRAP_SERVERS), the topics and
    consumer groups of this namespace instead. Refuses while a process of it runs."""
    from streams.kafka.topics import namespace
    from streams.reset import RefusedReset, live_processes, plan_reset, wipe

    settings = load_settings()
    live = live_processes(settings)
    if live:
        for pid, name in sorted(live.items()):
            console.print(f"running: {name} (pid {pid})")
        console.print("[red]refused:[/] stop these first (`streambill down`)")
        raise typer.Exit(1)
    try:
        plan = plan_reset(settings, namespace())
    except RefusedReset as exc:
        console.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(1) from None
    lines = plan.describe()
    if not lines:
        out.print("nothing to reset")
        return
    out.print("streambill reset deletes:", highlight=False)
    for line in lines:
        out.print(f"  {line}", highlight=False, soft_wrap=True)
    if not yes:
        typer.confirm("Delete all of this?", abort=True)
    wipe(settings, plan)
    out.print("reset done")


@app.command()
def rate(
    catalog: Path = typer.Option(..., exists=True, dir_okay=False, help="catalog JSON"),
    events: Path = typer.Option(..., exists=True, dir_okay=False, help="events JSONL"),
    until: str = typer.Option(..., help="invoice every period ending at or before this instant"),
    out_file: Path | None = typer.Option(None, "--out", help="invoices JSONL (default stdout)"),
    dead_letters: Path | None = typer.Option(None, "--dead-letters", help="rejected events JSONL"),
) -> None:
    """Offline rater: the same domain code as the rating processor, on files."""
    from streams.domain.catalog import CatalogError
    from streams.offline import dead_letter_to_json_line, rate_streams

    try:
        result = rate_streams(catalog, events, _parse_ts(until))
    except CatalogError as exc:
        console.print(f"[red]invalid catalog:[/] {exc}")
        raise typer.Exit(2) from None
    _write_invoices(result.invoices, out_file)
    if dead_letters:
        dead_letters.write_text(
            "".join(dead_letter_to_json_line(d) + "\n" for d in result.dead_letters)
        )
    elif result.dead_letters:
        console.print(f"{len(result.dead_letters)} events rejected (use --dead-letters FILE)")


def _write_invoices(invoices: list, out_file: Path | None) -> None:
    """`rate`'s output: one JSON invoice a line, to the file or stdout."""
    from streams.offline import invoice_to_json_line

    text = "".join(invoice_to_json_line(inv) + "\n" for inv in invoices)
    if out_file:
        out_file.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def replay(
    catalog: Path = typer.Option(..., exists=True, dir_okay=False, help="catalog JSON"),
    events: Path = typer.Option(..., exists=True, dir_okay=False, help="events JSONL"),
    until: str = typer.Option(..., help="invoice every period ending at or before this instant"),
    out_file: Path | None = typer.Option(None, "--out", help="invoices JSONL (default stdout)"),
) -> None:
    """`rate`'s input through the real pipeline: Kafka topics of a fresh namespace, the
    rating processor, the sink and a fresh embedded warehouse; prints the invoices as they
    landed in ClickHouse, in `rate`'s format and order."""
    from streams.domain.catalog import CatalogError
    from streams.kafka.local import bootstrap_servers
    from streams.replay import ReplayError, check_until
    from streams.replay import replay as run

    try:
        when = check_until(_parse_ts(until))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--until") from None
    settings = load_settings()
    try:
        result = run(catalog, events.read_text().splitlines(), when,
                     bootstrap_servers(settings), console,
                     contract=settings.rating_contract)  # fmt: skip
    except CatalogError as exc:
        console.print(f"[red]invalid catalog:[/] {exc}")
        raise typer.Exit(2) from None
    except ReplayError as exc:
        console.print(f"[red]replay failed:[/] {exc}")
        raise typer.Exit(1) from None
    _write_invoices(result.invoices, out_file)
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(result.dead_letters.items()))
    console.print(
        f"{len(result.invoices)} invoices; {result.published} records published "
        f"({result.raw} as raw bytes: not valid events), {result.deferred} events after "
        f"--until not published; dead letters: rating {result.dead_letters.total()}"
        f"{f' ({reasons})' if reasons else ''}, sink {result.sink_dead_letters}"
        f"{f', catalog {result.catalog_refused}' if result.catalog_refused else ''}; "
        f"{result.seconds:.1f} s"
    )


class Clock(StrEnum):
    event = "event"
    wall = "wall"


def _catalog_option() -> Path:
    return typer.Option(
        DEFAULT_CATALOG,
        envvar="STREAMBILL_CATALOG",
        exists=True,
        dir_okay=False,
        help="catalog JSON (the rating processor prices with it; the sink loads it as plans)",
    )


def _processor_start(name: str) -> tuple[Any, str]:
    """What every processor does first: settings, the cluster (the local one started if
    none is configured), the declared topics, and its metrics endpoint."""
    from streams import metrics
    from streams.kafka import clients
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import ensure_topics

    settings = load_settings()
    bootstrap = bootstrap_servers(settings)
    ensure_topics(clients.admin(settings, bootstrap), settings)
    metrics.serve(settings, name)
    return settings, bootstrap


@run_app.command("rating")
@fatal_errors_as_json
def run_rating(
    catalog: Path = _catalog_option(),
    clock: Clock = typer.Option(Clock.wall, help="wall: periods close as real time passes"),
    worker: int | None = typer.Option(
        None, min=0, help="worker index: part of the transactional id (default: a free one)"
    ),
) -> None:
    """The rating processor: subscriptions + usage -> invoices."""
    from streams.domain.catalog import Catalog
    from streams.processors.contract_rating import make_contract_rating
    from streams.processors.rating import make_rating
    from streams.runtime.process import WorkerIndexTaken, claim_worker_index

    try:  # before anything starts: a worker refused here fences nobody
        index = claim_worker_index(load_settings(), "rating", worker)
    except WorkerIndexTaken as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    settings, bootstrap = _processor_start("rating")
    cat = Catalog.from_dict(json.loads(catalog.read_text()))
    make = make_contract_rating if settings.rating_contract == 2 else make_rating
    make(settings, bootstrap, cat, worker=index, clock=clock.value).run()


@run_app.command("sink")
@fatal_errors_as_json
def run_sink(
    catalog: Path = _catalog_option(),
    topics: str | None = typer.Option(
        None, help="comma-separated topic base names to land (default: all of them)"
    ),
    max_rows: int = typer.Option(250_000, help="a batch lands at this many messages..."),
    max_seconds: float = typer.Option(2.0, help="...or after this many seconds"),
) -> None:
    """The sink: Kafka topics -> ClickHouse; owns an embedded warehouse and serves queries."""
    from streams.domain.catalog import Catalog
    from streams.processors.sink import make_sink

    settings, bootstrap = _processor_start("sink")
    raw = json.loads(catalog.read_text())
    chosen = [t for t in topics.split(",") if t] if topics else None
    make_sink(settings, bootstrap, topics=chosen, max_rows=max_rows, max_seconds=max_seconds,
              catalog=(Catalog.from_dict(raw), raw)).run()  # fmt: skip


@run_app.command("payments")
@fatal_errors_as_json
def run_payments() -> None:
    """The payments processor: due invoices -> gateway -> billing.payment-results."""
    from streams.processors.payments import make_payments

    settings, bootstrap = _processor_start("payments")
    make_payments(settings, bootstrap).run()


@run_app.command("lane")
@fatal_errors_as_json
def run_lane_cmd(
    lane: str = typer.Argument("priority", help="priority | standard"),
) -> None:
    """A lane processor: the urgent workflows (priority) or the others (standard);
    STREAMBILL_URGENT_WORKFLOWS says which is which (default: refund,cancellation)."""
    from streams.lanes import LaneConfigError, parse_urgent, workflows_of
    from streams.processors.lane import make_lane

    settings = load_settings()
    try:
        workflows_of(lane, parse_urgent(settings.urgent_workflows))
    except LaneConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings, bootstrap = _processor_start(f"lane-{lane}")
    make_lane(settings, bootstrap, lane).run()


@run_app.command("alerts")
@fatal_errors_as_json
def run_alerts(
    rules: Path = typer.Option(
        DEPLOY_DIR / "alerts" / "rules.yaml",
        envvar="STREAMBILL_ALERT_RULES",
        exists=True,
        dir_okay=False,
        help="the alert rules (YAML)",
    ),
    webhooks: str = typer.Option(
        "", envvar="STREAMBILL_ALERT_WEBHOOKS", help="more receivers: json:URL,slack:URL"
    ),
) -> None:
    """Evaluate the alert rules continuously; notify webhooks once per firing and per
    resolution, and record both on billing.alerts."""
    import asyncio

    from streams.ops.alerts import RulesError, load_rules, make_alerting
    from streams.runtime.process import StopFlag

    try:
        ruleset = load_rules(rules, webhooks)
    except RulesError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings, bootstrap = _processor_start("alerts")
    stop = StopFlag()
    asyncio.run(make_alerting(settings, bootstrap, ruleset).run(lambda: bool(stop)))


@run_app.command("refunds", hidden=True)
def run_refunds_cmd() -> None:
    """The priority lane (its former name)."""
    run_lane_cmd("priority")


@app.command()
@fatal_errors_as_json
def dashboard(
    host: str = typer.Option("127.0.0.1", envvar="STREAMBILL_DASHBOARD_HOST"),
    port: int = typer.Option(8080, envvar="STREAMBILL_DASHBOARD_PORT"),
) -> None:
    """The health dashboard: invoices, payments, refunds, API traffic, lag, dead letters."""
    from streams.kafka.local import bootstrap_servers
    from streams.ops.dashboard import serve

    settings = load_settings()
    serve(settings, bootstrap_servers(settings), host, port)


@app.command()
def lag(
    group: str | None = typer.Option(None, help="only this consumer group (without namespace)"),
    json_out: bool = typer.Option(False, "--json", help="one JSON array of partitions"),
) -> None:
    """Consumer-group lag per group, topic and partition: the records each group still
    has to read (transaction markers and aborted records are not records)."""
    from rich.table import Table

    from streams.kafka.lag import UnknownGroup, group_lags
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import group_id

    settings = load_settings()
    try:
        rows = group_lags(settings, bootstrap_servers(settings),
                          group=group_id(group) if group else None)  # fmt: skip
    except UnknownGroup:
        console.print(f"[red]no consumer group {group_id(group or '')!r}[/] "
                      "(`streambill lag` lists every group)")  # fmt: skip
        raise typer.Exit(1) from None
    if json_out:
        from dataclasses import asdict

        sys.stdout.write(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        return
    table = Table("group", "topic", "partition", "committed", "end", "lag")
    for r in rows:
        table.add_row(r.group, r.topic, str(r.partition),
                      "-" if r.committed is None else f"{r.committed:,}", f"{r.end:,}",
                      f"{r.lag:,}")  # fmt: skip
    out.print(table)
    totals: dict[str, int] = {}
    for r in rows:
        totals[r.group] = totals.get(r.group, 0) + r.lag
    for g, total in sorted(totals.items(), key=lambda gt: (-gt[1], gt[0])):
        out.print(f"{g}: {total:,} behind")


SCALABLE = {  # processor -> its `streambill run` arguments
    "rating": ["rating"],
    "payments": ["payments"],
    "lane-priority": ["lane", "priority"],
    "lane-standard": ["lane", "standard"],
    "sink": ["sink"],
}


@app.command()
def scale(
    processor: str = typer.Argument(..., help=", ".join(SCALABLE)),
    workers: int = typer.Argument(..., min=1),
    seconds: float = typer.Option(
        0, "--for", help="stop the workers after this long (0: run until Ctrl-C / SIGTERM)"
    ),
) -> None:
    """Run N workers of a processor in one consumer group on this machine, showing each
    rebalance (which worker owns which partitions) as it happens."""
    import signal
    import time

    from streams.kafka import clients
    from streams.kafka.lag import group_members
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import group_id
    from streams.stack import ProcessorProcess, consumer_group

    if processor not in SCALABLE:
        raise typer.BadParameter(f"one of {', '.join(SCALABLE)}")
    settings = load_settings()
    if processor == "sink" and workers > 1 and settings.warehouse_dsn.startswith("chdb://"):
        raise typer.BadParameter("the embedded warehouse has one owner: scale the sink with "
                                 "a ClickHouse server (CLICKHOUSE_DSN=http://...)")  # fmt: skip
    bootstrap = bootstrap_servers(settings)
    argv, group = SCALABLE[processor], consumer_group(processor)
    # each rating worker claims a free worker index itself (streams/runtime/process.py):
    # indexes counted from 0 here would take those of workers already running
    procs = [ProcessorProcess(settings, bootstrap, *argv).start() for _ in range(workers)]
    console.print(f"{workers} x {processor} started (group {group_id(group)})")
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    admin = clients.admin(settings, bootstrap)
    last: dict[str, list[str]] = {}
    deadline = time.monotonic() + seconds if seconds else float("inf")
    try:
        while not stop[0] and time.monotonic() < deadline:
            try:
                members = group_members(admin, group_id(group))
            except Exception:  # the group does not exist yet
                members = {}
            if members and members != last:
                owned = sum(len(p) for p in members.values())
                console.print(f"rebalance: {len(members)} member(s), {owned} partitions")
                for client, parts in sorted(members.items()):
                    console.print(f"  {client}: {len(parts)} — {', '.join(parts)}",
                                  soft_wrap=True)  # fmt: skip
                last = members
            if not all(p.alive for p in procs):
                dead = next(p for p in procs if not p.alive)
                console.print(f"[red]a worker exited:[/]\n{dead.tail()}")
                raise typer.Exit(1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.stop()
        console.print(f"{processor}: {workers} worker(s) stopped")


@app.command()
def up(
    with_parts: str = typer.Option(
        "alerts,dashboard", "--with", help="optional parts: alerts, dashboard ('' for none)"
    ),
    api_port: int = typer.Option(8000, envvar="STREAMBILL_API_PORT", help="the API's port"),
    dashboard_port: int = typer.Option(8080, envvar="STREAMBILL_DASHBOARD_PORT"),
    timeout: float = typer.Option(120, help="seconds each stage may take to be healthy"),
) -> None:
    """Start the whole stack in the background, in order, each part healthy before the
    next: the local Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS is set), the sink (the
    warehouse), the gateway simulator (unless STREAMBILL_GATEWAY_URL or a real gateway is
    configured), rating, payments, both lanes, the API, then alerts and the dashboard.
    Logs go to $STREAMBILL_HOME/logs/, the processes to $STREAMBILL_HOME/stack.json."""
    from rich.table import Table

    from streams.stack import OPTIONAL_PARTS, StackError, start_stack

    chosen = {p.strip() for p in with_parts.split(",") if p.strip() and p.strip() != "none"}
    if unknown := sorted(chosen - set(OPTIONAL_PARTS)):
        raise typer.BadParameter(f"unknown {unknown}; optional parts: {', '.join(OPTIONAL_PARTS)}",
                                 param_hint="--with")  # fmt: skip
    settings = load_settings()
    try:
        with console.status("starting the stack (the broker first)") as progress:

            def say(line: str) -> None:
                console.print(f"[green]✓[/] {line}", soft_wrap=True)
                progress.update(f"starting the stack (after {line.split(':')[0]})")

            stack = start_stack(settings, chosen, api_port, dashboard_port, say, timeout)
    except StackError as exc:
        console.print(f"[red]the stack did not start:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table("process", "pid", "port", "url", title="streambill stack: running")
    for e in stack["processes"]:
        table.add_row(e["name"], str(e["pid"]), str(e["port"]), e["url"])
    out.print(table)
    out.print(f"logs: {settings.home / 'logs'}; `streambill status` shows the processes and "
              "their lag, `streambill down` stops them")  # fmt: skip


@app.command()
def down(
    timeout: float = typer.Option(30, help="seconds to wait for each process after SIGTERM"),
) -> None:
    """Stop the stack `up` started: SIGTERM to each process in reverse order (each finishes
    its batch and commits), SIGKILL to one still running after --timeout seconds; the
    local broker too if `up` started it."""
    from streams.stack import read_stack, stop_stack

    settings = load_settings()
    if read_stack(settings) is None:
        console.print(f"no stack recorded in {settings.home} (nothing to stop)")
        return
    stopped = stop_stack(settings, lambda line: console.print(f"[green]✓[/] {line}",
                                                              soft_wrap=True), timeout)  # fmt: skip
    console.print(f"stopped {len(stopped)} process(es)")


@app.command()
def status(
    json_out: bool = typer.Option(False, "--json", help="one JSON document"),
) -> None:
    """The stack `up` started: each process, whether it runs, its port and its consumer
    group's lag (records still to read). Exit status 1 if a process is not running."""
    from rich.table import Table

    from streams.stack import stack_status

    settings = load_settings()
    stack = stack_status(settings)
    if stack is None:
        if json_out:
            sys.stdout.write(json.dumps({"processes": []}) + "\n")
        console.print(f"no stack recorded in {settings.home} (`streambill up` starts one)")
        raise typer.Exit(1)
    if json_out:
        sys.stdout.write(json.dumps(stack, indent=2) + "\n")
    else:
        table = Table("process", "pid", "running", "port", "lag",
                      title=f"streambill stack (since {stack['started_at']})")  # fmt: skip
        for e in stack["processes"]:
            table.add_row(e["name"], str(e["pid"]),
                          "[green]yes[/]" if e["alive"] else "[red]no[/]", str(e["port"]),
                          "-" if e["lag"] is None else f"{e['lag']:,}")  # fmt: skip
        out.print(table)
        out.print(f"lag: records its consumer group still has to read (-: no group, or "
                  f"nothing committed yet); logs: {settings.home / 'logs'}")  # fmt: skip
    if not all(e["alive"] for e in stack["processes"]):
        raise typer.Exit(1)


def _run_deadline(text: str | None, settings: Any) -> datetime | None:
    """--deadline: an instant, or a time from now such as 5h; without it, the configured
    one (STREAMBILL_RUN_DEADLINE, a time from the run's issue), if any."""
    from datetime import timedelta

    from streams.domain.payments import parse_schedule

    text = text or settings.run_deadline or None
    if text is None:
        return None
    try:
        (within,) = parse_schedule(text)
    except ValueError:
        return _parse_ts(text)
    return datetime.now(UTC) + timedelta(seconds=within.total_seconds())


def _run_watch(kind: str, run: str, deadline: datetime | None) -> Any:
    """observe(done, total) -> the progress bar's text, with the run's rate, ETA and
    margin to its deadline also on this process's metrics endpoint (the alert rule
    run_deadline_at_risk reads the margin) and logged when the verdict changes."""
    import math

    import structlog

    from streams import metrics
    from streams.ops.deadline import Forecast

    log = structlog.get_logger("streams.run")
    metrics.serve(load_settings(), kind)
    forecast = Forecast(deadline)
    eta, margin = metrics.RUN_ETA.labels(kind, run), metrics.RUN_MARGIN.labels(kind, run)
    late: list[bool] = []

    def observe(done: int, total: int) -> str:
        estimate = forecast.observe(datetime.now(UTC), done, total)
        if estimate.eta_s is not None:
            eta.set(estimate.eta_s)
        if estimate.margin_s is not None:
            margin.set(estimate.margin_s)
            missing = estimate.margin_s < 0
            if late[-1:] != [missing]:
                late.append(missing)
                (log.warning if missing else log.info)(
                    "run will miss its deadline" if missing else "run on time for its deadline",
                    kind=kind, run=run, done=done, total=total,
                    deadline=deadline.isoformat() if deadline else None,
                    eta_s=None if not math.isfinite(estimate.eta_s or 0) else estimate.eta_s,
                    margin_s=estimate.margin_s if math.isfinite(estimate.margin_s) else None,
                )  # fmt: skip
        return estimate.describe()

    return observe


def _record_payment_run(settings: Any, payments: int, seconds: float) -> None:
    """The run's measured pace, for `streambill capacity`, with the workers it had."""
    from streams.kafka import clients
    from streams.kafka.lag import group_members
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import group_id
    from streams.ops.capacity import record_run
    from streams.processors.payments import GROUP

    if payments:
        admin = clients.admin(settings, bootstrap_servers(settings))
        workers = len(group_members(admin, group_id(GROUP)))
        record_run(settings, "payment-run", payments, seconds, max(workers, 1))


def _invoices_emitted(settings: Any) -> float | None:
    """Invoices the rating workers advertised on this host have emitted (their counter);
    None if none advertises its metrics here."""
    from streams.metrics import endpoints, scrape

    if not any(e["processor"] == "rating" for e in endpoints(settings)):
        return None
    return sum(s.value for s in scrape(settings, "rating") if s.name == "streambill_invoices_total")


def _record_bill_run(settings: Any, bootstrap: str, before: float | None, seconds: float) -> None:
    """The run's pace in invoices, for `streambill capacity --invoices`: what the rating
    workers emitted meanwhile (when they advertise their metrics on this host)."""
    from streams.kafka import clients
    from streams.kafka.lag import group_members
    from streams.kafka.topics import group_id
    from streams.ops.capacity import record_run
    from streams.processors.rating import GROUP

    after = _invoices_emitted(settings)
    if before is None or after is None or after <= before:
        return
    workers = len(group_members(clients.admin(settings, bootstrap), group_id(GROUP)))
    record_run(settings, "bill-run", int(after - before), seconds, max(workers, 1))


@app.command("payment-run")
def payment_run(
    until: str = typer.Option(..., help="collect every payment due at or before this instant"),
    wait: bool = typer.Option(True, help="wait until everything due has an outcome"),
    timeout: float = typer.Option(3600, help="seconds to wait at most"),
    deadline: str | None = typer.Option(
        None,
        help="when the run must be done: an instant, or a time from now (5h); default "
        "STREAMBILL_RUN_DEADLINE. ETA and margin shown, alerted on if at risk",
    ),
) -> None:
    """Collect now, in parallel, every payment due up to a date (dunning retries included)."""
    import time

    from streams.kafka.local import bootstrap_servers
    from streams.payments.progress import payment_run_progress
    from streams.publish import issue_payment_run
    from streams.ui import progress_bar

    settings = load_settings()
    at = _parse_ts(until)
    must_end = _run_deadline(deadline, settings)
    run_id = issue_payment_run(settings, bootstrap_servers(settings), at)
    console.print(f"payment run {run_id} issued (due up to {at.isoformat()})")
    if not wait:
        return
    watch = _run_watch("payment-run", run_id, must_end)
    started = time.monotonic()
    give_up = started + timeout
    with progress_bar(console) as progress:
        task = None
        while True:
            done, due = payment_run_progress(settings, at)
            if task is None:
                task = progress.add_task("payments with an outcome", total=due)
            progress.update(task, completed=done, total=due, eta=watch(done, due))
            if done >= due:
                _record_payment_run(settings, due, time.monotonic() - started)
                break
            if time.monotonic() > give_up:
                console.print("[red]timed out[/] (is the payments processor running?)")
                raise typer.Exit(1)
            time.sleep(0.5)


@app.command()
def reconcile(
    json_out: Path | None = typer.Option(None, "--json", help="write the report here"),
) -> None:
    """Compare the gateway ledger, billing.payment-results and ClickHouse."""
    from rich.table import Table

    from streams.domain.payments import parse_schedule
    from streams.kafka.local import bootstrap_servers
    from streams.payments.reconcile import collect
    from streams.payments.reconcile import reconcile as run

    settings = load_settings()
    # the dunning schedule the payments processor runs with (STREAMBILL_DUNNING)
    schedule = parse_schedule(settings.dunning)
    report = run(*collect(settings, bootstrap_servers(settings)), schedule=schedule)
    payload = report.to_json()
    _write_json(json_out, payload)
    table = Table(title="reconciliation")
    table.add_column("currency")
    for source in ("gateway", "results", "warehouse"):
        table.add_column(f"paid per {source}", justify="right")
    for currency, per in sorted(report.totals.items()):
        table.add_row(currency, *(str(per.get(s, 0)) for s in ("gateway", "results", "warehouse")))
    out.print(table)
    out.print(f"invoices: {payload['invoices']}  double charges: {report.double_charges}")
    for d in report.differences[:50]:
        out.print(f"[red]difference[/] {d}")
    if report.differences:
        out.print(f"[red]{len(report.differences)} differences[/]")
        raise typer.Exit(1)
    out.print("[green]reconciled[/]: every invoice is paid once for its amount due, open or "
              "uncollectible after every dunning attempt declined")  # fmt: skip


@app.command()
def chaos(
    short: bool = typer.Option(False, "--short", help="the CI form: small and quick"),
    json_out: Path | None = typer.Option(None, "--json", help="write the results here"),
    scenario: list[str] = typer.Option(
        None, "--scenario", help="run only these (repeatable); default: all"
    ),
    accounts: int | None = typer.Option(None, min=1, help="new subscriptions per scenario"),
    seed: int = typer.Option(7, help="decides the workload and which broker dies"),
) -> None:
    """Inject faults during a bill run and a payment run; check nothing was lost or doubled.

    Scenarios: SIGKILL of every processor several times, loss of one of three brokers,
    a warehouse outage, a complete gateway outage. Starts its own three-broker cluster
    unless KAFKA_BOOTSTRAP_SERVERS is set. Each fault waits for the work it is meant to
    hit and records the evidence that it landed. Exits 1 if any invariant is broken or
    any fault did not land."""
    from dataclasses import replace

    from streams.testbed.chaos import SCENARIOS, Plan, run_chaos

    chosen = list(scenario or SCENARIOS)
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        raise typer.BadParameter(
            f"unknown {unknown}; known: {list(SCENARIOS)}", param_hint="--scenario"
        )
    plan = Plan.short() if short else Plan.full()
    if accounts:
        plan = replace(plan, accounts=accounts)
    from streams.testbed.benchmarks_doc import provenance

    started = provenance()
    result = run_chaos(load_settings(), plan, chosen, seed, out)
    _write_json(json_out, {**result, "provenance": started})
    metrics = result["metrics"]
    # a fault that did not land proves nothing: the run fails as a broken promise does
    if not metrics["all_held"] or metrics["faults_effective"] < metrics["faults_injected"]:
        raise typer.Exit(1)


@app.command("bill-run")
def bill_run(
    until: str = typer.Option(..., help="close every period ending at or before this instant"),
    accounts: str | None = typer.Option(None, help="comma-separated account ids (default all)"),
    wait: bool = typer.Option(True, help="wait until every partition has completed the run"),
    timeout: float = typer.Option(3600, help="seconds to wait at most"),
    deadline: str | None = typer.Option(
        None,
        help="when the run must be done: an instant, or a time from now (5h); default "
        "STREAMBILL_RUN_DEADLINE. ETA and margin shown, alerted on if at risk",
    ),
) -> None:
    """Catch-up bill run: close now, in parallel across partitions, the chosen periods."""
    import time

    from streams.domain.validation import MAX_FUTURE, MAX_FUTURE_TEXT
    from streams.kafka.local import bootstrap_servers
    from streams.publish import bill_run_done, issue_bill_run
    from streams.ui import progress_bar

    when = _parse_ts(until)
    if when > datetime.now(UTC) + MAX_FUTURE:  # the rating processor would refuse it
        raise typer.BadParameter(
            f"more than {MAX_FUTURE_TEXT} ahead: periods close when they end, not before",
            param_hint="--until",
        )
    settings = load_settings()
    bootstrap = bootstrap_servers(settings)
    chosen = [a for a in accounts.split(",") if a] if accounts else None
    must_end = _run_deadline(deadline, settings)
    emitted_before = _invoices_emitted(settings)
    started = time.monotonic()
    offsets = issue_bill_run(settings, bootstrap, when, chosen)
    console.print(f"bill run issued to {len(offsets)} partitions")
    if not wait:
        return
    watch = _run_watch("bill-run", f"until {when.isoformat()}", must_end)
    give_up = time.monotonic() + timeout
    with progress_bar(console) as progress:
        task = progress.add_task("partitions done", total=len(offsets))
        while (done := bill_run_done(settings, bootstrap, offsets)) < len(offsets):
            progress.update(task, completed=done, eta=watch(done, len(offsets)))
            if time.monotonic() > give_up:
                console.print("[red]timed out[/] (is the rating processor running?)")
                raise typer.Exit(1)
            time.sleep(0.5)
        progress.update(task, completed=done, eta=watch(done, len(offsets)))
    _record_bill_run(settings, bootstrap, emitted_before, time.monotonic() - started)


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL; tables live in the streambill database"),
    fmt: Format = typer.Option(Format.table, "--format"),
) -> None:
    """Query the warehouse (through the running sink when it owns the embedded engine).
    Decimals print in plain notation at their column's scale, NULL as an empty csv field,
    `null` in json and NULL in the table; csv lines end with \\n, as ClickHouse's own."""
    from streams.warehouse import QueryError, WarehouseUnavailable, as_text
    from streams.warehouse import query as run

    try:
        result = run(load_settings(), sql)
    except (QueryError, WarehouseUnavailable) as exc:
        sys.stderr.write(f"query failed: {exc}\n")  # one line, whatever the width
        raise typer.Exit(1) from None
    if fmt is Format.json:
        rows = [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]
        out.print_json(json.dumps(rows, default=as_text))
    elif fmt is Format.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(result["columns"])
        writer.writerows([as_text(v) for v in row] for row in result["rows"])
    else:
        from rich.table import Column, Table

        # long values fold onto more lines; nothing is cut short
        table = Table(*(Column(c, overflow="fold") for c in result["columns"]))
        for row in result["rows"]:
            table.add_row(*("NULL" if v is None else as_text(v) for v in row))
        out.print(table)


class Bucket(StrEnum):
    hour = "hour"
    day = "day"


@app.command()
def calendar(
    days: int = typer.Option(60, min=1, max=731, help="how far ahead"),
    by: Bucket = typer.Option(Bucket.day, "--by"),
    json_out: Path | None = typer.Option(None, "--json", help="write the rows here"),
) -> None:
    """The load calendar: invoices the current subscriptions will be issued and payments
    that will fall due (their first attempts and the dunning retries scheduled), per hour
    or day and currency, for the coming days: the peaks to plan capacity for."""
    from rich.table import Table

    from streams.payments.progress import calendar_sql
    from streams.warehouse import QueryError, WarehouseUnavailable, as_text
    from streams.warehouse import query as run

    settings = load_settings()
    try:
        rows = run(settings, calendar_sql(settings, days, by.value))["rows"]
    except (QueryError, WarehouseUnavailable) as exc:
        sys.stderr.write(f"query failed: {exc}\n")
        raise typer.Exit(1) from None
    from decimal import Decimal

    from streams.domain.money import format_money

    names = ("bucket", "currency", "invoices", "recurring_amount", "payments", "retries")
    entries = [
        {"bucket": str(bucket)[: 10 if by is Bucket.day else 16], "currency": currency,
         "invoices": int(n), "recurring_amount": format_money(Decimal(as_text(amount)), currency),
         "payments": int(payments), "retries": int(retries)}
        for bucket, currency, n, amount, payments, retries in rows
    ]  # fmt: skip
    _write_json(json_out, {"days": days, "by": by.value, "rows": entries})
    table = Table(title=f"load calendar: the next {days} days, per {by.value}")
    for name, justify in zip(names, ("left", "left", "right", "right", "right", "right"),
                             strict=True):  # fmt: skip
        table.add_column(name.replace("_", " "), justify=justify)  # type: ignore[arg-type]
    for e in entries:
        table.add_row(*(str(e[n]) for n in names))
    out.print(table)
    if entries:
        peak = max(entries, key=lambda e: e["invoices"] + e["payments"])
        out.print(f"peak: {peak['bucket']} {peak['currency']}: {peak['invoices']} invoices, "
                  f"{peak['payments']} payments ({peak['retries']} of them dunning "
                  "retries)")  # fmt: skip


@app.command()
def capacity(
    payments: int | None = typer.Option(None, min=1, help="payments to collect"),
    invoices: int | None = typer.Option(None, min=1, help="invoices to issue (a bill run)"),
    signups: int | None = typer.Option(None, min=1, help="signups through the API"),
    per_second: float | None = typer.Option(None, min=0.001, help="signups: their arrival rate"),
    tenant: str | None = typer.Option(None, help="signups: the API tenant (its rate limit)"),
    window: str = typer.Option("5h", help="the time the work must fit in (s, m, h, d)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the answer here"),
) -> None:
    """Can this work fit its window? From the rates measured here (the latest recorded
    run, else the benchmarks): the time it takes with today's workers, the workers (and
    partitions, hosts, gateway concurrency) it needs, and the bound that limits it."""
    from streams.domain.payments import parse_schedule
    from streams.kafka.lag import group_members
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import INVOICES, SUBSCRIPTIONS, group_id
    from streams.ops.capacity import answer, host_cores, latest_measurement

    asked = {k: v for k, v in (("payments", payments), ("invoices", invoices),
                               ("signups", signups)) if v}  # fmt: skip
    if len(asked) != 1:
        raise typer.BadParameter("give exactly one of --payments, --invoices, --signups")
    ((kind, items),) = asked.items()
    try:
        window_s = parse_schedule(window)[0].total_seconds()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--window") from None
    if kind == "signups" and per_second:
        window_s = items / per_second  # they arrive at that rate: the API must keep up
    settings = load_settings()
    measured = latest_measurement(settings, kind)
    if measured is None:
        console.print(f"[red]no measured rate for {kind}: run it once, or a benchmark[/]")
        raise typer.Exit(1)
    partitions, workers_now = 10**6, measured.workers  # the API: processes, not partitions
    if kind != "signups":
        from streams.kafka import clients

        bootstrap = bootstrap_servers(settings)
        admin = clients.admin(settings, bootstrap)
        topic = INVOICES.name if kind == "payments" else SUBSCRIPTIONS.name
        # (topics not created yet: as many partitions as they will be created with)
        found = admin.list_topics(topic, timeout=10).topics[topic].partitions
        partitions = len(found) or settings.partitions
        group = group_id("streambill-payments" if kind == "payments" else "streambill-rating")
        workers_now = len(group_members(admin, group))
    if workers_now == 0:
        out.print("no worker runs now: counted as one")
        workers_now = 1
    api_limit = None
    if tenant:
        from streams.api.server import tenants_path
        from streams.api.tenants import load

        known = load(tenants_path(settings))
        if tenant not in known:
            raise typer.BadParameter(f"no tenant {tenant!r}", param_hint="--tenant")
        api_limit = known[tenant].rate_per_s
    result = answer(measured, items, window_s, workers_now, partitions, host_cores(), api_limit)
    _write_json(json_out, result.to_json())
    verdict = "[green]fits[/]" if result.fits_now else "[red]does not fit[/]"
    from streams.ops.deadline import duration

    out.print(f"{items:,} {kind} in {duration(window_s)}: {verdict} with today's "
              f"{workers_now} worker(s): {duration(result.seconds_now)} at "
              f"{result.rate_now_per_s:,.1f}/s")  # fmt: skip
    out.print(f"measured: {measured.per_worker_per_s:,.1f}/s per worker ({measured.source})")
    out.print(f"to fit: {result.needed_per_s:,.1f}/s, {result.workers_needed} worker(s); "
              f"bound: {result.bound}: {result.advice}")  # fmt: skip


class DocumentFormat(StrEnum):
    html = "html"
    pdf = "pdf"


@invoice_app.command("render")
def invoice_render(
    invoice_id: str = typer.Argument(..., help="the invoice's id"),
    fmt: DocumentFormat = typer.Option(DocumentFormat.html, "--format"),
    out_file: Path | None = typer.Option(
        None, "--out", help="the file to write (default: HTML to stdout, PDF to ID.pdf)"
    ),
    catalog: Path = _catalog_option(),
) -> None:
    """An invoice's document, as the warehouse holds the invoice and its customer: issuer,
    customer, lines with their periods, discount, tax per rate, credit, amount due."""
    from streams.api import reads
    from streams.documents import Issuer, invoice_document, render
    from streams.domain.catalog import Catalog
    from streams.warehouse import QueryError, WarehouseUnavailable
    from streams.warehouse import query as run

    if not reads.ID_PATTERN.fullmatch(invoice_id):
        raise typer.BadParameter("an invoice id: letters, digits and ._:@-")
    settings = load_settings()
    try:
        head, lines = (run(settings, sql)["rows"] for sql in reads.invoice_sql(invoice_id))
        if not head:
            console.print(f"[red]no invoice {invoice_id!r} in the warehouse[/]")
            raise typer.Exit(1)
        invoice = reads.invoice_from_rows(head[0], lines)
        rows = run(settings, reads.customer_sql(invoice.account_id))["rows"]
    except (QueryError, WarehouseUnavailable) as exc:
        sys.stderr.write(f"query failed: {exc}\n")
        raise typer.Exit(1) from None
    customer = reads.customer_record(invoice.account_id, rows[0]) if rows else None
    tax_rates = dict(Catalog.from_dict(json.loads(catalog.read_text())).tax_rates)
    body = render(invoice_document(invoice, customer, Issuer.from_settings(settings), tax_rates),
                  fmt.value)  # fmt: skip
    if out_file is None and fmt is DocumentFormat.html:
        sys.stdout.write(body.decode())
        return
    target = out_file or Path(f"{invoice_id}.{fmt.value}")
    target.write_bytes(body)
    console.print(f"wrote {target} ({len(body):,} bytes)")


@kafka_app.command("start")
def kafka_start(brokers: int = typer.Option(1, help="1, or 3 for replication tests")) -> None:
    """Start the local cluster (downloads the Kafka jars once) and print its bootstrap."""
    from streams.kafka.local import start_local_kafka

    out.print(start_local_kafka(brokers))


@kafka_app.command("stop")
def kafka_stop() -> None:
    """Stop the local cluster."""
    from streams.kafka.local import stop_local_kafka

    stop_local_kafka()


@kafka_app.command("status")
def kafka_status() -> None:
    from streams.kafka.local import KAFKA_SH

    subprocess.run([str(KAFKA_SH), "status"], check=False)


@app.command()
def topics(
    partitions: int | None = typer.Option(None, min=1, help="grow every topic to N partitions"),
    force: bool = typer.Option(False, help="grow even though the topics hold data"),
) -> None:
    """Create the declared topics (idempotent) and describe them; --partitions N adds
    partitions (Kafka never removes any)."""
    import dataclasses

    from rich.table import Table

    from streams.kafka import clients
    from streams.kafka.local import bootstrap_servers
    from streams.kafka.topics import ALL_TOPICS, SUBSCRIPTIONS, ensure_topics

    settings = load_settings()
    bootstrap = bootstrap_servers(settings)
    admin = clients.admin(settings, bootstrap)
    if partitions is not None:
        meta = admin.list_topics(timeout=30).topics
        subs = meta.get(SUBSCRIPTIONS.name)
        if subs is not None and not force and _holds_data(settings, bootstrap, subs):
            # keys hash to partitions: more partitions move accounts to partitions whose
            # rating state (RocksDB per partition) does not have them
            console.print("[red]the topics hold data:[/] adding partitions moves accounts to "
                          "other partitions, away from their rating state. Drain and rebuild "
                          "the rating state afterwards (replay from the topics), then run "
                          "again with --force.")  # fmt: skip
            raise typer.Exit(2)
        settings = dataclasses.replace(settings, partitions=partitions)
    created = ensure_topics(admin, settings)
    meta = admin.list_topics(timeout=30).topics
    table = Table("topic", "partitions", "replicas", "schema", "created now")
    for t in ALL_TOPICS:
        parts = meta[t.name].partitions
        replicas = len(next(iter(parts.values())).replicas) if parts else 0
        table.add_row(t.name, str(len(parts)), str(replicas), t.schema or "-",
                      "yes" if t.name in created else "")  # fmt: skip
    out.print(table)


def _holds_data(settings: Any, bootstrap: str, meta: Any) -> bool:
    from confluent_kafka import TopicPartition

    from streams.kafka import clients

    probe = clients.consumer(settings, bootstrap, "streambill-topics-probe")
    try:  # retried: a topic just created may have no leader yet (NOT_LEADER_FOR_PARTITION)
        return any(clients.retrying(lambda p=p: probe.get_watermark_offsets(
                       TopicPartition(meta.topic, p), timeout=10))[1] > 0
                   for p in meta.partitions)  # fmt: skip
    finally:
        probe.close()


def _run_bench(scenario: str, params: dict, runs: int, json_out: Path | None, once) -> None:
    """Run a scenario `runs` times; print every run's figures and write their aggregate
    (correctness as the worst run, performance as the median) and the runs."""
    import signal

    from streams.testbed.bench.harness import aggregate_runs, runs_table
    from streams.testbed.benchmarks_doc import provenance

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    # `kill PID` cleans up as Ctrl-C does (its processes stopped, its namespace deleted):
    # a bench started in the background from a script ignores SIGINT
    signal.signal(signal.SIGTERM, interrupted)
    started = provenance()
    results = []
    for i in range(runs):
        console.print(f"[bold]{scenario}[/] run {i + 1}/{runs}")
        results.append(once())
    metrics = aggregate_runs(results)
    out.print(runs_table(scenario, results, metrics))
    payload = {"scenario": scenario, "params": {**params, "runs": runs}, "metrics": metrics}
    payload["provenance"] = started
    if runs > 1:
        payload["runs"] = results
    _write_json(json_out, payload)


@bench_app.command("kafka")
def bench_kafka(
    messages: int = typer.Option(1_000_000, min=1),
    runs: int = typer.Option(1, min=1),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """Raw Kafka produce + consume of usage-sized Avro records (the ceiling)."""
    from streams.testbed.bench.kafka import run

    s = load_settings()
    _run_bench("kafka", {"messages": messages}, runs, json_out, lambda: run(s, messages, console))


@bench_app.command("usage")
def bench_usage(
    events: int = typer.Option(1_000_000, min=10),
    workers: int = typer.Option(2, min=1, help="rating processes in the consumer group"),
    runs: int = typer.Option(1, min=1),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """Usage events ingested and aggregated by the rating processor."""
    from streams.testbed.bench.usage import run

    s = load_settings()
    params = {"events": events, "workers": workers}
    _run_bench("usage", params, runs, json_out, lambda: run(s, events, workers, console))


@bench_app.command("peers")
def bench_peers(
    events: int = typer.Option(1_000_000, min=10),
    workers: int = typer.Option(2, min=1, help="rating processes in the consumer group"),
    peer_workers: int = typer.Option(1, min=1, help="processes of each peer, in one group"),
    rounds: int = typer.Option(3, min=1, help="each contender once a round, order rotated"),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """The usage job of `bench usage` run by streambill, faust-streaming and Quix Streams
    (each peer in a venv of its own), alternated, with raw Kafka as the ceiling."""
    from streams.testbed.bench.peers import Rounds

    s = load_settings()
    # makes the peers' venvs if missing, and the input
    each_round = Rounds(s, events, workers, peer_workers, console)
    params = {"events": events, "workers": workers, "peer_workers": peer_workers,
              "rounds": rounds, **each_round.versions}  # fmt: skip
    _run_bench("peers", params, rounds, json_out, each_round)


@bench_app.command("billrun")
def bench_billrun(
    subscriptions: int = typer.Option(100_000, min=1),
    workers: int = typer.Option(2, min=1, help="rating processes in the consumer group"),
    usage_per_subscription: int = typer.Option(10, min=0),
    unique_count_every: int = typer.Option(
        0,
        min=0,
        help="every k-th subscription on a plan with a unique_count charge, its usage "
        "naming users (needs STREAMBILL_RATING_CONTRACT=2; 3: a third of them)",
    ),
    runs: int = typer.Option(1, min=1),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """N subscriptions whose periods all end at one instant: time to invoice them all."""
    from streams.testbed.bench.billrun import run

    s = load_settings()
    if unique_count_every and s.rating_contract != 2:
        console.print("[red]--unique-count-every needs STREAMBILL_RATING_CONTRACT=2[/]")
        raise typer.Exit(2)
    params = {"subscriptions": subscriptions, "workers": workers,
              "usage_per_subscription": usage_per_subscription,
              "unique_count_every": unique_count_every,
              "rating_contract": s.rating_contract}  # fmt: skip
    _run_bench("billrun", params, runs, json_out,
               lambda: run(s, subscriptions, workers, usage_per_subscription, console,
                           unique_count_every))  # fmt: skip


@bench_app.command("sink")
def bench_sink(
    rows: int = typer.Option(1_000_000, min=1, help="invoice-line rows to land"),
    lines_per_invoice: int = typer.Option(5, min=1),
    runs: int = typer.Option(1, min=1),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """Invoice lines landed into the embedded warehouse by the sink."""
    from streams.testbed.bench.sink import run

    s = load_settings()
    params = {"rows": rows, "lines_per_invoice": lines_per_invoice}
    _run_bench("sink", params, runs, json_out, lambda: run(s, rows, lines_per_invoice, console))


@bench_app.command("payment-run")
def bench_payment_run(
    payments: int = typer.Option(150_000, min=1),
    workers: int = typer.Option(1, min=1, help="payments processes in the consumer group"),
    decline_rate: float = typer.Option(0.05, min=0, max=1),
    transient_rate: float = typer.Option(0.01, min=0, max=1),
    runs: int = typer.Option(1, min=1),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """Due invoices collected through the gateway simulator (4 merchant accounts)."""
    from streams.testbed.bench.payment_run import run

    s = load_settings()
    params = {"payments": payments, "workers": workers, "decline_rate": decline_rate,
              "transient_rate": transient_rate}  # fmt: skip
    _run_bench("payment-run", params, runs, json_out,
               lambda: run(s, payments, workers, decline_rate, transient_rate,
                           console))  # fmt: skip


@bench_app.command("signup-spike")
def bench_signup_spike(
    signups: int = typer.Option(250_000, min=1),
    clients: int = typer.Option(256, min=1, help="concurrent keep-alive clients"),
    workers: int = typer.Option(2, min=1, help="API worker processes"),
    max_concurrency: int = typer.Option(512, min=1, help="the tenant's concurrency limit"),
    rate: float = typer.Option(10_000, min=1, help="the tenant's requests/s limit"),
    runs: int = typer.Option(1, min=1),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """A launch-weekend signup spike through the ingestion API: clients that honour
    Retry-After; every accepted signup checked in Kafka and ClickHouse."""
    from streams.testbed.bench.signup_spike import run

    s = load_settings()
    params = {"signups": signups, "clients": clients, "workers": workers,
              "max_concurrency": max_concurrency, "rate": rate}  # fmt: skip
    _run_bench("signup-spike", params, runs, json_out,
               lambda: run(s, signups, clients, workers, max_concurrency, rate,
                           console))  # fmt: skip


@bench_app.command("refund-latency")
def bench_refund_latency(
    seconds: float = typer.Option(60, min=1, help="length of each phase"),
    payments: int = typer.Option(150_000, min=0, help="the bulk payment run"),
    subscriptions: int = typer.Option(1_000_000, min=0, help="the bulk bill run"),
    runs: int = typer.Option(1, min=1),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """Refund latency (request produced -> result and entitlement on Kafka), without and
    with a bulk payment run and bill run in flight."""
    from streams.testbed.bench.refund_latency import run

    s = load_settings()
    params = {"seconds": seconds, "payments": payments, "subscriptions": subscriptions,
              "every_ms": 50}  # fmt: skip
    _run_bench("refund-latency", params, runs, json_out,
               lambda: run(s, seconds, payments, subscriptions, console))  # fmt: skip


@bench_app.command("report")
def bench_report(
    check: bool = typer.Option(False, "--check", help="only say whether the pages are current"),
) -> None:
    """Render docs/benchmarks.md and the README's figures table from docs/benchmarks/*.json."""
    from streams.testbed.benchmarks_doc import stale_pages, write_pages

    if not check:
        write_pages()
        return
    stale = stale_pages()
    for page in stale:
        console.print(f"[red]not generated from docs/benchmarks/*.json:[/] {page}")
    if stale:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
