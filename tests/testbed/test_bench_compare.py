"""`scripts/bench-compare BASE HEAD`: the order of the runs (a warm-up on head, then
rounds alternating which side goes first), the medians, ratios and spreads on canned
figures (a figure one side lacks is reported, a failed run fails the comparison), which
way each figure is better, an unknown revision refused, the worktrees always removed,
and one small comparison end to end on the real broker (marked kafka)."""

from __future__ import annotations

import json
import os
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from streams.config import REPO_ROOT
from streams.testbed.bench.compare import (
    DEFAULT_SCENARIOS,
    BenchRunner,
    Outcome,
    Run,
    compare,
    direction,
    execute,
    failures,
    numeric_figures,
    parse_args,
    plan,
    report,
    resolve,
    row,
    tables,
    worktrees,
)

SCRIPT = REPO_ROOT / "scripts" / "bench-compare"


def canned(figures: dict[tuple[int, str], dict[str, float]], failing: set[tuple[int, str]]):
    """A runner that answers each (round, side) with its figures, or fails it; it records
    every run it was given, in order."""
    seen: list[Run] = []

    def runner(run: Run) -> Outcome:
        seen.append(run)
        if (run.round, run.side) in failing:
            return Outcome(error="exit 1; Traceback: boom")
        return Outcome(figures=figures.get((run.round, run.side), {}))

    return runner, seen


def rendered(comparison: dict) -> str:
    console = Console(file=StringIO(), width=200)
    for table in tables(comparison, "a" * 40, "b" * 40, 3):
        console.print(table)
    return console.file.getvalue()


def worktree_paths() -> set[str]:
    listing = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {line.split(" ", 1)[1] for line in listing.splitlines() if line.startswith("worktree ")}


def test_a_warm_up_on_head_then_rounds_that_alternate_which_side_goes_first() -> None:
    assert plan(["usage", "sink"], 3) == [
        Run(0, "head", "usage"), Run(0, "head", "sink"),
        Run(1, "base", "usage"), Run(1, "head", "usage"),
        Run(1, "base", "sink"), Run(1, "head", "sink"),
        Run(2, "head", "usage"), Run(2, "base", "usage"),
        Run(2, "head", "sink"), Run(2, "base", "sink"),
        Run(3, "base", "usage"), Run(3, "head", "usage"),
        Run(3, "base", "sink"), Run(3, "head", "sink"),
    ]  # fmt: skip


def test_medians_their_ratio_and_the_spread_of_the_rounds_ratios() -> None:
    base = [100, 110, 90]
    head = [120, 99, 108]
    figures = {(r, side): {"events_per_s": values[r - 1], "seconds": 10.0}
               for side, values in (("base", base), ("head", head)) for r in (1, 2, 3)}  # fmt: skip
    figures[0, "head"] = {"events_per_s": 1}  # the warm-up: never counted
    runner, seen = canned(figures, set())
    outcomes = execute(plan(["usage"], 3), runner)
    assert len(seen) == 7
    got = report("a" * 40, "b" * 40, 3, compare(outcomes, ["usage"], 3), failures(outcomes))
    assert got["rounds"] == 3 and got["warmup"] is True and got["failures"] == []
    rate = got["scenarios"]["usage"]["events_per_s"]
    assert rate["base"] == base and rate["head"] == head
    assert rate["base_median"] == 100 and rate["head_median"] == 108
    assert rate["ratio"] == pytest.approx(1.08)  # head / base
    # per round: 120/100, 99/110, 108/90
    assert rate["ratio_min"] == pytest.approx(0.9) and rate["ratio_max"] == pytest.approx(1.2)
    assert rate["better"] == "higher"
    assert got["scenarios"]["usage"]["seconds"]["ratio"] == 1.0
    json.dumps(got)  # what --json writes


def test_a_figure_only_one_side_reports_is_shown_not_a_crash() -> None:
    figures = {(r, side): {"seconds": 2.0, ("new_ms" if side == "head" else "old_mb"): 5.0}
               for r in (1, 2) for side in ("base", "head")}  # fmt: skip
    runner, _ = canned(figures, set())
    comparison = compare(execute(plan(["x"], 2), runner), ["x"], 2)
    new, old = comparison["x"]["new_ms"], comparison["x"]["old_mb"]
    assert new.base == [None, None] and new.head_median == 5.0 and new.ratio is None
    assert row("new_ms", new) == ["new_ms", "-", "5", "only in head", "-", "lower"]
    assert row("old_mb", old)[3] == "only in base"
    assert old.as_json("old_mb")["ratio_min"] is None
    text = rendered(comparison)
    assert "only in head" in text and "only in base" in text


