"""Every environment variable is read in streams/config.py alone: the rest of the package
reads Settings or config's functions, or declares a typer option's `envvar` (listed in
config.CLI_OPTION_VARIABLES)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from streams import config
from streams.config import CLI_OPTION_VARIABLES, REPO_ROOT, child_environment, environment

PACKAGE = REPO_ROOT / "streams"
CONFIG = PACKAGE / "config.py"
OS_ENVIRONMENT = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != CONFIG)


def touches_environment(node: ast.AST, os_names: set[str]) -> bool:
    if isinstance(node, ast.Attribute):  # os.environ, os.getenv(...), also under an alias
        return (
            node.attr in OS_ENVIRONMENT
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
        )
    if isinstance(node, ast.ImportFrom):  # from os import environ
        return node.module == "os" and any(a.name in OS_ENVIRONMENT for a in node.names)
    return False


def environment_uses(tree: ast.AST) -> list[int]:
    """Lines that touch the process environment through `os` (`import os as o` too)."""
    os_names = {"os"} | {
        a.asname
        for node in ast.walk(tree) if isinstance(node, ast.Import)
        for a in node.names if a.name == "os" and a.asname
    }  # fmt: skip
    return sorted(n.lineno for n in ast.walk(tree) if touches_environment(n, os_names))


def typer_envvars(tree: ast.AST) -> tuple[set[str], list[int]]:
    """The `envvar=` of typer options, and the lines of any `envvar=` elsewhere."""
    names, elsewhere = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg != "envvar":
                continue
            func = node.func
            is_option = (
                isinstance(func, ast.Attribute)
                and func.attr in ("Option", "Argument")
                and isinstance(func.value, ast.Name)
                and func.value.id == "typer"
            )
            if is_option and isinstance(kw.value, ast.Constant):
                names.add(kw.value.value)
            else:
                elsewhere.append(node.lineno)
    return names, elsewhere


def test_only_config_reads_the_environment() -> None:
    found = {}
    for path in modules():
        lines = environment_uses(ast.parse(path.read_text(), str(path)))
        if lines:
            found[str(path.relative_to(REPO_ROOT))] = lines
    assert found == {}, f"read the environment in streams/config.py: {found}"


def test_typer_options_read_only_the_listed_variables() -> None:
    declared: set[str] = set()
    for path in modules():
        names, elsewhere = typer_envvars(ast.parse(path.read_text(), str(path)))
        assert not elsewhere, f"{path}:{elsewhere}: envvar= outside a typer option"
        declared |= names
    assert declared == CLI_OPTION_VARIABLES


def test_the_checks_see_every_form_of_access() -> None:
    source = (
        "import os\nfrom os import getenv\nos.environ.get('A')\nos.getenv('B')\n"
        "os.putenv('C', '1')\nimport typer\ntyper.Option(1, envvar='D')\nf(envvar='E')\n"
        "import os as o\no.environ['F']\n"
    )
    tree = ast.parse(source)
    assert environment_uses(tree) == [2, 3, 4, 5, 10]
    assert typer_envvars(tree) == ({"D"}, [8])
    assert environment_uses(ast.parse((PACKAGE / "config.py").read_text()))  # it does read


def test_a_child_environment_adds_replaces_and_removes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMBILL_TEST_KEEP", "1")
    monkeypatch.setenv("STREAMBILL_TEST_DROP", "1")
    env = child_environment(STREAMBILL_TEST_DROP=None, STREAMBILL_TEST_NEW="2")
    assert env["STREAMBILL_TEST_KEEP"] == "1" and env["STREAMBILL_TEST_NEW"] == "2"
    assert "STREAMBILL_TEST_DROP" not in env
    assert os.environ["STREAMBILL_TEST_DROP"] == "1"  # ours unchanged


def test_environment_is_put_back_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMBILL_PARTITIONS", "3")
    monkeypatch.delenv("STREAMBILL_NAMESPACE", raising=False)
    with pytest.raises(RuntimeError), environment(STREAMBILL_PARTITIONS="5",
                                                  STREAMBILL_NAMESPACE="t."):  # fmt: skip
        assert config.Settings().partitions == 5
        assert config.environment_namespace() == "t."
        raise RuntimeError
    assert config.Settings().partitions == 3
    assert "STREAMBILL_NAMESPACE" not in os.environ
