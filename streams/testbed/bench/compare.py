"""`scripts/bench-compare BASE HEAD`: a regression guard for the benchmarks.

Runs chosen `streambill bench` scenarios on two commits of this repository, each in a
detached git worktree of its own, and prints per figure the ratio head/base of the
medians with its spread (the lowest and highest of the rounds' own ratios), so that a
change can show it made nothing slower.

Why it is run this way:
- one broker for every run, so that both sides meet the same broker;
- a warm-up run of each scenario on HEAD first, not counted: the first run on a machine
  pays for cold caches (page cache, the broker's segments, Python's bytecode);
- rounds that alternate which side goes first, and both sides of a scenario run back to
  back: a machine drifts (heat, background load), and alternating spreads the drift
  over both sides instead of charging it to one;
- each run a subprocess with its own STREAMBILL_HOME per side, the same interpreter, and
  the rest of this environment (STREAMBILL_RATING_CONTRACT=2 applies to both sides).

The arithmetic (plan, statistics, rows, JSON) is plain functions over a `Runner`, the
function that runs one bench; `BenchRunner` is the real one (a subprocess), and tests
pass their own with canned figures.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from rich.console import Console
from rich.table import Table

from streams.config import REPO_ROOT, Settings, child_environment

Side = Literal["base", "head"]
SIDES: tuple[Side, Side] = ("base", "head")
WARMUP = 0  # the round number of the warm-up runs

# 35-65 s each on a 2-core machine, setup included (sink's default 1M rows is over in
# 3 s of measuring: too short to compare; payment-run's 150k take 90 s)
DEFAULT_SCENARIOS = (
    "usage --events 1000000",
    "billrun --subscriptions 100000",
    "sink --rows 2000000",
    "payment-run --payments 100000",
)

# a figure's name (its last dotted part) -> which way is better
HIGHER_IS_BETTER = ("_per_s", "_per_min", "ratio")
LOWER_IS_BETTER = ("seconds", "_s", "_ms", "_mb", "p99", "p50", "duplicates", "lost")
# counts of broken promises (harness.WORST_IS_MAX's kind): fewer is better
BROKEN_PROMISES = frozenset({
    "double_charges", "differences", "lost_kafka", "lost_warehouse", "duplicates_in_kafka",
    "doubled", "dead_letters", "errors_5xx", "timeouts", "connection_errors", "gave_up",
})  # fmt: skip

STOP_TIMEOUT_S = 120  # for an interrupted bench to clean up (its processes, its topics)
TAIL_CHARS = 3000  # of a failed run's stderr, shown at the end


class UnknownRevision(Exception):
    """A BASE or HEAD that is no commit of this repository."""


class Run(NamedTuple):
    round: int  # WARMUP, or 1..rounds
    side: Side
    scenario: str


@dataclass(frozen=True)
class Outcome:
    """What one bench run gave: its numeric figures (dotted names), or why it failed."""

    figures: dict[str, float] = field(default_factory=dict)
    error: str | None = None


Runner = Callable[[Run], Outcome]


@dataclass(frozen=True)
class Options:
    base: str
    head: str
    rounds: int
    scenarios: tuple[str, ...]
    json_out: Path | None


# --- the arguments ------------------------------------------------------------------


def _scenario(text: str) -> str:
    """A scenario as the words after `streambill bench`, normalized; its --json is ours."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if not words:
        raise argparse.ArgumentTypeError("an empty scenario")
    if any(w == "--json" or w.startswith("--json=") for w in words):
        raise argparse.ArgumentTypeError(f"{text!r}: --json is set by bench-compare")
    return shlex.join(words)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def parse_args(argv: Sequence[str]) -> Options:
    """The command line; argparse exits 2 on a bad one."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench-compare",
        description="Run benchmark scenarios on two commits, alternated on one broker, "
        "and print each figure's ratio head/base with its spread over the rounds.",
    )
    parser.add_argument("base", metavar="BASE", help="a git revision (the reference)")
    parser.add_argument("head", metavar="HEAD", help="a git revision (the change)")
    parser.add_argument("--rounds", type=_positive, default=3,
                        help="rounds of every scenario on both sides (default 3)")  # fmt: skip
    parser.add_argument(
        "--scenario", dest="scenarios", action="append", type=_scenario, metavar="ARGS",
        help="`streambill bench` arguments, e.g. \"usage --events 1000000\"; repeatable "
        f"(default: {'; '.join(DEFAULT_SCENARIOS)})",
    )  # fmt: skip
    parser.add_argument("--json", dest="json_out", type=Path, metavar="OUT",
                        help="write the comparison as JSON")  # fmt: skip
    args = parser.parse_args(list(argv))
    scenarios = tuple(dict.fromkeys(args.scenarios or DEFAULT_SCENARIOS))
    return Options(args.base, args.head, args.rounds, scenarios, args.json_out)


# --- the plan -----------------------------------------------------------------------


def sides_in_order(round_: int) -> tuple[Side, Side]:
    """Base first in odd rounds, head first in even ones."""
    return SIDES if round_ % 2 else (SIDES[1], SIDES[0])


def plan(scenarios: Sequence[str], rounds: int) -> list[Run]:
    """The warm-up (each scenario once on head), then per round each scenario on both
    sides back to back, the side going first alternating."""
    runs = [Run(WARMUP, "head", s) for s in scenarios]
    for r in range(1, rounds + 1):
        runs += [Run(r, side, s) for s in scenarios for side in sides_in_order(r)]
    return runs


def label(run: Run, rounds: int) -> str:
    when = "warm-up" if run.round == WARMUP else f"round {run.round}/{rounds}"
    return f"{when} {run.side}: {run.scenario}"


# --- the figures --------------------------------------------------------------------


def numeric_figures(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """A bench's numeric figures, nested ones by dotted name; booleans, text and lists
    are not measurements to compare."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.update(numeric_figures(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def direction(name: str) -> str:
    """ "higher" or "lower" when the figure's name says which is better, else ""."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith(HIGHER_IS_BETTER):
        return "higher"
    if leaf.endswith(LOWER_IS_BETTER) or leaf in BROKEN_PROMISES:
        return "lower"
    return ""


@dataclass(frozen=True)
class Figure:
    """One figure of one scenario over the rounds (None: that round's run failed or did
    not report it)."""

    base: list[float | None]
    head: list[float | None]

    @staticmethod
    def _median(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    @property
    def base_median(self) -> float | None:
        return self._median(self.base)

    @property
    def head_median(self) -> float | None:
        return self._median(self.head)

    @property
    def ratio(self) -> float | None:
        """head / base of the medians; None without both, or over a base of 0."""
        base, head = self.base_median, self.head_median
        return head / base if base and head is not None else None

    @property
    def round_ratios(self) -> list[float]:
        """Each round's head / base, for the rounds that measured both."""
        return [h / b for b, h in zip(self.base, self.head, strict=True)
                if b and h is not None]  # fmt: skip

    @property
    def missing(self) -> Side | None:
        """The side that never reported this figure, if one did not."""
        for side, values in zip(SIDES, (self.base, self.head), strict=True):
            if all(v is None for v in values):
                return side
        return None

    def as_json(self, name: str) -> dict[str, Any]:
        spread = self.round_ratios
        return {
            "base": self.base,
            "head": self.head,
            "base_median": self.base_median,
            "head_median": self.head_median,
            "ratio": self.ratio,
            "ratio_min": min(spread) if spread else None,
            "ratio_max": max(spread) if spread else None,
            "better": direction(name) or None,
        }


