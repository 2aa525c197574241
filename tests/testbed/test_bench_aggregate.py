"""Several runs of a benchmark in one set of figures: a bad run is never hidden by a
median (correctness figures are the worst run's), performance figures are medians, and
every run's figures are printed."""

from __future__ import annotations

from rich.console import Console

from streams.testbed.bench.harness import aggregate_runs, runs_table


def payment_run(double_charges: int, reconciled: bool, per_min: int) -> dict:
    return {
        "payments": 1500,
        "payments_per_min": per_min,
        "double_charges": double_charges,
        "reconciled": reconciled,
        "differences": double_charges,
        "first_attempt_outcomes": {"succeeded": 1400 + double_charges, "declined": 100},
        "simulator": {"rejected_429": per_min // 1000, "gc": {"collections": [3, 1, 0]}},
    }


def test_one_bad_run_among_good_ones_shows_in_the_aggregate() -> None:
    runs = [payment_run(0, True, 9000), payment_run(3, False, 7000), payment_run(0, True, 8000)]
    got = aggregate_runs(runs)
    assert got["double_charges"] == 3 and got["differences"] == 3
    assert got["reconciled"] is False
    # performance figures: the median, nested ones too
    assert got["payments_per_min"] == 8000 and got["payments"] == 1500
    assert got["simulator"]["rejected_429"] == 8
    assert got["first_attempt_outcomes"] == {"succeeded": 1400, "declined": 100}
    assert got["simulator"]["gc"] == {"collections": [3, 1, 0]}  # a list: the first run's


def test_every_count_of_broken_promises_is_the_worst_run() -> None:
    names = ["lost", "lost_kafka", "lost_warehouse", "duplicates", "duplicates_in_kafka",
             "doubled", "dead_letters", "errors_5xx", "timeouts", "connection_errors",
             "gave_up"]  # fmt: skip
    runs = [{n: 0 for n in names}, {n: 2 for n in names}, {n: 0 for n in names}]
    runs[1]["busy"] = {"lost": 5, "p99_ms": 10.0}  # a phase of the refund bench
    runs[0]["busy"] = {"lost": 0, "p99_ms": 30.0}
    runs[2]["busy"] = {"lost": 0, "p99_ms": 20.0}
    got = aggregate_runs(runs)
    assert {n: got[n] for n in names} == {n: 2 for n in names}
    assert got["busy"] == {"lost": 5, "p99_ms": 20.0}
    # a promise that must be true in every run: the bulk load was still in flight
    flights = [{"in_flight": {"bill_run": v}} for v in (True, True, False)]
    assert aggregate_runs(flights) == {"in_flight": {"bill_run": False}}


def test_every_runs_figures_are_printed() -> None:
    runs = [payment_run(0, True, 9000), payment_run(3, False, 7000), payment_run(0, True, 8000)]
    console = Console(width=200, record=True)
    console.print(runs_table("payment-run", runs, aggregate_runs(runs)))
    text = console.export_text()
    for figure in ("run 1", "run 2", "run 3", "9000", "7000", "8000", "3 (worst)",
                   "False (worst)", "8000 (median)", "simulator.rejected_429"):  # fmt: skip
        assert figure in text, figure
    row = next(line for line in text.splitlines() if "double_charges" in line)
    assert [cell.strip() for cell in row.split("│")[2:6]] == ["0", "3", "0", "3 (worst)"], row
