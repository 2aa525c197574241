"""What every atheris harness here shares: `python fuzz/<harness>.py [atheris flags]`
fuzzes; `--write-seeds DIR` writes the harness's starting corpus instead."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris


def main(seeds: Callable[[], list[bytes]], test_one_input: Callable[[bytes], None]) -> None:
    if sys.argv[1:2] == ["--write-seeds"]:
        for n, seed in enumerate(seeds()):
            Path(sys.argv[2], f"seed-{n}").write_bytes(seed)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