Comparison = dict[str, dict[str, Figure]]  # scenario -> figure name -> Figure


def compare(outcomes: Mapping[Run, Outcome], scenarios: Sequence[str], rounds: int) -> Comparison:
    """Each scenario's figures side by side, round by round (the warm-up left out); a
    figure one side lacks is kept, its values None there."""
    result: Comparison = {}
    for scenario in scenarios:
        measured = {
            (side, r): outcomes.get(Run(r, side, scenario), Outcome()).figures
            for r in range(1, rounds + 1)
            for side in SIDES
        }
        names = dict.fromkeys(name for figures in measured.values() for name in figures)
        result[scenario] = {
            name: Figure(
                base=[measured["base", r].get(name) for r in range(1, rounds + 1)],
                head=[measured["head", r].get(name) for r in range(1, rounds + 1)],
            )
            for name in names
        }
    return result


def failures(outcomes: Mapping[Run, Outcome]) -> list[tuple[Run, str]]:
    """The runs that failed (the warm-up's too: a head that cannot run fails the guard)."""
    return [(run, o.error) for run, o in outcomes.items() if o.error is not None]


def report(
    base: str, head: str, rounds: int, comparison: Comparison, failed: list[tuple[Run, str]]
) -> dict[str, Any]:
    """What --json writes."""
    return {
        "base": base,
        "head": head,
        "rounds": rounds,
        "warmup": True,
        "scenarios": {
            scenario: {name: fig.as_json(name) for name, fig in figures.items()}
            for scenario, figures in comparison.items()
        },
        "failures": [
            {"round": run.round, "side": run.side, "scenario": run.scenario, "error": error}
            for run, error in failed
        ],
    }


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def row(name: str, figure: Figure) -> list[str]:
    """A figure's row: name, base median, head median, ratio, spread, which is better."""
    spread = figure.round_ratios
    span = f"{min(spread):.3f}-{max(spread):.3f}" if spread else "-"
    ratio = f"{figure.ratio:.3f}" if figure.ratio is not None else "-"
    if figure.missing:
        ratio = f"only in {'head' if figure.missing == 'base' else 'base'}"
    return [name, number(figure.base_median), number(figure.head_median), ratio, span,
            direction(name)]  # fmt: skip


