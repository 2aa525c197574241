"""The README and docs/benchmarks.md state only figures a command printed: the benchmark
pages are rendered from the committed result files, and the counts the README gives of
panels, rules and metrics are those of the real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

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


def outside_table(text: str) -> str:
    before, _, rest = text.partition(TABLE_BEGIN)
    return before + rest.partition(TABLE_END)[2]


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
