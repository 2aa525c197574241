"""`streambill bench peers`: its parts that need no broker (the reference totals, the
check of a contender's totals against them, where a mismatch fails the run, the figures
and ratios of a round, the peers' Avro reading, the command's registration), and one
small round end to end on the real broker (marked kafka; it makes the peers' venvs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.codec import codec
from streams.config import SCHEMAS_DIR
from streams.kafka.topics import USAGE
from streams.testbed.bench.inputs import encoded_usage
from streams.testbed.bench.peer_common import UsageDecoder, total_key
from streams.testbed.bench.peer_venvs import PEERS, peer_script
from streams.testbed.bench.peers import (
    CONTENDERS,
    TotalsMismatch,
    check_totals,
    contender_figures,
    cpu_seconds,
    merge_worker_totals,
    reference_totals,
    rotated,
    round_metrics,
)


def test_the_reference_adds_up_each_subscriptions_quantities_from_the_encoded_input() -> None:
    subs, per_sub = 7, 3
    items = encoded_usage(subs, per_sub)
    got = reference_totals(items)
    # inputs.encoded_usage: quantity 1 + (i * 7 + j) % 500 for subscription i, event j
    expected = {
        f"sub-{i:08d}|api_calls": Decimal(sum(1 + (i * 7 + j) % 500 for j in range(per_sub)))
        for i in range(subs)
    }
    assert got == expected
    assert sum(got.values()) == sum(codec(USAGE.schema).decode(v)["quantity"] for _, v in items)


def test_equal_totals_pass_whatever_their_scale() -> None:
    reference = {"sub-1|api_calls": Decimal(10), "sub-2|api_calls": Decimal("2.5")}
    check_totals("x", reference, {"sub-1|api_calls": Decimal("10.000000000"),
                                  "sub-2|api_calls": Decimal("2.500")})  # fmt: skip


@pytest.mark.parametrize(
    ("got", "says"),
    [
        ({"a|m": Decimal(10), "b|m": Decimal(21)}, "1 wrong, 0 missing, 0 unexpected"),
        ({"a|m": Decimal(10)}, "0 wrong, 1 missing, 0 unexpected"),
        ({"a|m": Decimal(10), "b|m": Decimal(20), "c|m": Decimal(1)}, "1 unexpected"),
        ({}, "2 missing"),
    ],
)
def test_a_total_wrong_missing_or_unexpected_fails_the_run(
    got: dict[str, Decimal], says: str
) -> None:
    reference = {"a|m": Decimal(10), "b|m": Decimal(20)}
    with pytest.raises(TotalsMismatch, match=re.escape(says)):
        check_totals("faust-streaming", reference, got)


def test_one_event_lost_or_counted_twice_is_caught() -> None:
    items = encoded_usage(50, 4)
    reference = reference_totals(items)
    with pytest.raises(TotalsMismatch, match="1 wrong"):
        check_totals("lost one", reference, reference_totals(items[:-1]))
    with pytest.raises(TotalsMismatch, match="1 wrong"):
        check_totals("twice", reference, reference_totals([*items, items[3]]))


def test_the_workers_totals_merge_and_two_versions_of_one_key_are_a_mismatch() -> None:
    merged = merge_worker_totals("quix", [{"a|m": "1.5"}, {"b|m": "2"}])
    assert merged == {"a|m": Decimal("1.5"), "b|m": Decimal(2)}
    assert merge_worker_totals("quix", [{"a|m": "2"}, {"a|m": "2.000"}]) == {"a|m": Decimal(2)}
    with pytest.raises(TotalsMismatch, match=re.escape("two workers hold a|m (1.5, 1)")):
        merge_worker_totals("quix", [{"a|m": "1.5"}, {"a|m": "1"}])


def contender(events: int, seconds: float, cpu: float) -> dict:
    return contender_figures(events, seconds, cpu)


def test_a_rounds_figures_and_ratios() -> None:
    events = 1_000_000
    results = {
        "streambill": contender(events, 10.0, 8.0),  # 100,000 events/s, 125,000 per CPU-s
        "faust": contender(events, 200.0, 160.0),  # 6,250 per CPU-s
        "quix": contender(events, 40.0, 32.0),  # 31,250 per CPU-s
        "kafka": {"messages": events, "seconds": 4.0, "msgs_per_s": 250_000},
    }
    m = round_metrics(events, 2, 1, results)
    # the contract's names
    contract = ["streambill_events_per_s", "faust_events_per_s", "quix_events_per_s"]
    contract += ["kafka_msgs_per_s", "ratio_vs_faust", "ratio_vs_quix", "ratio_vs_kafka"]
    assert all(name in m for name in contract)
    assert m["streambill_events_per_s"] == 100_000 and m["faust_events_per_s"] == 5_000
    assert m["quix_events_per_s"] == 25_000 and m["kafka_msgs_per_s"] == 250_000
    assert m["streambill_cpu_s_per_m_events"] == 8.0 and m["faust_cpu_s_per_m_events"] == 160.0
    assert m["ratio_vs_faust"] == 20.0  # 125,000 / 6,250 events per CPU-second
    assert m["ratio_vs_quix"] == 4.0  # 125,000 / 31,250
    assert m["ratio_vs_kafka"] == 0.4  # 100,000 events/s over 250,000 msgs/s
    assert m["streambill"]["events_per_cpu_s"] == 125_000
    assert m["totals_match"] is True


def test_the_order_rotates_so_that_each_contender_leads_in_turn() -> None:
    orders = [rotated(CONTENDERS, r) for r in range(len(CONTENDERS))]
    assert orders[0] == list(CONTENDERS)
    assert [o[0] for o in orders] == list(CONTENDERS)
    assert all(sorted(o) == sorted(CONTENDERS) for o in orders)
    assert rotated(CONTENDERS, len(CONTENDERS)) == orders[0]


def test_cpu_seconds_are_read_from_proc_and_grow_with_work() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.2


def test_the_peers_read_the_records_streambill_writes_and_refuse_another_schema() -> None:
    usage = codec(USAGE.schema)
    decode = UsageDecoder(str(SCHEMAS_DIR / f"{USAGE.schema}.avsc"), usage.header.hex())
    items = encoded_usage(20, 3)
    for _key, value in items:
        assert decode(value) == usage.decode(value)
    totals: dict[str, Decimal] = {}
    for _key, value in items:
        event = decode(value)
        totals[total_key(event)] = totals.get(total_key(event), Decimal(0)) + event["quantity"]
    check_totals("peer decoding", reference_totals(items), totals)
    with pytest.raises(ValueError, match="not a usage_event record"):
        decode(b"\xc3\x01" + bytes(8) + items[0][1][10:])


def test_each_peer_is_pinned_and_has_its_program() -> None:
    for peer in PEERS:
        assert all("==" in r for r in peer.requirements), peer.requirements
        assert peer.version in peer.requirements[0]
        assert peer_script(peer).is_file()


def test_bench_peers_is_a_bench_command_with_its_options() -> None:
    from streams.cli import app

    result = CliRunner().invoke(app, ["bench", "peers", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--events", "--json", "--rounds", "--workers", "--peer-workers"):
        assert option in result.output


@pytest.mark.kafka
def test_bench_peers_end_to_end_makes_the_venvs_and_writes_its_contract(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """One small round on the real broker: the peers' venvs made from PyPI in a fresh home,
    every contender's totals checked (the command fails otherwise), the JSON's figures."""
    out = tmp_path / "peers.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "STREAMBILL_HOME": str(tmp_path / "home")}  # fmt: skip
    env.pop("STREAMBILL_NAMESPACE", None)
    done = subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", "peers", "--events", "20000",
         "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["scenario"] == "peers" and report["provenance"]["command"]
    assert report["params"]["events"] == 20000 and report["params"]["rounds"] == 1
    m = report["metrics"]
    assert m["events"] == 20000 and m["totals_match"] is True
    contract = ["streambill_events_per_s", "faust_events_per_s", "quix_events_per_s"]
    contract += ["kafka_msgs_per_s", "ratio_vs_faust", "ratio_vs_quix", "ratio_vs_kafka"]
    assert all(m[name] > 0 for name in contract), m
    for peer in PEERS:
        assert m[peer.name]["version"] == peer.version
        assert m[peer.name]["events_applied"] >= 20000
        assert (tmp_path / "home" / "bench" / "venvs" / peer.label / "bin" / "python").exists()
    assert m["kafka"]["messages"] == 20000
