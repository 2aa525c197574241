"""`streambill tenant key --revoke KEY_ID` against a running API process: the key is
refused (401) within a second and from then on, the tenant's other clients and other
tenants are not affected, and an unknown key id is an error."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from streams.api.tenants import hash_key, key_id
from streams.config import Settings
from streams.stack import start_api
from tests.integration.helpers import Procs
from tests.integration.test_api import ACME, GLOBEX, Client, signup, write_tenants

pytestmark = pytest.mark.kafka


def tenant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", "tenant", *args],
                          capture_output=True, text=True, timeout=60, env=os.environ)  # fmt: skip


def test_a_revoked_key_is_refused_by_the_running_api(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs
) -> None:
    write_tenants(pipeline_env)
    proc, port = start_api(pipeline_env, kafka_bootstrap)
    procs.add(proc)
    api = Client(port)
    assert api.post("/v1/subscriptions", signup(1)).status_code == 202
    acme_key = key_id(hash_key(ACME))
    listed = tenant("list")
    assert listed.returncode == 0 and acme_key in listed.stdout, listed

    revoked = tenant("key", "--revoke", acme_key)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {acme_key} of tenant acme" in revoked.stderr
    done = time.monotonic()
    while (status := api.post("/v1/subscriptions", signup(2)).status_code) != 401:
        assert status == 202, status
        assert time.monotonic() - done < 1.5, "the API still takes the key"
        time.sleep(0.05)
    assert [api.post("/v1/subscriptions", signup(3)).status_code for _ in range(5)] == [401] * 5
    assert api.post("/v1/subscriptions", signup(1, account="globex-1"), key=GLOBEX).ok

    again = tenant("key", "--revoke", acme_key)
    assert again.returncode == 1 and f"no key '{acme_key}'" in again.stderr, again
    unknown = tenant("key", "acme", "--revoke", "0123456789ab")
    assert unknown.returncode == 1 and "no key '0123456789ab' of tenant acme" in unknown.stderr
    assert proc.alive, proc.tail()
