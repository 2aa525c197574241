"""`streambill gateway ...`: the payment-gateway simulator (for tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import typer

from streams.logging import fatal_errors_as_json

gateway_app = typer.Typer(
    help="The payment-gateway simulator: a load-test gateway for tests and benchmarks "
    "(not a real gateway).",
    no_args_is_help=True,
)


@gateway_app.command("serve")
@fatal_errors_as_json
def serve(
    config: Path | None = typer.Option(
        None,
        "--config",
        exists=True,
        dir_okay=False,
        help='JSON: {"seed": 0, "accounts": {"merchant-1": {"max_concurrency": 250, ...}}}',
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(18080, "--port", min=0, max=65535, help="0 picks a free port"),
    ready_file: Path | None = typer.Option(
        None, "--ready-file", help='written with {"url", "pid"} once listening'
    ),
    accounts: int = typer.Option(
        4, "--accounts", min=1, help="merchant-1..N (when no --config is given)"
    ),
    max_concurrency: int | None = typer.Option(None, "--max-concurrency", min=1),
    latency_median_ms: float | None = typer.Option(None, "--latency-median-ms", min=0),
    latency_p99_ms: float | None = typer.Option(
        None, "--latency-p99-ms", min=0, help="default: 4 x --latency-median-ms when that is given"
    ),
    decline_rate: float | None = typer.Option(None, "--decline-rate", min=0, max=1),
    transient_rate: float | None = typer.Option(None, "--transient-rate", min=0, max=1),
    rpm_limit: int | None = typer.Option(None, "--rpm-limit", min=1),
    seed: int | None = typer.Option(None, "--seed"),
) -> None:
    """Serve the simulator until SIGTERM. The per-account options, when given, override
    the value for every account (of --config too)."""
    from dataclasses import replace

    from streams.testbed.gateway_simulator import SimulatorConfig, default_accounts, run_server

    if latency_median_ms is not None and latency_p99_ms is None:
        latency_p99_ms = 4 * latency_median_ms  # the default shape (250 ms / 1000 ms)
    overrides = {
        name: value
        for name, value in (
            ("max_concurrency", max_concurrency),
            ("latency_median_ms", latency_median_ms),
            ("latency_p99_ms", latency_p99_ms),
            ("decline_rate", decline_rate),
            ("transient_rate", transient_rate),
            ("rpm_limit", rpm_limit),
        )
        if value is not None
    }
    try:
        cfg = (
            SimulatorConfig.from_json_file(config)
            if config
            else SimulatorConfig(accounts=default_accounts(accounts))
        )
        if seed is not None:
            cfg = replace(cfg, seed=seed)
        cfg = cfg.with_overrides(**overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    run_server(cfg, host, port, ready_file)
