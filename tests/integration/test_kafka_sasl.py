"""Kafka SASL/SCRAM through configuration: the local broker's SASL_PLAINTEXT listener
(deploy/kafka/kafka.sh, SCRAM-SHA-512, port base + 2) and a user created for this module
with a random password. streambill's own clients and one `streambill` command, configured
only by environment variables, work through it; a wrong password is refused with an
authentication error, in bounded time."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    NewTopic,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from streams.config import Settings
from streams.kafka import clients
from streams.kafka.local import KAFKA_SH
from streams.kafka.topics import group_id, namespace

pytestmark = pytest.mark.kafka


@dataclass(frozen=True)
class ScramUser:
    bootstrap: str  # the SASL_PLAINTEXT listeners
    username: str
    password: str


@pytest.fixture(scope="module")
def scram_user(kafka_bootstrap: str) -> Iterator[ScramUser]:
    """A SCRAM-SHA-512 user on the local broker (created over PLAINTEXT), deleted after."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip(
            "KAFKA_BOOTSTRAP_SERVERS names an external cluster: its SASL listener is unknown "
            "(this test needs the local broker of deploy/kafka/kafka.sh)"
        )
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    sasl = subprocess.run(
        [str(KAFKA_SH), "bootstrap-sasl"], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    host, port = sasl.split(",")[0].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        pytest.fail(
            f"the local broker has no SASL listener on {sasl} ({exc}): it was started before "
            "kafka.sh had one; restart it (deploy/kafka/kafka.sh stop, then start)"
        )
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    user = ScramUser(sasl, f"streambill-test-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(24))
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096)
    upsert = UserScramCredentialUpsertion(user.username, info, user.password.encode())
    for future in admin.alter_user_scram_credentials([upsert], request_timeout=30).values():
        future.result()
    yield user
    deletion = UserScramCredentialDeletion(user.username, ScramMechanism.SCRAM_SHA_512)
    for future in admin.alter_user_scram_credentials([deletion], request_timeout=30).values():
        future.result()


def use_sasl(monkeypatch: pytest.MonkeyPatch, user: ScramUser, password: str) -> None:
    """Configure streambill the way an operator would: environment variables only."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", user.bootstrap)
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", user.username)
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", password)


def test_clients_and_cli_authenticate_with_scram_from_the_environment(
    pipeline_env: Settings, scram_user: ScramUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_sasl(monkeypatch, scram_user, scram_user.password)
    settings = Settings()
    assert settings.bootstrap_servers == scram_user.bootstrap
    assert settings.kafka_security == {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": scram_user.username,
        "sasl.password": scram_user.password,
    }
    bootstrap = settings.bootstrap_servers

    # admin: create a namespaced topic through the SASL listener
    topic = f"{namespace()}sasl-roundtrip"
    admin = clients.admin(settings, bootstrap)
    for future in admin.create_topics([NewTopic(topic, 2)], operation_timeout=30).values():
        future.result()
    deadline = time.monotonic() + 30
    while not all(p.leader >= 0 for p in admin.list_topics(topic, timeout=10).topics[topic]
                  .partitions.values()):  # fmt: skip
        assert time.monotonic() < deadline, "no leaders for the new topic"
        time.sleep(0.2)

    # producer (idempotent, acks=all) and consumer (a group, read_committed)
    sent = {f"account-{i}".encode(): f"value-{i}".encode() for i in range(20)}
    producer = clients.producer(settings, bootstrap)
    for key, value in sent.items():
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0
    consumer = clients.consumer(settings, bootstrap, group_id("sasl-check"))
    received: dict[bytes, bytes] = {}
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(received) < len(sent):
            assert time.monotonic() < deadline, f"consumed {len(received)} of {len(sent)}"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received[msg.key()] = msg.value()
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert received == sent

    # a streambill command in its own process, configured by the same environment
    cli = subprocess.run(
        [sys.executable, "-m", "streams.cli", "lag", "--group", "sasl-check", "--json"],
        capture_output=True, text=True, timeout=120, env=os.environ,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    rows = [r for r in json.loads(cli.stdout) if r.get("topic") == topic]
    assert len(rows) == 2 and all(r["group"] == group_id("sasl-check") for r in rows), cli.stdout
    assert sum(r["committed"] for r in rows) == len(sent) and sum(r["lag"] for r in rows) == 0
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        future.result()


def test_a_wrong_password_is_refused_with_an_authentication_error(
    scram_user: ScramUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_sasl(monkeypatch, scram_user, scram_user.password + "-wrong")
    settings = Settings()
    errors: list[KafkaError] = []
    producer = clients.producer(settings, scram_user.bootstrap, error_cb=errors.append)
    deadline = time.monotonic() + 30
    while not (refused := [e for e in errors if e.code() == KafkaError._AUTHENTICATION]):
        assert time.monotonic() < deadline, f"no authentication error in 30 s: {errors}"
        producer.poll(0.2)
    assert "invalid credentials" in refused[0].str(), refused[0]
    # nothing goes through: a request fails (in bounded time) instead of being answered
    started = time.monotonic()
    with pytest.raises(KafkaException):
        clients.admin(settings, scram_user.bootstrap).list_topics(timeout=5)
    assert time.monotonic() - started < 15
    # and a command says so and fails, rather than showing an empty answer
    cli = subprocess.run([sys.executable, "-m", "streams.cli", "lag", "--json"],
                         capture_output=True, text=True, timeout=120, env=os.environ)  # fmt: skip
    assert cli.returncode != 0 and "KafkaException" in cli.stderr, (cli.stdout, cli.stderr[-2000:])
