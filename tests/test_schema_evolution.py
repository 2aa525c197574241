"""Schema evolution (the rule is in schemas/history/README.md): every kept version of a
schema is readable by today's schema, and every version git ever held is kept.

Two independent checks of each (today's schema, kept version) pair: Avro's resolution
rules (the ``avro`` package's checker) and fastavro actually decoding records written
with the kept version under today's schema. The git check follows renames and fails on
any git error (an exported tree without history cannot prove anything).
"""

from __future__ import annotations

import copy
import io
import json
import random
import re
import subprocess
from pathlib import Path

import fastavro
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from avro.schema import parse as parse_avro
from fastavro.schema import parse_schema
from fastavro.utils import generate_many

from streams.codec import schema_fingerprint
from streams.config import REPO_ROOT, SCHEMAS_DIR

HISTORY = SCHEMAS_DIR / "history"
KEPT_NAME = re.compile(r"^(?P<name>[a-z_]+)\.(?P<n>[1-9][0-9]*)\.avsc$")
CURRENT = sorted(p.stem for p in SCHEMAS_DIR.glob("*.avsc"))
SAMPLES = 200  # records written with each kept version


def retired(history: Path = HISTORY) -> dict[str, dict[str, str]]:
    """Subjects ended by an incompatible change: name -> successor, why, migration."""
    return json.loads((history / "retired.json").read_text())


def kept(name: str, history: Path = HISTORY) -> list[Path]:
    """The kept versions of a schema, oldest first (``<name>.<n>.avsc``)."""
    found = [(m, p) for p in history.iterdir() if (m := KEPT_NAME.match(p.name))]
    return [p for m, p in sorted(found, key=lambda x: int(x[0]["n"])) if m["name"] == name]


def fingerprint(text: str) -> bytes:
    return schema_fingerprint(parse_schema(json.loads(text)))


# --- reading old data ---------------------------------------------------------------


def resolution_problems(reader: dict, writer: dict) -> list[str]:
    """Why a reader of `reader` cannot read data written with `writer` ([] if it can)."""
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        parse_avro(json.dumps(reader)), parse_avro(json.dumps(writer))
    )
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    return [f"Avro resolution rules: {m}" for m in sorted(result.messages)]


def decoding_problems(reader: dict, writer: dict, samples: int = SAMPLES) -> list[str]:
    """Records generated for `writer` (fastavro's generator, seeded), written with it and
    read back under `reader`: every one must decode, consume its bytes, keep each field
    both schemas have, and give each field only the reader has its default."""
    writer_parsed = parse_schema(copy.deepcopy(writer))
    reader_parsed = parse_schema(copy.deepcopy(reader))
    state = random.getstate()
    random.seed(f"{writer['name']}:{len(writer['fields'])}")
    try:
        records = list(generate_many(writer, samples))
    finally:
        random.setstate(state)
    written = {f["name"] for f in writer["fields"]}
    defaults = [f["name"] for f in reader["fields"] if f["name"] not in written]
    for record in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer_parsed, record)
        data = buf.getvalue()
        as_written = fastavro.schemaless_reader(io.BytesIO(data), writer_parsed, None)
        buf = io.BytesIO(data)
        try:
            got = fastavro.schemaless_reader(buf, writer_parsed, reader_parsed)
        except Exception as exc:  # fastavro raises several types for a failed resolution
            return [f"fastavro cannot read {record!r}: {type(exc).__name__}: {exc}"]
        if buf.tell() != len(data):
            return [f"{len(data) - buf.tell()} bytes left unread of {record!r}"]
        changed = [k for k in got if k in as_written and got[k] != as_written[k]]
        missing = [k for k in defaults if k not in got]
        if changed or missing:
            return [f"{record!r} read back with fields {changed} changed, {missing} not defaulted"]
    return []


def evolution_problems(reader: dict, writer: dict) -> list[str]:
    return resolution_problems(reader, writer) + decoding_problems(reader, writer)


@pytest.mark.parametrize("name", CURRENT)
def test_today_s_schema_reads_every_kept_version(name: str) -> None:
    current = json.loads((SCHEMAS_DIR / f"{name}.avsc").read_text())
    for old in kept(name):
        problems = evolution_problems(current, json.loads(old.read_text()))
        assert not problems, f"{name}.avsc cannot read data written with {old.name}: {problems}"


def test_the_checks_refuse_a_field_without_a_default_and_accept_it_with_one() -> None:
    """Both checks can fail: a new required field cannot be read from old data."""
    old = json.loads((SCHEMAS_DIR / "usage_event.avsc").read_text())
    new = copy.deepcopy(old)
    new["fields"].append({"name": "unit", "type": "string"})
    assert resolution_problems(new, old) and decoding_problems(new, old, samples=5)
    new["fields"][-1]["default"] = "unit"
    assert evolution_problems(new, old) == []


def test_the_checks_refuse_a_type_with_no_promotion() -> None:
    """double -> decimal bytes (the alert schema's change): no Avro promotion exists."""
    old = json.loads((HISTORY / "alert_event.1.avsc").read_text())
    new = json.loads((SCHEMAS_DIR / "alert.avsc").read_text())
    assert resolution_problems(new, old) and decoding_problems(new, old, samples=5)