def tables(comparison: Comparison, base: str, head: str, rounds: int) -> list[Table]:
    """A table per scenario; its caption says what the columns are."""
    out = []
    caption = (f"base {base[:10]}, head {head[:10]}: medians of {rounds} round"
               f"{'s' * (rounds != 1)} after a warm-up; spread: min-max of the rounds' "
               "own head/base")  # fmt: skip
    for scenario, figures in comparison.items():
        table = Table(title=scenario, caption=caption)
        table.add_column("metric", overflow="fold", min_width=14)  # folds, never a number
        for header in ("base", "head", "head/base", "spread", "better"):
            table.add_column(header, justify="left" if header == "better" else "right",
                             no_wrap=True)  # fmt: skip
        for name, figure in figures.items():
            table.add_row(*row(name, figure))
        if not figures:
            table.add_row("(no figures: every run failed)", "", "", "", "", "")
        out.append(table)
    return out


def execute(
    runs: Sequence[Run],
    runner: Runner,
    on_start: Callable[[Run], None] = lambda _run: None,
    on_done: Callable[[Run, Outcome], None] = lambda _run, _o: None,
) -> dict[Run, Outcome]:
    """Every run in order; a failed one is recorded and the others go on."""
    outcomes: dict[Run, Outcome] = {}
    for run in runs:
        on_start(run)
        outcomes[run] = runner(run)
        on_done(run, outcomes[run])
    return outcomes


# --- git, the broker, the subprocesses ----------------------------------------------


def _git(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=check)  # fmt: skip


def resolve(revision: str) -> str:
    """The full commit id `revision` names in this repository."""
    done = _git("rev-parse", "--verify", "--quiet", "--end-of-options",
                f"{revision}^{{commit}}", check=False)  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        raise UnknownRevision(f"unknown revision {revision!r}: no commit of {REPO_ROOT} has it")
    return done.stdout.strip()


def _remove_worktree(path: Path) -> None:
    _git("worktree", "remove", "--force", str(path), check=False)
    shutil.rmtree(path, ignore_errors=True)  # what git did not know as a worktree
    _git("worktree", "prune", check=False)


@contextmanager
def worktrees(commits: Iterable[str], parent: Path) -> Iterator[dict[str, Path]]:
    """A detached worktree per distinct commit under `parent`, removed afterwards (also
    after an error or Ctrl-C); one left by a killed earlier run is replaced."""
    made: dict[str, Path] = {}
    try:
        for commit in dict.fromkeys(commits):
            path = parent / commit[:12]
            if path.exists():
                _remove_worktree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            added = _git("worktree", "add", "--detach", str(path), commit, check=False)
            if added.returncode != 0:
                raise RuntimeError(f"git worktree add {path} failed:\n{added.stderr}")
            made[commit] = path
        yield made
    finally:
        for path in made.values():
            _remove_worktree(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60]


