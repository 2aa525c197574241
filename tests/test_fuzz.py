"""The atheris fuzz harnesses in fuzz/, run for a bounded number of iterations from a
starting corpus of valid records: a finding (an exception other than the documented
refusal) makes the harness exit non-zero with the input that caused it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streams.config import REPO_ROOT

RUNS = 20_000


@pytest.mark.parametrize("harness", ["fuzz_decoders.py", "fuzz_api_records.py"])
def test_fuzz_harness_finds_nothing(harness: str, tmp_path: Path) -> None:
    script = REPO_ROOT / "fuzz" / harness
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    subprocess.run([sys.executable, str(script), "--write-seeds", str(corpus)], check=True)
    assert len(list(corpus.iterdir())) >= 4
    run = subprocess.run(
        [sys.executable, str(script), f"-atheris_runs={RUNS}", f"-artifact_prefix={tmp_path}/",
         str(corpus)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert f"Done {RUNS} " in output, output[-2000:]
    assert not list(tmp_path.glob("crash-*"))