def test_a_failed_run_is_left_out_of_the_figures_and_fails_the_comparison() -> None:
    figures = {
        (r, side): {"rows_per_s": 100 * r} for r in (0, 1, 2, 3) for side in ("base", "head")
    }
    runner, seen = canned(figures, failing={(2, "base")})
    outcomes = execute(plan(["sink"], 3), runner)
    assert len(seen) == 7  # the runs after the failed one went on
    failed = failures(outcomes)
    assert [run for run, _ in failed] == [Run(2, "base", "sink")]
    assert "boom" in failed[0][1]
    rate = compare(outcomes, ["sink"], 3)["sink"]["rows_per_s"]
    assert rate.base == [100, None, 300] and rate.head == [100, 200, 300]
    assert rate.round_ratios == [1.0, 1.0]  # round 2 has nothing to pair
    assert rate.base_median == 200 and rate.head_median == 200


def test_a_base_of_zero_gives_no_ratio() -> None:
    figures = {(1, side): {"duplicates": 0 if side == "base" else 3} for side in ("base", "head")}
    runner, _ = canned(figures, set())
    dup = compare(execute(plan(["b"], 1), runner), ["b"], 1)["b"]["duplicates"]
    assert dup.ratio is None and dup.round_ratios == []
    assert row("duplicates", dup)[1:] == ["0", "3", "-", "-", "lower"]


def test_only_numbers_are_figures_nested_ones_by_dotted_name() -> None:
    metrics = {
        "payments_per_min": 170671, "reconciled": True, "ceiling_ratio": 0.849,
        "simulator": {"rejected_429": 0, "gc": {"collections": [3, 1], "max_pause_ms": 5.5}},
        "note": "text",
    }  # fmt: skip
    assert numeric_figures(metrics) == {
        "payments_per_min": 170671, "ceiling_ratio": 0.849, "simulator.rejected_429": 0,
        "simulator.gc.max_pause_ms": 5.5,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "better"),
    [
        ("events_per_s", "higher"), ("payments_per_min", "higher"), ("ceiling_ratio", "higher"),
        ("msgs_per_s", "higher"), ("seconds", "lower"), ("produce_s", "lower"),
        ("p99_ms", "lower"), ("busy.lane_stages.gateway_p99_ms", "lower"),
        ("peak_rss_mb", "lower"), ("duplicates", "lower"), ("lost", "lower"),
        ("lost_kafka", "lower"), ("dead_letters", "lower"), ("invoices", ""), ("workers", ""),
    ],
)  # fmt: skip
def test_which_way_a_figure_is_better_comes_from_its_name(name: str, better: str) -> None:
    assert direction(name) == better