def test_history_holds_numbered_versions_of_known_subjects() -> None:
    subjects = retired()
    for name, entry in subjects.items():
        assert name not in CURRENT, f"{name} is retired but schemas/{name}.avsc exists"
        assert entry["successor"] in CURRENT and entry["migration"], name
    for path in HISTORY.iterdir():
        if path.name in ("README.md", "retired.json"):
            continue
        m = KEPT_NAME.match(path.name)
        assert m, f"schemas/history/{path.name}: expected <schema>.<n>.avsc"
        assert m["name"] in CURRENT or m["name"] in subjects, f"{path.name}: unknown schema"
    for name in [*CURRENT, *subjects]:
        numbers = [int(KEPT_NAME.match(p.name)["n"]) for p in kept(name)]  # type: ignore[index]
        assert numbers == list(range(1, len(numbers) + 1)), f"{name}: versions {numbers}"


# --- every version git ever held is kept ----------------------------------------------


def _git(repo: Path, *args: str) -> str:
    """git's output; any failure (no git, no repository, a bad object) raises."""
    run = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({run.returncode}): {run.stderr}")
    return run.stdout


def git_lineage(repo: Path, rel: str) -> list[tuple[str, str, str]]:
    """(commit, path at that commit, text) of every committed version of a file, newest
    first, following renames. A shallow clone holds only part of the history: that
    raises too, rather than check part of it."""
    if _git(repo, "rev-parse", "--is-shallow-repository").strip() != "false":
        raise RuntimeError(f"{repo} is a shallow clone: its schema history is incomplete")
    out = _git(repo, "log", "--follow", "--format=%x00%H", "--name-only", "--", rel)
    versions = []
    for entry in out.split("\0")[1:]:
        commit, *paths = entry.split()
        if not paths:
            raise RuntimeError(f"git log named no path for {rel} at {commit}")
        versions.append((commit, paths[-1], _git(repo, "show", f"{commit}:{paths[-1]}")))
    if not versions:
        raise RuntimeError(f"git has no version of {rel}: is it committed?")
    return versions


def versions_not_kept(
    name: str, lineage: list[tuple[str, str, str]], schemas: Path, history: Path
) -> list[str]:
    """The versions in `lineage` that neither today's schema nor schemas/history holds:
    a version under an earlier name is kept as this schema's, or as a retired subject's
    whose successor this schema is."""
    subjects = retired(history)
    ours = {fingerprint((schemas / f"{name}.avsc").read_text())}
    ours |= {fingerprint(p.read_text()) for p in kept(name, history)}
    missing = []
    for commit, path, text in lineage:
        found = ours
        old_name = Path(path).stem
        if old_name != name and subjects.get(old_name, {}).get("successor") == name:
            found = ours | {fingerprint(p.read_text()) for p in kept(old_name, history)}
        if fingerprint(text) not in found:
            missing.append(f"{path} at {commit[:10]}")
    return missing


@pytest.mark.parametrize("name", CURRENT)
def test_every_committed_version_is_kept(name: str) -> None:
    rel = (SCHEMAS_DIR / f"{name}.avsc").relative_to(REPO_ROOT).as_posix()
    lineage = git_lineage(REPO_ROOT, rel)
    missing = versions_not_kept(name, lineage, SCHEMAS_DIR, HISTORY)
    assert not missing, (
        f"{name}.avsc: committed versions not kept in schemas/history/: {missing} "
        f"(copy each to schemas/history/{name}.<n>.avsc)"
    )


def test_the_alert_schema_s_renamed_predecessor_is_followed() -> None:
    """git's history of alert.avsc goes back through the rename from alert_event.avsc."""
    lineage = git_lineage(REPO_ROOT, "schemas/alert.avsc")
    assert "schemas/alert_event.avsc" in {path for _, path, _ in lineage}


def _commit(repo: Path, message: str) -> None:
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", message)


def test_a_renamed_schema_s_old_version_must_be_kept(tmp_path: Path) -> None:
    """A rename with a change: the old name's version is found, and required."""
    schemas, history = tmp_path / "schemas", tmp_path / "schemas" / "history"
    history.mkdir(parents=True)
    (history / "retired.json").write_text("{}")
    old = json.loads((SCHEMAS_DIR / "usage_event.avsc").read_text())
    _git(tmp_path, "init", "-q")
    (schemas / "metered.avsc").write_text(json.dumps(old, indent=1))
    _commit(tmp_path, "metered")
    new = copy.deepcopy(old)
    new["fields"].append({"name": "unit", "type": "string", "default": "each"})
    (schemas / "metered.avsc").rename(schemas / "usage.avsc")
    (schemas / "usage.avsc").write_text(json.dumps(new, indent=1))
    _commit(tmp_path, "renamed, with a field more")
    lineage = git_lineage(tmp_path, "schemas/usage.avsc")
    assert [path for _, path, _ in lineage] == ["schemas/usage.avsc", "schemas/metered.avsc"]
    assert versions_not_kept("usage", lineage, schemas, history) == [
        f"schemas/metered.avsc at {lineage[1][0][:10]}"
    ]
    (history / "usage.1.avsc").write_text(json.dumps(old))
    assert versions_not_kept("usage", lineage, schemas, history) == []


def test_a_git_failure_fails(tmp_path: Path) -> None:
    """No repository (an exported tree): the check raises, it does not pass empty."""
    with pytest.raises(RuntimeError, match="failed"):
        git_lineage(tmp_path, "schemas/alert.avsc")
