"""The product never imports the test bed (streams/testbed/), read from the source with
ast: no module outside streams/testbed/ imports it, at the top, in a class or under
TYPE_CHECKING, except inside the body of a CLI command that is the test bed's entry
point (ENTRY_POINTS). And fault injection is the test bed's: the production warehouse
client has no switch that turns it on."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from streams.config import REPO_ROOT

PACKAGE = REPO_ROOT / "streams"
TESTBED = PACKAGE / "testbed"

# (file, function): commands whose body imports the test bed when they run
ENTRY_POINTS = {
    ("streams/cli.py", "demo"),
    ("streams/cli.py", "chaos"),
    ("streams/cli.py", "_run_bench"),
    ("streams/cli.py", "bench_kafka"),
    ("streams/cli.py", "bench_usage"),
    ("streams/cli.py", "bench_peers"),
    ("streams/cli.py", "bench_billrun"),
    ("streams/cli.py", "bench_sink"),
    ("streams/cli.py", "bench_payment_run"),
    ("streams/cli.py", "bench_signup_spike"),
    ("streams/cli.py", "bench_refund_latency"),
    ("streams/cli.py", "bench_report"),
    ("streams/payments/cli.py", "serve"),  # streambill gateway serve
}


def imported_names(node: ast.AST, path: Path) -> Iterator[str]:
    """Every dotted name an import statement names: the module, and module.name for each
    `from module import name` (the name may be a module); relative ones resolved."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = list(path.relative_to(REPO_ROOT).parent.parts)
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, *filter(None, [base])])
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


def imports_of_testbed(path: Path, source: str | None = None) -> Iterator[tuple[int, str | None]]:
    """(line, the top-level function it is in, or None) of each import of streams.testbed
    in the module at `path` (its source, unless given)."""

    def walk(node: ast.AST, function: str | None) -> Iterator[tuple[int, str | None]]:
        for child in ast.iter_child_nodes(node):
            inside = function
            if function is None and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inside = child.name if node is tree else None
            if any(
                name == "streams.testbed" or name.startswith("streams.testbed.")
                for name in imported_names(child, path)
            ):
                yield child.lineno, inside
            yield from walk(child, inside)

    tree = ast.parse(path.read_text() if source is None else source, str(path))
    yield from walk(tree, None)


def product_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if TESTBED not in p.parents)


def test_the_product_imports_the_test_bed_only_in_its_entry_points() -> None:
    found, used = [], set()
    for path in product_modules():
        where = str(path.relative_to(REPO_ROOT))
        for line, function in imports_of_testbed(path):
            if (where, function) in ENTRY_POINTS:
                used.add((where, function))
            else:
                found.append(f"{where}:{line} ({function or 'module level'})")
    assert not found, "the product imports the test bed:\n" + "\n".join(found)
    # a command that no longer needs the test bed leaves the list
    assert used == ENTRY_POINTS, f"not importing the test bed: {sorted(ENTRY_POINTS - used)}"


def test_the_walker_sees_each_form_of_import() -> None:
    sample = PACKAGE / "payments" / "sample.py"
    source = (
        "import streams.testbed.bench\n"
        "from streams import testbed\n"
        "from ..testbed.chaos import run_chaos\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from streams.testbed import demo\n"
        "class C:\n"
        "    def m(self):\n"
        "        from streams.testbed.generator import Dataset\n"
        "def serve():\n"
        "    def inner():\n"
        "        import streams.testbed.loadgen\n"
        "    from streams.kafka import clients\n"
    )
    # relative imports resolve against the module's place in the package
    found = list(imports_of_testbed(sample, source))
    assert found == [(1, None), (2, None), (3, None), (6, None), (9, None), (12, "serve")]


def test_the_production_warehouse_client_has_no_fault_switch() -> None:
    for path in product_modules():
        text = path.read_text()
        assert "FAULT_INJECTION" not in text and "OutageSwitched" not in text, path
