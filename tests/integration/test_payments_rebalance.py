"""The payments processor's liveness across a rebalance, on the real broker and the gateway
simulator: a dunning retry partition paused while its attempt is not due yet, revoked and
assigned again (as when the group's session is lost with a broker), must be fetched
again."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from streams.codec import codec
from streams.config import Settings
from streams.domain.payments import idempotency_key, payment_id
from streams.kafka import clients
from streams.kafka.topics import INVOICES, PAYMENT_REQUESTS, PAYMENT_RETRIES, group_id
from streams.processors.payments import GROUP, PaymentsProcessor, make_payments, request_for_invoice
from streams.testbed.bench.harness import Env, committed_lag
from tests.integration.test_payments import invoice, simulator  # noqa: F401 (a fixture)

pytestmark = pytest.mark.kafka


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def payments_worker(
    pipeline_env: Settings,
    kafka_bootstrap: str,
    simulator: Any,  # noqa: F811
) -> Iterator[PaymentsProcessor]:
    """A payments processor running in a thread of this process (its stop flag left out of
    the test run's signal handling), one dunning step, stopped at the end."""
    settings = replace(pipeline_env, gateway_url=simulator.url, dunning="1s",
                       merchant_accounts=("merchant-1", "merchant-2"))  # fmt: skip
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker = make_payments(settings, kafka_bootstrap)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    thread = threading.Thread(target=asyncio.run, args=(worker.run_async(),), daemon=True)
    thread.start()
    yield worker
    worker.stop.set()
    thread.join(60)


def test_a_retry_partition_paused_through_a_rebalance_is_fetched_again(
    pipeline_env: Settings, kafka_bootstrap: str, payments_worker: PaymentsProcessor
) -> None:
    """Retries not due yet pause their partitions. Another member takes the retry
    partitions and leaves them again: the worker forgot the attempts it held there and
    fetches them again, so each is charged once due (the consumer keeps a paused partition
    paused through revocation and reassignment: without a resume it never is)."""
    settings, worker = pipeline_env, payments_worker
    retries = PAYMENT_RETRIES[0].name
    wait_for(lambda: len(worker.consumer.assignment()) > 0, 60, "the assignment")

    # one second attempt per partition of the first retry topic, due in a few seconds
    due = datetime.now(UTC) + timedelta(seconds=15)
    producer = clients.producer(settings, kafka_bootstrap)
    encode_invoice, encode = codec(INVOICES.schema).encode, codec(PAYMENT_REQUESTS.schema).encode
    for p in range(settings.partitions):
        inv = invoice(p, f"tok_ok_{p}")
        request = request_for_invoice(encode_invoice(inv), ("merchant-1", "merchant-2"), due)
        assert request is not None
        request |= {"attempt": 2, "payment_id": payment_id(inv["invoice_id"], 2),
                    "idempotency_key": idempotency_key(inv["invoice_id"], 2),
                    "not_before": due}  # fmt: skip
        producer.produce(retries, key=inv["account_id"].encode(), value=encode(request),
                         partition=p)  # fmt: skip
    assert producer.flush(30) == 0
    wait_for(lambda: len(worker.held) == settings.partitions, 30, "the attempts to be held")

    # another member joins for the retry topic alone: it takes retry partitions ...
    other = clients.consumer(settings, kafka_bootstrap, group_id(GROUP))
    try:
        other.subscribe([retries])

        def taken() -> bool:
            other.consume(100, timeout=0.1)
            return bool(other.assignment())

        wait_for(taken, 60, "the rebalance")
        # revoked while held: dropped with the partitions, before any was due
        assert datetime.now(UTC) < due and len(worker.held) < settings.partitions
    finally:
        other.close()  # ... and leaves: they come back to the worker, paused or not

    env = Env(settings, kafka_bootstrap)
    wait_for(lambda: committed_lag(env, group_id(GROUP), [retries]) == 0, 60,
             "every retry to be charged and committed")  # fmt: skip
    assert worker.completed == settings.partitions
