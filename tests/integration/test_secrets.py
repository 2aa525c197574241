"""Secrets and card data never reach a log: a full run (API -> rating -> payments ->
refund through the lane -> sink) with every secret set, then every log line of every
process is searched for them and for anything shaped like a card number."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from streams.config import Settings
from tests.integration.helpers import Procs, scalar, wait_until
from tests.integration.test_api import ACME, signup
from tests.integration.test_dashboard import refund_a_paid_invoice, start_billing_stack

pytestmark = pytest.mark.kafka
SECRETS = {
    "STRIPE_API_KEY": "sk_live_51SECRETstripeKEYnever",
    "KAFKA_SASL_PASSWORD": "kafka-SECRET-password-never",
    "KAFKA_SSL_KEY_PASSWORD": "kafka-SECRET-key-password-never",
    "CLICKHOUSE_PASSWORD": "clickhouse-SECRET-password-never",
}
CARD = "4242424242424242"
CARD_SHAPED = re.compile(r"(?<!\d)(?:\d[ -]?){13,19}(?!\d)")


def test_no_secret_and_no_card_number_is_ever_logged(
    pipeline_env: Settings, kafka_bootstrap: str, procs: Procs, simulator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)  # inherited by every process below
    monkeypatch.setenv("STREAMBILL_LOG_LEVEL", "DEBUG")  # the most talkative setting
    settings = pipeline_env
    sink, port = start_billing_stack(settings, kafka_bootstrap, procs, simulator.url)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {ACME}"
    base = f"http://127.0.0.1:{port}"
    refused = api.post(f"{base}/v1/subscriptions", json=signup(0, payment_method=CARD))
    assert refused.status_code == 422 and CARD not in refused.text
    wrong_key = requests.post(f"{base}/v1/subscriptions", json=signup(0),
                              headers={"Authorization": "Bearer sb_acme_guessed"})  # fmt: skip
    assert wrong_key.status_code == 401 and "guessed" not in wrong_key.text
    for n in range(3):
        assert api.post(f"{base}/v1/subscriptions", json=signup(n)).status_code == 202
    wait_until(lambda: scalar(settings, "SELECT count() FROM payment_attempts FINAL") >= 3, 90,
               "payments", [sink])  # fmt: skip
    refund_a_paid_invoice(settings, api, base, sink)
    procs.stop_all()  # every process flushes its last lines

    logs = sorted((settings.home / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"sink", "rating", "payments", "lane-priority", "api"}
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "api listening" in text and "batch landed" in text  # the logs are there
    for name, value in SECRETS.items():
        assert value not in text, f"{name} appears in a log"
    assert ACME not in text and "sb_acme_guessed" not in text
    assert CARD_SHAPED.findall(text) == [], "something shaped like a card number was logged"
