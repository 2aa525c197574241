"""The README and docs/benchmarks.md state only figures a command printed: the benchmark
pages are rendered from the committed result files, and the counts the README gives of
panels, rules and metrics are those of the real files. The docs name only files that
exist, the README every environment variable the code reads, and docs/architecture.md's
path of a usage event names real functions, never going back into a module it left."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from prometheus_client.metrics import MetricWrapperBase

import streams.cli
import streams.metrics
from streams.config import DEPLOY_DIR, REPO_ROOT
from streams.testbed.benchmarks_doc import (
    DOC,
    README,
    RESULTS_DIR,
    TABLE_BEGIN,
    TABLE_END,
    load_records,
    provenance,
    stale_pages,
    write_pages,
)

# a throughput or a memory figure: what only a measurement can say
MEASURED = re.compile(r"\b\d[\d,.]*\s?k?\s?(?:[a-z]+(?: [a-z]+)?\s?/\s?(?:s|min)\b|/(?:s|min)\b"
                      r"|(?:MB|GB)\b)")  # fmt: skip
COUNT = re.compile(r"\b(\d+) (?:alert )?(panels?|rules?|metrics?)\b")
COUNTED = re.compile(r"`([\w/.-]+)` \((\d+) (panels|rules|metrics)\)")


def real_counts() -> dict[str, tuple[int, str]]:
    """Each file whose size the README may state, with its real count."""
    dashboard = json.loads((DEPLOY_DIR / "grafana" / "streambill.json").read_text())
    prometheus = yaml.safe_load((DEPLOY_DIR / "prometheus" / "alerts.yaml").read_text())
    builtin = yaml.safe_load((DEPLOY_DIR / "alerts" / "rules.yaml").read_text())
    metrics = [v for v in vars(streams.metrics).values() if isinstance(v, MetricWrapperBase)]
    return {
        "deploy/grafana/streambill.json": (len(dashboard["panels"]), "panels"),
        "deploy/prometheus/alerts.yaml": (sum(len(g["rules"]) for g in prometheus["groups"]),
                                          "rules"),
        "deploy/alerts/rules.yaml": (len(builtin["rules"]), "rules"),
        "streams/metrics.py": (len(metrics), "metrics"),
    }  # fmt: skip


TRANSCRIPT = re.compile(r"```console\n\s*\$ streambill .*?```", re.S)


def outside_table(text: str) -> str:
    """The README less its generated figures table and its command transcripts (a
    ```console block starting with `$ streambill`: what a command printed once, shown as
    it printed, not a figure the README claims)."""
    before, _, rest = text.partition(TABLE_BEGIN)
    return TRANSCRIPT.sub("", before + rest.partition(TABLE_END)[2])


def test_benchmark_pages_are_what_the_result_files_render() -> None:
    stale = stale_pages()
    assert not stale, f"run `streambill bench report`: {[str(p) for p in stale]} differ"


def test_every_result_file_says_which_command_wrote_it_when_and_where() -> None:
    records = load_records()
    assert records, "docs/benchmarks/ holds no result file"
    for r in records:
        prov = r.provenance
        assert prov["command"].startswith("streambill "), r.stem
        # the file is the one its command wrote
        assert prov["command"].endswith(f"--json docs/benchmarks/{r.stem}.json"), r.stem
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", prov["date"]), r.stem
        assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"] or ""), r.stem
        machine = prov["machine"]
        assert machine["cores"] >= 1 and machine["cpu_model"], r.stem
        assert len(machine["load_average"]) == 3, r.stem
        assert r.runs and all(r.runs), r.stem


def test_a_benchmark_records_its_command_line_commit_and_machine_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = ["/x/.venv/bin/streambill", "bench", "usage", "--json", "docs/b c.json"]
    monkeypatch.setattr(sys, "argv", argv)
    prov = provenance()
    assert prov["command"] == "streambill bench usage --json 'docs/b c.json'"
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"])
    assert isinstance(prov["uncommitted_changes"], bool)
    assert prov["machine"]["cores"] == os.cpu_count()
    load = prov["machine"]["load_average"]
    assert len(load) == 3 and all(isinstance(x, float) and x >= 0 for x in load)


def test_a_figure_changed_in_a_result_file_or_on_a_page_is_caught(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks"
    shutil.copytree(RESULTS_DIR, results)
    doc, readme = tmp_path / "benchmarks.md", tmp_path / "README.md"
    shutil.copy(DOC, doc)
    shutil.copy(README, readme)
    assert stale_pages(results, doc, readme) == []
    # a figure of the JSON changed without rendering again: both pages are stale
    record = load_records(results)[0]
    first = results / f"{record.stem}.json"
    payload = json.loads(first.read_text())
    payload["metrics"][record.scenario.figures[0].key] += 1  # a figure the README shows
    first.write_text(json.dumps(payload))
    assert stale_pages(results, doc, readme) == [doc, readme]
    write_pages(results, doc, readme)
    assert stale_pages(results, doc, readme) == []
    # a figure typed into the README's table by hand
    text = readme.read_text()
    table = text[text.index(TABLE_BEGIN) : text.index(TABLE_END)]
    figure = re.search(r"\*\*[\d,.]+\*\*", table)
    assert figure, "the README's table shows no figure"
    readme.write_text(text.replace(figure.group(), "**1,234,567**", 1))
    assert stale_pages(results, doc, readme) == [readme]


def test_the_readme_states_no_measured_figure_outside_the_generated_table() -> None:
    text = outside_table(README.read_text())
    found = [m.group() for m in MEASURED.finditer(text)]
    assert not found, f"figures not from docs/benchmarks/*.json: {found}"


@pytest.mark.parametrize("page", [README, REPO_ROOT / "docs" / "threat-model.md"])
def test_counts_of_panels_rules_and_metrics_are_the_real_ones(page: Path) -> None:
    text = page.read_text()
    counts = real_counts()
    for m in COUNTED.finditer(text):
        path, stated, unit = m.group(1), int(m.group(2)), m.group(3)
        assert path in counts, f"{page.name}: no count known for {path}"
        assert (stated, unit) == counts[path], f"{page.name}: {m.group()}, really {counts[path]}"
    # a count not beside its file cannot be checked: state none
    loose = COUNT.findall(COUNTED.sub("", text))
    assert not loose, f"{page.name}: counts not beside their file: {loose}"


# --- docs/architecture.md: the path of one usage event, hop by hop --------------------

ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
HOP = re.compile(r"^\d+\. `(streams/[\w/]+\.py)` `([A-Za-z_][\w.]*)`", re.M)


def hops(page: str) -> list[tuple[str, str]]:
    """(file, function) of each numbered item between the hops markers."""
    section = page.split("<!-- hops:begin -->", 1)[1].split("<!-- hops:end -->", 1)[0]
    items = re.findall(r"^\d+\. .*$", section, re.M)
    found = HOP.findall(section)
    assert len(found) == len(items), f"a hop without `file` `function`: {items}"
    return found


def defines(path: Path, dotted: str) -> bool:
    """Whether the module defines the function, class or Class.method (ast, not import)."""
    body: list[ast.stmt] = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        node = next(
            (n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
             and n.name == part),
            None,
        )  # fmt: skip
        if node is None:
            return False
        body = node.body if isinstance(node, ast.ClassDef) else []
    return True


def hop_problems(path: list[tuple[str, str]], root: Path = REPO_ROOT) -> list[str]:
    problems, left = [], set()
    for i, (file, function) in enumerate(path):
        if not (root / file).is_file():
            problems.append(f"hop {i + 1}: no file {file}")
        elif not defines(root / file, function):
            problems.append(f"hop {i + 1}: {file} defines no {function}")
        if file in left:
            problems.append(f"hop {i + 1}: back into {file}, already left")
        if i and path[i - 1][0] != file:
            left.add(path[i - 1][0])
    return problems


def test_the_usage_events_path_names_real_functions_and_never_goes_back() -> None:
    path = hops(ARCHITECTURE.read_text())
    assert len(path) >= 5, path
    assert path[0][0].startswith("streams/api/"), "the path starts at the API"
    assert "streams/processors/sink.py" in dict(path), "and goes through the sink"
    assert not hop_problems(path), hop_problems(path)


def test_a_missing_function_or_a_hop_back_is_caught(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("class A:\n    def run(self): ...\nasync def go(): ...\n")
    (tmp_path / "b.py").write_text("def f(): ...\n")
    assert defines(tmp_path / "a.py", "A.run") and defines(tmp_path / "a.py", "go")
    assert not defines(tmp_path / "a.py", "A.go") and not defines(tmp_path / "a.py", "run")
    assert hop_problems([("a.py", "A"), ("a.py", "go"), ("b.py", "f")], tmp_path) == []
    back = [("a.py", "A.run"), ("b.py", "f"), ("a.py", "go")]
    assert hop_problems(back, tmp_path) == ["hop 3: back into a.py, already left"]
    assert hop_problems([("a.py", "A.stop"), ("c.py", "f")], tmp_path) == [
        "hop 1: a.py defines no A.stop",
        "hop 2: no file c.py",
    ]
    with pytest.raises(AssertionError, match="without"):
        hops("<!-- hops:begin -->\n1. `streams/a.py` go\n<!-- hops:end -->")


# a repository path in backticks (its first word: `deploy/kafka/kafka.sh bootstrap` names
# the script); patterns and placeholders (`NNNN_*.sql`, `<id>`) are not paths
NAMED_PATH = re.compile(r"`((?:streams|tests|deploy|scripts|schemas|docs|fuzz|\.ci)/[^`\s]*)")


@pytest.mark.parametrize(
    "page", [README, ARCHITECTURE, DOC, REPO_ROOT / "docs" / "threat-model.md"]
)
def test_every_file_the_docs_name_exists(page: Path) -> None:
    named = {p for p in NAMED_PATH.findall(page.read_text()) if not re.search(r"[*<>…{]", p)}
    assert named, f"{page.name} names no file"
    missing = sorted(p for p in named if not (REPO_ROOT / p).exists())
    assert not missing, f"{page.name} names files that are not there: {missing}"


ENV_NAME = re.compile(r"(?:STREAMBILL|KAFKA|CLICKHOUSE|STRIPE)_[A-Z0-9_]+")
# read by the code, not set by users
INTERNAL_ENV = {"STREAMBILL_API_CHILD"}  # marks the worker processes `streambill api` starts


def test_every_environment_variable_the_code_reads_is_in_the_readme() -> None:
    # every variable is read in streams/config.py alone (tests/test_config.py)
    tree = ast.parse((REPO_ROOT / "streams" / "config.py").read_text())
    read = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and ENV_NAME.fullmatch(n.value)
    }
    assert "KAFKA_BOOTSTRAP_SERVERS" in read, "streams/config.py reads no variable by name"
    undocumented = sorted(read - INTERNAL_ENV - set(ENV_NAME.findall(README.read_text())))
    assert not undocumented, f"add these to the README's Configuration: {undocumented}"


def cli_commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every visible command of the CLI, as its words (`run lane`, `bench usage`)."""
    if not hasattr(command, "commands"):
        return [path]
    return [
        words
        for name, sub in command.commands.items()
        if not sub.hidden
        for words in cli_commands(sub, (*path, name))
    ]


def test_every_command_of_the_cli_is_in_the_readmes_commands_table() -> None:
    commands = cli_commands(typer.main.get_command(streams.cli.app))
    assert ("run", "lane") in commands and ("bench", "report") in commands, commands
    section = README.read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `streambill ")]
    missing = [
        " ".join(words)
        for words in commands
        if not any(row.startswith(f"| `streambill {words[0]}") and all(w in row for w in words)
                   for row in rows)
    ]  # fmt: skip
    assert not missing, f"commands missing from the README's table: {missing}"