@dataclass
class BenchRunner:
    """Runs `streambill bench <scenario> --json <file>` in a side's worktree: its code
    (PYTHONPATH, cwd), its own home, this interpreter, this environment, one broker."""

    checkouts: dict[Side, Path]
    homes: dict[Side, Path]
    logs: Path
    bootstrap: str

    def __call__(self, run: Run) -> Outcome:
        tree = self.checkouts[run.side]
        name = f"{run.round}-{run.side}-{_slug(run.scenario)}"
        out, stdout, stderr = (self.logs / f"{name}{ext}" for ext in (".json", ".out", ".err"))
        out.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "streams.cli", "bench", *shlex.split(run.scenario),
                "--json", str(out)]  # fmt: skip
        env = child_environment(PYTHONPATH=str(tree), STREAMBILL_HOME=str(self.homes[run.side]),
                                KAFKA_BOOTSTRAP_SERVERS=self.bootstrap)  # fmt: skip
        with stdout.open("w") as o, stderr.open("w") as e:
            # its own session: Ctrl-C reaches only us, and we stop it once (SIGTERM, which
            # a bench takes as Ctrl-C), so that it cleans up before its worktree goes
            proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=o, stderr=e,
                                    start_new_session=True)  # fmt: skip
            try:
                code = proc.wait()
            except BaseException:
                _stop(proc)
                raise
        if code != 0:
            return Outcome(error=f"exit {code}; its stderr: {stderr}\n{_tail(stderr)}")
        try:
            figures = numeric_figures(json.loads(out.read_text())["metrics"])
        except (OSError, ValueError, LookupError, TypeError, AttributeError) as exc:
            return Outcome(error=f"no figures in {out} ({exc!r})\n{_tail(stderr)}")
        return Outcome(figures=figures)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tail(path: Path) -> str:
    with suppress(OSError):
        return path.read_text(errors="replace")[-TAIL_CHARS:]
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    from streams.kafka.local import bootstrap_servers
    from streams.ui import progress_bar

    console, out = Console(stderr=True), Console()
    if not out.is_terminal:  # a file or pipe has no width: keep long figure names whole
        out = Console(width=120)
    options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        base, head = resolve(options.base), resolve(options.head)
    except UnknownRevision as exc:
        console.print(f"[red]bench-compare: {exc}[/]")
        return 2

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # `kill` cleans up as Ctrl-C does
    settings = Settings()
    compare_dir = settings.home / "bench" / "compare"
    homes: dict[Side, Path] = {side: compare_dir / f"home-{side}" for side in SIDES}
    logs = compare_dir / "logs"
    for stale in (*homes.values(), logs):  # a fresh state per comparison
        shutil.rmtree(stale, ignore_errors=True)
        stale.mkdir(parents=True)
    runs = plan(options.scenarios, options.rounds)
    console.print(f"bench-compare: base {base[:12]} ({options.base}), head {head[:12]} "
                  f"({options.head}); {len(options.scenarios)} scenario(s), "
                  f"{options.rounds} round(s), after a warm-up run of each on head "
                  "(not counted)")  # fmt: skip
    try:
        bootstrap = bootstrap_servers(settings)
        console.print(f"broker: {bootstrap}; logs: {logs}")
        with worktrees((base, head), compare_dir) as trees, progress_bar(console) as progress:
            runner = BenchRunner({"base": trees[base], "head": trees[head]}, homes, logs,
                                 bootstrap)  # fmt: skip
            task = progress.add_task("bench runs", total=len(runs))
            started = [0.0]

            def on_start(run: Run) -> None:
                started[0] = time.monotonic()
                progress.update(task, eta=label(run, options.rounds))

            def on_done(run: Run, outcome: Outcome) -> None:
                took = time.monotonic() - started[0]
                how = "[green]ok[/]" if outcome.error is None else "[red]failed[/]"
                progress.console.print(f"{label(run, options.rounds)}: {how} ({took:.0f} s)")
                progress.advance(task)

            outcomes = execute(runs, runner, on_start, on_done)
    except KeyboardInterrupt:
        console.print("[yellow]bench-compare: interrupted; worktrees removed[/]")
        return 130
    except RuntimeError as exc:  # no broker, no worktree: nothing was measured
        console.print(f"[red]bench-compare: {exc}[/]")
        return 1
    comparison = compare(outcomes, options.scenarios, options.rounds)
    failed = failures(outcomes)
    for table in tables(comparison, base, head, options.rounds):
        out.print(table)
    if options.json_out:
        options.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = report(base, head, options.rounds, comparison, failed)
        options.json_out.write_text(json.dumps(payload, indent=2) + "\n")
    for run, error in failed:
        console.print(f"[red]failed: {label(run, options.rounds)}[/]\n{error}")
    if failed:
        console.print(f"[red]bench-compare: {len(failed)} of {len(runs)} runs failed[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