def test_the_command_line_and_its_defaults() -> None:
    options = parse_args(["main~1", "main"])
    assert (options.base, options.head, options.rounds) == ("main~1", "main", 3)
    assert options.scenarios == DEFAULT_SCENARIOS and options.json_out is None
    options = parse_args(["a", "b", "--rounds", "1", "--scenario", "kafka  --messages 5",
                          "--scenario", "sink", "--json", "o.json"])  # fmt: skip
    assert options.scenarios == ("kafka --messages 5", "sink")
    assert options.rounds == 1 and options.json_out == Path("o.json")
    for bad in (["a", "b", "--scenario", "sink --json x"], ["a", "b", "--rounds", "0"], ["a"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2


def test_the_worktrees_are_removed_after_an_error(tmp_path: Path) -> None:
    head = resolve("HEAD")
    with pytest.raises(RuntimeError, match="during"), worktrees([head, head], tmp_path) as trees:
        assert list(trees) == [head]  # one worktree per commit
        assert (trees[head] / "streams" / "cli.py").exists()
        assert str(trees[head]) in worktree_paths()
        raise RuntimeError("during the runs")
    assert not (tmp_path / head[:12]).exists()
    assert not any(p.startswith(str(tmp_path)) for p in worktree_paths())


def test_a_run_that_exits_non_zero_fails_with_its_stderr(tmp_path: Path) -> None:
    runner = BenchRunner({"base": REPO_ROOT, "head": REPO_ROOT},
                         {"base": tmp_path / "b", "head": tmp_path / "h"}, tmp_path,
                         "127.0.0.1:1")  # fmt: skip
    outcome = runner(Run(1, "base", "no-such-scenario"))
    assert outcome.figures == {} and outcome.error is not None
    assert outcome.error.startswith("exit 2") and "No such command" in outcome.error


def test_a_run_that_exits_0_without_its_json_fails(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "streams").mkdir(parents=True)
    (tree / "streams" / "__init__.py").write_text("")
    (tree / "streams" / "cli.py").write_text("print('a bench that forgot its --json')\n")
    runner = BenchRunner({"base": tree, "head": tree}, {"base": tmp_path, "head": tmp_path},
                         tmp_path, "127.0.0.1:1")  # fmt: skip
    outcome = runner(Run(0, "head", "usage --events 10"))
    assert outcome.error is not None and outcome.error.startswith("no figures in")
    assert (tmp_path / "0-head-usage-events-10.out").read_text().startswith("a bench that")


def test_an_unknown_revision_is_refused_before_any_worktree(tmp_path: Path) -> None:
    before = worktree_paths()
    env = {**os.environ, "STREAMBILL_HOME": str(tmp_path / "home")}
    done = subprocess.run([str(SCRIPT), "no-such-revision-x", "HEAD"], capture_output=True,
                          text=True, env=env, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "unknown revision 'no-such-revision-x'" in done.stderr
    assert worktree_paths() == before
    assert not (tmp_path / "home" / "bench" / "compare").exists()


def test_the_script_fails_after_all_runs_when_one_failed(tmp_path: Path) -> None:
    """Every run of an unknown scenario fails at once (no broker is asked: its address is
    only passed on); the comparison exits 1 with their stderr, and still writes its JSON."""
    out = tmp_path / "compare.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
           "STREAMBILL_HOME": str(tmp_path / "home")}  # fmt: skip
    done = subprocess.run(
        [str(SCRIPT), "HEAD", "HEAD", "--rounds", "1", "--scenario", "no-such-scenario",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "3 of 3 runs failed" in done.stderr and "No such command" in done.stderr
    got = json.loads(out.read_text())
    assert [(f["round"], f["side"]) for f in got["failures"]] == [(0, "head"), (1, "base"),
                                                                 (1, "head")]  # fmt: skip
    assert got["scenarios"] == {"no-such-scenario": {}}
    assert not any(p.startswith(str(tmp_path)) for p in worktree_paths())


@pytest.mark.kafka
def test_head_against_itself_end_to_end_on_the_real_broker(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """One round of a small raw-Kafka scenario, HEAD against HEAD: both sides' figures in
    the JSON, plausible ratios, the worktrees gone afterwards."""
    out = tmp_path / "compare.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "STREAMBILL_HOME": str(tmp_path / "home")}  # fmt: skip
    env.pop("STREAMBILL_NAMESPACE", None)
    scenario = "kafka --messages 20000"
    head = resolve("HEAD")
    done = subprocess.run(
        [str(SCRIPT), "HEAD", "HEAD", "--rounds", "1", "--scenario", scenario,
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "warm-up head: kafka --messages 20000" in done.stderr
    assert "msgs_per_s" in done.stdout and "head/base" in done.stdout
    got = json.loads(out.read_text())
    assert got["base"] == got["head"] == head
    assert got["rounds"] == 1 and got["warmup"] is True and got["failures"] == []
    rate = got["scenarios"][scenario]["msgs_per_s"]
    assert len(rate["base"]) == len(rate["head"]) == 1
    assert rate["base"][0] > 0 and rate["head"][0] > 0
    assert 0 < rate["ratio"] < 100 and rate["ratio_min"] == rate["ratio_max"] == rate["ratio"]
    assert got["scenarios"][scenario]["messages"]["ratio"] == 1.0
    assert not (tmp_path / "home" / "bench" / "compare" / head[:12]).exists()
    assert not any(p.startswith(str(tmp_path)) for p in worktree_paths())
