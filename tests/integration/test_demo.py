"""`streambill demo` beside a real pipeline, twice; `streambill reset`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from rich.console import Console

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.topics import ALL_TOPICS, ensure_topics, namespace, set_namespace


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})  # fmt: skip


def topic_records(settings: Settings, bootstrap: str, ns: str) -> dict[str, int]:
    """Records written to namespace `ns`'s topics (end offsets summed per topic)."""
    admin = clients.admin(settings, bootstrap)
    meta = admin.list_topics(timeout=30).topics
    probe = clients.consumer(settings, bootstrap, f"{ns}streambill-test-probe")
    try:
        return {
            name: sum(high(probe, name, p)
                      for p in meta[name].partitions)
            for t in ALL_TOPICS
            if (name := ns + t.base) in meta
        }  # fmt: skip
    finally:
        probe.close()


def high(probe, topic: str, partition: int) -> int:
    # a just-created topic may answer NOT_LEADER_FOR_PARTITION for a moment
    tp = TopicPartition(topic, partition)
    return clients.retrying(lambda: probe.get_watermark_offsets(tp, timeout=10))[1]


def groups(settings: Settings, bootstrap: str, prefix: str) -> list[str]:
    listed = clients.admin(settings, bootstrap).list_consumer_groups().result()
    return sorted(g.group_id for g in listed.valid if g.group_id.startswith(prefix))


def test_demo_twice_beside_a_pipeline_leaves_it_untouched(pipeline_env: Settings) -> None:
    """The environment names a real pipeline (namespace, home, cluster): the demo runs in
    its own namespace and home, OK both times, and its topics and groups are gone after."""
    bootstrap = pipeline_env.bootstrap_servers
    assert bootstrap
    ns = namespace()
    before = topic_records(pipeline_env, bootstrap, ns)
    assert len(before) == len(ALL_TOPICS)
    demo_namespaces = []
    for run in (1, 2):
        done = cli("demo", "--accounts", "120")
        assert done.returncode == 0, f"run {run}:\n{done.stdout}\n{done.stderr[-3000:]}"
        assert re.search(r"invoices: \d+ \(expected \d+.*\) in [\d.]+ s OK", done.stdout), (
            done.stdout
        )
        # the pipeline's topics got no record, its namespace no group, its home no warehouse
        assert topic_records(pipeline_env, bootstrap, ns) == before
        assert groups(pipeline_env, bootstrap, ns) == []
        assert not (pipeline_env.home / "warehouse").exists()
        assert not (pipeline_env.home / "state").exists()
        assert "configured cluster" in done.stdout and "nothing was started" in done.stdout
        found = re.search(r"namespace (demo-[0-9a-f]+\.)", done.stderr)
        assert found, done.stderr[-2000:]
        demo_namespaces.append(found.group(1))
    assert len(set(demo_namespaces)) == 2
    assert list((pipeline_env.home / "demo").iterdir()) == []  # each run's home removed
    for demo_ns in demo_namespaces:  # nothing of the demo left on the cluster
        assert topic_records(pipeline_env, bootstrap, demo_ns) == {}
        assert groups(pipeline_env, bootstrap, demo_ns) == []


@pytest.mark.parametrize("broker", ["started", "running", "configured"])
def test_demo_says_what_it_left_running(broker: str) -> None:
    from streams.testbed.demo import DemoResult, print_left_running

    console = Console(record=True, width=200)
    result = DemoResult(1, 1, None, None, 1.0, [], "127.0.0.1:19092", broker)  # type: ignore[arg-type]
    print_left_running(console, result)
    text = console.export_text()
    assert ("Left running" in text) is (broker == "started")
    assert ("streambill kafka stop" in text) is (broker != "configured")


def make_pipeline_leftovers(settings: Settings, bootstrap: str) -> str:
    """A group with committed offsets in this namespace, files in the home; a demo's
    namespace left behind by a killed demo (its home dir and its topics)."""
    home = settings.home
    for sub in ("state/rating-0", "logs", "warehouse", "metrics", "api"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "logs" / "sink.log").write_text("{}\n")
    (home / "api" / "tenants.json").write_text("{}")
    consumer = clients.consumer(settings, bootstrap, namespace() + "streambill-rating")
    consumer.commit(offsets=[TopicPartition(ALL_TOPICS[0].name, 0, 0)], asynchronous=False)
    consumer.close()
    demo_ns = f"demo-{os.urandom(4).hex()}."
    (home / "demo" / demo_ns.rstrip(".") / "logs").mkdir(parents=True)
    ours = namespace()
    set_namespace(demo_ns)
    try:
        ensure_topics(clients.admin(settings, bootstrap), settings)
    finally:
        set_namespace(ours)
    return demo_ns


