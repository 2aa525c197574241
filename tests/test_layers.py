"""The layers inside streams/ (../shared/DESIGN.md "Inside streams/, the layers"), read
from the source with ast: each layer imports only the ones below it.

- domain/ is pure billing: it imports nothing from streams outside domain/;
- runtime/ (the stream runtime) imports no processor, API, ops, CLI or test bed;
- a processor imports no other processor (shared pieces live in the runtime, the domain
  or an adapter).

Every import counts, also one inside a function or under TYPE_CHECKING: a layer that
needs a name from above only at call time still depends on it. (That the product does
not import streams.testbed is tested with the test bed, in tests/testbed/.)
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streams.config import REPO_ROOT

PACKAGE = REPO_ROOT / "streams"
ABOVE_RUNTIME = {"processors", "api", "ops", "cli", "testbed"}
Rule = Callable[[Path, list[list[str]]], str | None]  # names under streams -> the forbidden one
PROCESSORS = {p.stem for p in (PACKAGE / "processors").glob("*.py")} - {"__init__"} | {
    p.parent.name for p in (PACKAGE / "processors").glob("*/__init__.py")
}


def imports(source: str, package: str) -> Iterator[tuple[int, list[str]]]:
    """(line, names) per import: `import a.b` gives [a.b]; `from a import b, c` gives
    [a, a.b, a.c], since b may be a module or a name in a. Relative imports are resolved
    against `package`, the dotted package the source is in."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield node.lineno, [base, *(f"{base}.{a.name}" for a in node.names)]


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).parent.parts)


def violations(layer: str, forbidden: Rule) -> list[str]:
    """`file:line imports X` for each import in streams/<layer>/ the predicate names."""
    found = set()
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, names in imports(path.read_text(), package_of(path)):
            streams_names = [n.split(".") for n in names if n.split(".")[0] == "streams"]
            if streams_names and (bad := forbidden(path, [n[1:] for n in streams_names])):
                found.add(f"{path.relative_to(REPO_ROOT)}:{line} imports {bad}")
    return sorted(found)


def outside_domain(path: Path, names: list[list[str]]) -> str | None:
    # `from streams import x` gives [[], [x]]: streams.x is what it imports
    named = [n for n in names if n] or names
    bad = sorted({n[0] if n else "" for n in named} - {"domain"})
    return "streams." + "/".join(bad) if bad else None


def above_runtime(path: Path, names: list[list[str]]) -> str | None:
    bad = sorted({n[0] for n in names if n and n[0] in ABOVE_RUNTIME})
    return "streams." + "/".join(bad) if bad else None


def another_processor(path: Path, names: list[list[str]]) -> str | None:
    own = path.stem if path.name != "__init__.py" else None
    bad = sorted(
        {n[1] for n in names if len(n) > 1 and n[0] == "processors" and n[1] in PROCESSORS} - {own}
    )
    return "streams.processors." + "/".join(bad) if bad else None


def test_the_reader_sees_absolute_relative_and_late_imports() -> None:
    source = (
        "import streams.kafka.clients\n"
        "from streams.domain import money\n"
        "from . import rating\n"
        "from ..runtime.state import due_key\n"
        "def f():\n"
        "    from streams.api import server\n"
    )
    assert list(imports(source, "streams.processors")) == [
        (1, ["streams.kafka.clients"]),
        (2, ["streams.domain", "streams.domain.money"]),
        (3, ["streams.processors", "streams.processors.rating"]),
        (4, ["streams.runtime.state", "streams.runtime.state.due_key"]),
        (6, ["streams.api", "streams.api.server"]),
    ]


@pytest.mark.parametrize(
    ("rule", "names", "verdict"),
    [
        (outside_domain, [["domain"], ["domain", "money"]], None),
        (outside_domain, [["codec"], ["codec", "codec"]], "streams.codec"),
        (outside_domain, [[], ["config"]], "streams.config"),
        (outside_domain, [[], ["domain"], ["config"]], "streams.config"),
        (above_runtime, [["kafka", "topics"]], None),
        (above_runtime, [["processors"], ["processors", "sink"]], "streams.processors"),
        (above_runtime, [["cli"]], "streams.cli"),
        (another_processor, [["processors", "sink"]], None),
        (another_processor, [["processors", "payments", "Lane"]], "streams.processors.payments"),
        (another_processor, [["runtime", "state"]], None),
    ],
)
def test_each_rule_names_what_it_forbids(
    rule: Rule, names: list[list[str]], verdict: str | None
) -> None:
    assert rule(PACKAGE / "processors" / "sink.py", names) == verdict


def test_domain_imports_nothing_from_streams_outside_domain() -> None:
    found = violations("domain", outside_domain)
    assert not found, "the domain is pure billing, without I/O:\n" + "\n".join(found)


def test_runtime_imports_no_processor_api_ops_cli_or_test_bed() -> None:
    found = violations("runtime", above_runtime)
    assert not found, "the runtime sits below these layers:\n" + "\n".join(found)


def test_no_processor_imports_another_processor() -> None:
    found = violations("processors", another_processor)
    assert not found, "shared pieces belong to the runtime, the domain or an adapter:\n" + (
        "\n".join(found)
    )
