"""`streambill rate` as a user runs it: a subprocess on files, byte-identical reruns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from streams.config import REPO_ROOT

CATALOG = REPO_ROOT / "deploy" / "demo" / "catalog.json"
EVENTS = [
    {"type": "subscription.created", "timestamp": "2026-01-31T10:00:00Z", "account_id": "a1",
     "subscription_id": "s1", "plan_id": "starter-eur"},
    {"type": "usage", "event_id": "u1", "timestamp": "2026-02-10T00:00:00Z",
     "subscription_id": "s1", "metric": "api_calls", "quantity": "1500"},
    {"type": "usage", "event_id": "u1", "timestamp": "2026-02-10T00:00:00Z",
     "subscription_id": "s1", "metric": "api_calls", "quantity": "1500"},
    {"type": "usage", "event_id": "u2", "timestamp": "2026-02-11T00:00:00Z",
     "subscription_id": "nope", "metric": "api_calls", "quantity": "1"},
]  # fmt: skip


def rate(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in reversed(EVENTS)))
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", "rate", "--catalog", str(CATALOG),
         "--events", str(events), "--until", "2026-03-31T10:00:00Z", *extra],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_rate_prints_sorted_invoices_and_dead_letters(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    result = rate(tmp_path, "--dead-letters", str(dead))
    assert result.returncode == 0, result.stderr
    invoices = [json.loads(line) for line in result.stdout.splitlines()]
    # creation, then Feb 28 10:00 (Jan 31 anchor clamps to Feb 28) and Mar 31 10:00
    assert [i["issued_at"] for i in invoices] == [
        "2026-01-31T10:00:00Z", "2026-02-28T10:00:00Z", "2026-03-31T10:00:00Z",
    ]  # fmt: skip
    feb = invoices[1]
    usage = [ln for ln in feb["lines"] if ln["kind"] == "usage"]
    assert usage[0]["quantity"] == "1500" and usage[0]["amount"] == "3.00"  # u1 counted once
    assert feb["total"] == "12.00"  # 3.00 usage + 9.00 next period in advance
    rejected = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [d["reason"] for d in rejected] == ["unknown subscription"]


def test_rate_is_byte_identical_across_runs(tmp_path: Path) -> None:
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert rate(tmp_path, "--out", str(out1)).returncode == 0
    assert rate(tmp_path, "--out", str(out2)).returncode == 0
    assert out1.read_bytes() == out2.read_bytes() and out1.read_bytes()


def test_rate_rejects_a_bad_catalog(tmp_path: Path) -> None:
    bad = tmp_path / "catalog.json"
    bad.write_text('{"plans": [{"plan_id": "x", "currency": "EUR", "interval": "week"}]}')
    events = tmp_path / "e.jsonl"
    events.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "rate", "--catalog", str(bad), "--events",
         str(events), "--until", "2026-01-01T00:00:00Z"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "invalid catalog" in result.stderr