def test_reset_asks_then_wipes_the_installation(pipeline_env: Settings) -> None:
    bootstrap = pipeline_env.bootstrap_servers
    assert bootstrap
    ns = namespace()
    demo_ns = make_pipeline_leftovers(pipeline_env, bootstrap)
    # another pipeline on the same cluster, which reset must not touch
    other = f"t{os.urandom(5).hex()}."
    set_namespace(other)
    try:
        ensure_topics(clients.admin(pipeline_env, bootstrap), pipeline_env)
    finally:
        set_namespace(ns)
    try:
        home = pipeline_env.home
        entries = sorted(p.name for p in home.iterdir())

        declined = cli("reset", stdin="n\n")
        assert declined.returncode == 1, declined.stdout + declined.stderr
        assert "Delete all of this?" in declined.stdout and "Aborted" in declined.stderr
        assert sorted(p.name for p in home.iterdir()) == entries
        assert len(topic_records(pipeline_env, bootstrap, ns)) == len(ALL_TOPICS)

        confirmed = cli("reset", stdin="y\n")
        assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
        assert "reset done" in confirmed.stdout
        assert list(home.iterdir()) == []
        assert topic_records(pipeline_env, bootstrap, ns) == {}
        assert groups(pipeline_env, bootstrap, ns) == []
        assert topic_records(pipeline_env, bootstrap, demo_ns) == {}
        assert len(topic_records(pipeline_env, bootstrap, other)) == len(ALL_TOPICS)
    finally:
        clients.admin(pipeline_env, bootstrap).delete_topics([other + t.base for t in ALL_TOPICS])


def test_reset_yes_skips_the_question(pipeline_env: Settings) -> None:
    (pipeline_env.home / "logs").mkdir(parents=True)
    done = cli("reset", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Delete all of this?" not in done.stdout
    assert list(pipeline_env.home.iterdir()) == []
    assert topic_records(pipeline_env, pipeline_env.bootstrap_servers or "", namespace()) == {}


@pytest.mark.parametrize("recorded_by", ["stack file", "metrics endpoint"])
def test_reset_refuses_while_a_process_runs(pipeline_env: Settings, recorded_by: str) -> None:
    """A live process of the installation (recorded by `streambill up`, or advertising
    its metrics endpoint) stops the reset."""
    from streams.stack import stack_file

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        pipeline_env.home.mkdir(parents=True)
        if recorded_by == "stack file":
            entry = {"name": "rating", "pid": sleeper.pid, "command": ["sleep", "60"]}
            stack_file(pipeline_env).write_text(json.dumps({"processes": [entry]}))
        else:
            metrics = pipeline_env.home / "metrics"
            metrics.mkdir()
            (metrics / f"rating-{sleeper.pid}.json").write_text(json.dumps(
                {"processor": "rating", "pid": sleeper.pid, "url": "http://127.0.0.1:1"}
            ))  # fmt: skip
        entries = sorted(p.name for p in pipeline_env.home.iterdir())
        done = cli("reset", "--yes")
        assert done.returncode == 1
        assert f"rating (pid {sleeper.pid})" in done.stderr and "refused" in done.stderr
        assert sorted(p.name for p in pipeline_env.home.iterdir()) == entries
        assert len(topic_records(pipeline_env, pipeline_env.bootstrap_servers or "",
                                 namespace())) == len(ALL_TOPICS)  # fmt: skip
    finally:
        sleeper.kill()
        sleeper.wait()


def test_reset_stops_and_wipes_the_local_broker_data(tmp_path: Path) -> None:
    """Without a configured cluster, the local broker's data goes (stopped first: here a
    data directory of a broker that is not running, never the suite's shared broker)."""
    home, kafka_dir = tmp_path / "home", tmp_path / "kafka"
    (home / "logs").mkdir(parents=True)
    (kafka_dir / "node-1" / "data").mkdir(parents=True)
    (kafka_dir / "brokers").write_text("1\n")
    env = {"STREAMBILL_HOME": str(home), "STREAMBILL_KAFKA_DIR": str(kafka_dir),
           "KAFKA_BOOTSTRAP_SERVERS": ""}  # fmt: skip
    done = cli("reset", "--yes", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(kafka_dir) in done.stdout
    assert not kafka_dir.exists() and list(home.iterdir()) == []
