"""Every Prometheus metric is declared in streams/metrics.py: no other module of the
package constructs one."""

from __future__ import annotations

import ast

from streams.config import REPO_ROOT

PACKAGE = REPO_ROOT / "streams"
METRICS = PACKAGE / "metrics.py"
# prometheus_client's metric types, and the modules that export them
METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
CLIENT_MODULES = {"prometheus_client", "prometheus_client.metrics"}


def metric_constructions(tree: ast.AST) -> list[int]:
    """Lines that import a metric type from prometheus_client or use one by its module
    (`prometheus_client.Counter(...)`)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in CLIENT_MODULES:
            lines += [node.lineno for a in node.names if a.name in METRIC_TYPES]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in METRIC_TYPES
            and ast.unparse(node.value) in CLIENT_MODULES
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_metrics_are_declared_only_in_streams_metrics() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == METRICS:
            continue
        lines = metric_constructions(ast.parse(path.read_text(), str(path)))
        if lines:
            found[str(path.relative_to(REPO_ROOT))] = lines
    assert found == {}, f"declare these metrics in streams/metrics.py: {found}"


def test_the_check_sees_both_forms_and_not_collections_counter() -> None:
    source = (
        "from collections import Counter\nimport prometheus_client\n"
        "from prometheus_client import Gauge, generate_latest\n"
        "prometheus_client.Histogram('h', 'h')\nCounter('abc')\n"
    )
    assert metric_constructions(ast.parse(source)) == [3, 4]
    assert metric_constructions(ast.parse(METRICS.read_text()))  # it does declare them
