"""The gateway simulator, served for real (in this process, or as `streambill gateway
serve`), driven through the real SimulatorGateway client: no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from streams.httpclient import ServerDisconnected
from streams.metrics import LATE_LOOKUPS
from streams.payments.control import AnswerTimeout
from streams.payments.gateway import (
    ChargeOutcome,
    ChargeRequest,
    RateLimited,
    RefundRequest,
    TransientError,
)
from streams.payments.http_gateway import (
    DECLINE_CODES,
    MAX_LATE_LOOKUPS,
    SimulatorGateway,
    decline_code_for,
    fetch_config,
    fetch_ledger,
    fetch_stats,
    set_outage,
)
from streams.testbed.gateway_simulator import (
    AccountConfig,
    GatewaySimulator,
    Latency,
    SimulatorConfig,
    SimulatorProcess,
    SimulatorServer,
    default_accounts,
)

FAST = AccountConfig(
    latency_median_ms=1, latency_p99_ms=2, refund_latency_median_ms=1, refund_latency_p99_ms=2,
    decline_rate=0.0,
)  # fmt: skip


def config(**account: Any) -> SimulatorConfig:
    return SimulatorConfig(accounts=default_accounts(2, replace(FAST, **account)), seed=7)


@dataclass
class Served:
    url: str
    gateway: SimulatorGateway
    sim: GatewaySimulator

    async def post(
        self, path: str, body: dict[str, Any] | bytes, key: str | None = None
    ) -> tuple[int, Any, bytes]:
        """A raw request, to check statuses and headers the client maps to exceptions."""
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url + path, data=data, headers=headers) as resp,
        ):
            return resp.status, resp.headers, await resp.read()

    async def ledger(self, account: str | None = None) -> list[dict[str, Any]]:
        return await fetch_ledger(self.url, account)


@contextlib.asynccontextmanager
async def served(cfg: SimulatorConfig, timeout_s: float = 5.0) -> AsyncIterator[Served]:
    server = await SimulatorServer(cfg).start("127.0.0.1", 0)
    try:
        gateway = SimulatorGateway(server.url, timeout_s=timeout_s)
        try:
            yield Served(server.url, gateway, server.sim)
        finally:
            await gateway.close()
    finally:
        await server.close()


def run(
    cfg: SimulatorConfig, scenario: Callable[[Served], Awaitable[None]], timeout_s: float = 5.0
) -> None:
    async def main() -> None:
        async with served(cfg, timeout_s) as s:
            await scenario(s)

    asyncio.run(main())


def charge(
    key: str, token: str = "tok_ok_1", amount: str = "10.00", currency: str = "USD",
    account: str = "merchant-1", invoice: str = "inv-1",
) -> ChargeRequest:  # fmt: skip
    return ChargeRequest(account, key, invoice, "acct-1", Decimal(amount), currency, token)


def refund(
    key: str, charge_ref: str | None, amount: str, currency: str = "USD",
    account: str = "merchant-1",
) -> RefundRequest:  # fmt: skip
    return RefundRequest(account, key, charge_ref or "ch_nope", "inv-1", Decimal(amount), currency)


CHARGE_BODY = {"invoice_id": "inv-1", "account_id": "acct-1", "amount": "10.00",
               "currency": "USD", "payment_method": "tok_ok_1"}  # fmt: skip
CHARGES = "/v1/accounts/merchant-1/charges"


# --- outcomes ----------------------------------------------------------------------------


def test_declines_are_decided_by_the_card_token() -> None:
    async def scenario(s: Served) -> None:
        ok = await s.gateway.charge(charge("k-ok", token="tok_ok_visa"))
        assert ok.status == "succeeded" and ok.decline_code is None
        assert ok.reference and ok.reference.startswith("ch_")
        declined = await s.gateway.charge(charge("k-decline", token="tok_decline_x"))
        assert declined == ChargeOutcome("declined", declined.reference, "insufficient_funds")
        seen = set()
        for i in range(40):
            token = f"tok_card_{i}"
            first = await s.gateway.charge(charge(f"a-{i}", token=token))
            again = await s.gateway.charge(charge(f"b-{i}", token=token))  # another key
            assert first.decline_code == again.decline_code == decline_code_for(token, 0.5)
            assert first.status == ("declined" if first.decline_code else "succeeded")
            assert first.reference != again.reference  # two charges, same verdict
            seen.add(first.decline_code)
        assert None in seen and seen - {None} <= set(DECLINE_CODES) and len(seen) > 1

    run(config(decline_rate=0.5), scenario)


def test_decline_rule_is_a_pure_function_of_the_token() -> None:
    assert decline_code_for("tok_ok_anything", 1.0) is None
    assert decline_code_for("tok_decline_anything", 0.0) == "insufficient_funds"
    assert decline_code_for("tok_x", 0.0) is None and decline_code_for("tok_x", 1.0)
    rate = sum(decline_code_for(f"tok_{i}", 0.05) is not None for i in range(20_000)) / 20_000
    assert 0.04 < rate < 0.06


# --- idempotency -------------------------------------------------------------------------


def test_a_repeated_key_replays_the_first_outcome_without_a_second_charge() -> None:
    async def scenario(s: Served) -> None:
        status, headers, first = await s.post(CHARGES, CHARGE_BODY, key="k1")
        assert status == 200 and "Idempotent-Replayed" not in headers
        status, headers, second = await s.post(CHARGES, CHARGE_BODY, key="k1")
        assert status == 200 and headers["Idempotent-Replayed"] == "true"
        assert second == first  # the same body, byte for byte
        body = orjson.loads(first)
        assert body["idempotency_key"] == "k1" and body["amount"] == "10.00"
        again = await s.gateway.charge(charge("k1"))
        assert again.reference == body["id"]
        assert [e["id"] for e in await s.ledger()] == [body["id"]]
        stats = (await fetch_stats(s.url))["accounts"]["merchant-1"]
        assert stats["charges"] == 1 and stats["replays"] == 2

    run(config(), scenario)


def test_a_key_reused_with_other_parameters_is_refused_with_422() -> None:
    async def scenario(s: Served) -> None:
        first = await s.gateway.charge(charge("k1", amount="10.00"))
        with pytest.raises(ValueError, match="different parameters"):
            await s.gateway.charge(charge("k1", amount="11.00"))
        status, _, _ = await s.post(CHARGES, {**CHARGE_BODY, "payment_method": "tok_2"}, "k1")
        assert status == 422
        with pytest.raises(ValueError, match="different parameters"):  # a refund's key too
            await s.gateway.refund(refund("k1", first.reference, "1.00"))
        # the same key on another merchant account is another key
        assert (await s.gateway.charge(charge("k1", account="merchant-2"))).status == "succeeded"
        assert len(await s.ledger("merchant-1")) == 1

    run(config(), scenario)


def test_a_key_still_in_progress_is_409_then_replays_once_recorded() -> None:
    async def scenario(s: Served) -> None:
        first = asyncio.create_task(s.gateway.charge(charge("k1")))
        await asyncio.sleep(0.1)
        status, _, body = await s.post(CHARGES, CHARGE_BODY, key="k1")
        assert status == 409 and b"in progress" in body
        with pytest.raises(TransientError):
            await s.gateway.charge(charge("k1"))
        with pytest.raises(TransientError):
            await s.gateway.lookup("merchant-1", "k1")
        outcome = await first
        assert await s.gateway.charge(charge("k1")) == outcome
        assert await s.gateway.lookup("merchant-1", "k1") == outcome
        assert len(await s.ledger()) == 1

    run(config(latency_median_ms=300, latency_p99_ms=300), scenario)


# --- limits ------------------------------------------------------------------------------


def test_too_many_concurrent_requests_get_429_with_retry_after() -> None:
    async def scenario(s: Served) -> None:
        results = await asyncio.gather(
            *(s.gateway.charge(charge(f"k{i}", invoice=f"inv-{i}")) for i in range(10)),
            return_exceptions=True,
        )
        limited = [r for r in results if isinstance(r, RateLimited)]
        assert len(limited) == 8, results
        assert all(r.retry_after == pytest.approx(0.2) for r in limited)  # Retry-After-Ms
        assert sum(isinstance(r, ChargeOutcome) for r in results) == 2

        busy = [asyncio.create_task(s.gateway.charge(charge(f"b{i}"))) for i in range(2)]
        await asyncio.sleep(0.05)
        status, headers, _ = await s.post(CHARGES, CHARGE_BODY, key="raw")
        assert status == 429 and headers["Retry-After"] == "1"
        assert headers["Retry-After-Ms"] == "200"
        await asyncio.gather(*busy)
        stats = (await fetch_stats(s.url))["accounts"]["merchant-1"]
        assert stats["max_in_flight_seen"] == 2 and stats["rejected_429"] == 9
        assert stats["charges"] == 4 and len(await s.ledger()) == 4  # 429s record nothing

    run(config(max_concurrency=2, latency_median_ms=200, latency_p99_ms=200), scenario)


def test_the_requests_per_minute_limit_answers_429_until_the_window_frees() -> None:
    async def scenario(s: Served) -> None:
        for i in range(3):
            await s.gateway.charge(charge(f"k{i}"))
        with pytest.raises(RateLimited) as limited:
            await s.gateway.charge(charge("k3"))
        assert 58 < limited.value.retry_after <= 60
        status, headers, _ = await s.post(CHARGES, CHARGE_BODY, key="k4")
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
        assert await s.gateway.charge(charge("k0", account="merchant-2"))  # per account

    run(config(rpm_limit=3), scenario)


# --- faults ------------------------------------------------------------------------------


def test_transient_failures_and_retries_never_charge_twice() -> None:
    async def scenario(s: Served) -> None:
        # kinds come round robin: unavailable, dropped, delayed
        with pytest.raises(TransientError, match="503") as unavailable:
            await s.gateway.charge(charge("k1"))
        assert unavailable.value.__cause__ is None
        assert await s.gateway.lookup("merchant-1", "k1") is None  # nothing recorded

        with pytest.raises(TransientError) as dropped:
            await s.gateway.charge(charge("k2"))
        assert isinstance(dropped.value.__cause__, ServerDisconnected)

        started = time.monotonic()
        with pytest.raises(TransientError) as delayed:
            await s.gateway.charge(charge("k3"))
        assert isinstance(delayed.value.__cause__, TimeoutError)
        assert time.monotonic() - started < 0.9  # the client gave up before the answer

        # retries with the same keys get the recorded outcomes, and no second charge
        for key in ("k2", "k3"):
            recorded = await s.gateway.lookup("merchant-1", key)
            assert recorded is not None and recorded.status == "succeeded"
            assert await s.gateway.charge(charge(key)) == recorded
        ledger = await s.ledger()
        assert [e["idempotency_key"] for e in ledger] == ["k2", "k3"]
        stats = (await fetch_stats(s.url))["accounts"]["merchant-1"]
        assert stats["transient_injected"] == 3 and stats["charges"] == 2

    run(config(transient_rate=1.0, timeout_delay_s=1.0), scenario, timeout_s=0.3)


def usual_answers(s: Served, seconds: float) -> AnswerTimeout:
    """merchant-1's recent answers all took `seconds`."""
    usual = AnswerTimeout(ceiling=s.gateway.timeout_s)
    for _ in range(300):
        usual.on_answer(seconds)
    s.gateway.answer_timeouts["merchant-1"] = usual
    return usual


def late_lookups(found: bool) -> float:
    return LATE_LOOKUPS.labels("merchant-1", str(found).lower())._value.get()


def test_an_answer_that_does_not_come_is_asked_again_after_the_accounts_usual_wait() -> None:
    """The wait for a charge's answer follows the account's recent answers (3 x p99,
    at least 1 s), not the configured 5 s: a delayed answer is retried after ~1 s.
    (The late lookup by key, which would find it sooner, is held at its cap here.)"""

    async def scenario(s: Served) -> None:
        usual = usual_answers(s, 0.01)
        s.gateway._late_lookups["merchant-1"] = MAX_LATE_LOOKUPS  # all in use
        assert usual.seconds == 1.0
        for key in ("k1", "k2"):  # unavailable, dropped
            with pytest.raises(TransientError):
                await s.gateway.charge(charge(key))
        started = time.monotonic()
        with pytest.raises(TransientError) as delayed:
            await s.gateway.charge(charge("k3"))
        waited = time.monotonic() - started
        assert isinstance(delayed.value.__cause__, TimeoutError)
        assert 0.9 < waited < 2.5  # not the configured 5 s
        assert usual.seconds == 2.0  # backed off: the next wait is longer
        recorded = await s.gateway.charge(charge("k3"))  # the same key: what was recorded
        assert recorded.status == "succeeded"
        assert usual.seconds == 1.0  # an answer in time: back to the usual wait
        assert [e["idempotency_key"] for e in await s.ledger()] == ["k2", "k3"]

    run(config(transient_rate=1.0, timeout_delay_s=6.0), scenario, timeout_s=5.0)


def test_a_late_answer_is_found_by_its_key_while_the_call_is_still_open() -> None:
    """Past the account's p99 the key is looked up beside the open call: an outcome
    recorded whose answer is stuck ends the wait at once (no time-out, no second charge
    request), and a retry with the key gets the same outcome."""

    async def scenario(s: Served) -> None:
        usual_answers(s, 0.05)
        for key in ("k1", "k2"):  # unavailable, dropped
            with pytest.raises(TransientError):
                await s.gateway.charge(charge(key))
        found_before = late_lookups(True)
        started = time.monotonic()
        outcome = await s.gateway.charge(charge("k3"))  # answered 6 s late
        waited = time.monotonic() - started
        assert outcome.status == "succeeded" and outcome.reference
        assert waited < 0.5  # not the 1 s time-out, let alone the 6 s answer
        assert late_lookups(True) == found_before + 1
        assert await s.gateway.charge(charge("k3")) == outcome
        assert [e["idempotency_key"] for e in await s.ledger()] == ["k2", "k3"]
        stats = (await fetch_stats(s.url))["accounts"]["merchant-1"]
        assert stats["charges"] == 2 and stats["conflicts_409"] == 0

    run(config(transient_rate=1.0, timeout_delay_s=6.0), scenario, timeout_s=5.0)


def test_a_slow_charge_still_in_progress_keeps_its_call_when_looked_up() -> None:
    """A late charge that the gateway is still working on (the lookup says 409) is not
    abandoned: its own answer ends the wait."""

    async def scenario(s: Served) -> None:
        usual_answers(s, 0.02)
        not_found_before = late_lookups(False)
        started = time.monotonic()
        outcome = await s.gateway.charge(charge("slow"))
        assert outcome.status == "succeeded"
        assert 0.25 < time.monotonic() - started < 1.0
        assert late_lookups(False) == not_found_before + 1
        stats = (await fetch_stats(s.url))["accounts"]["merchant-1"]
        assert stats["requests"] == 1 and stats["charges"] == 1 and stats["replays"] == 0

    run(config(latency_median_ms=300, latency_p99_ms=301), scenario, timeout_s=5.0)


def test_an_outage_fails_every_request_until_it_ends() -> None:
    async def scenario(s: Served) -> None:
        assert (await set_outage(s.url, 0.4, "merchant-1"))["accounts"] == ["merchant-1"]
        with pytest.raises(TransientError, match="503"):
            await s.gateway.charge(charge("k1"))
        with pytest.raises(TransientError, match="503"):
            await s.gateway.refund(refund("r1", None, "1.00"))
        assert (await s.gateway.charge(charge("k1", account="merchant-2"))).status == "succeeded"
        await asyncio.sleep(0.45)
        assert (await s.gateway.charge(charge("k1"))).status == "succeeded"

        await set_outage(s.url, 60)  # every account
        for account in ("merchant-1", "merchant-2"):
            with pytest.raises(TransientError):
                await s.gateway.charge(charge("k2", account=account))
        await set_outage(s.url, 0)  # ends it
        assert (await s.gateway.charge(charge("k2", account="merchant-2"))).status == "succeeded"
        with pytest.raises(ValueError, match="unknown merchant account"):
            await set_outage(s.url, 1, "nope")
        stats = (await fetch_stats(s.url))["accounts"]
        assert stats["merchant-1"]["rejected_outage"] == 3
        assert len(await s.ledger()) == 3

    run(config(), scenario)


# --- refunds -----------------------------------------------------------------------------


def test_refunds_full_partial_over_unknown_and_idempotent() -> None:
    async def scenario(s: Served) -> None:
        gw = s.gateway
        full = await gw.charge(charge("c1", amount="100.00"))
        out = await gw.refund(refund("r1", full.reference, "100.00"))
        assert out.status == "refunded" and out.reference and out.reference.startswith("re_")
        over = await gw.refund(refund("r2", full.reference, "0.01"))
        assert (over.status, over.reason) == ("rejected", "amount_exceeds_remaining")

        part = await gw.charge(charge("c2", amount="50.00"))
        assert (await gw.refund(refund("r3", part.reference, "20.00"))).status == "refunded"
        replay = await gw.refund(refund("r3", part.reference, "20.00"))  # same key: no money
        assert (await gw.refund(refund("r4", part.reference, "30.00"))).status == "refunded"
        assert (await gw.refund(refund("r5", part.reference, "0.01"))).reason == (
            "amount_exceeds_remaining"
        )
        assert replay.status == "refunded"

        unknown = await gw.refund(refund("r6", "ch_unknown", "1.00"))
        assert (unknown.status, unknown.reason) == ("rejected", "unknown_charge")
        other = await gw.refund(refund("r7", part.reference, "1.00", account="merchant-2"))
        assert other.reason == "unknown_charge"  # charges belong to one merchant account
        declined = await gw.charge(charge("c3", token="tok_decline"))
        assert (await gw.refund(refund("r8", declined.reference, "1.00"))).reason == (
            "charge_not_succeeded"
        )
        euro = await gw.refund(refund("r9", full.reference, "1.00", currency="EUR"))
        assert euro.reason == "currency_mismatch"

        refunds = [e for e in await s.ledger() if e["kind"] == "refund"]
        # every refund recorded once (r3's replay added nothing), rejected ones included
        assert [e["idempotency_key"] for e in refunds] == [f"r{i}" for i in range(1, 10)]
        by_key = {e["idempotency_key"]: e for e in refunds}
        refunded = sum(Decimal(e["amount"]) for e in refunds if e["status"] == "refunded")
        assert refunded == Decimal("150.00")
        assert by_key["r3"]["charge_id"] == part.reference and by_key["r3"]["reason"] is None

    run(config(), scenario)


# --- ledger, stats and bad requests ------------------------------------------------------


def test_the_ledger_lists_every_recorded_entry_in_order() -> None:
    async def scenario(s: Served) -> None:
        a = await s.gateway.charge(charge("k1", amount="12.50", invoice="inv-a"))
        b = await s.gateway.charge(charge("k2", token="tok_decline", account="merchant-2"))
        r = await s.gateway.refund(refund("k3", a.reference, "2.50"))
        ledger = await s.ledger()
        assert [e["id"] for e in ledger] == [a.reference, b.reference, r.reference]
        first, second, third = ledger
        assert first == {
            "kind": "charge", "id": a.reference, "merchant_account": "merchant-1",
            "idempotency_key": "k1", "invoice_id": "inv-a", "amount": "12.50",
            "currency": "USD", "status": "succeeded", "decline_code": None,
            "payment_method": "tok_ok_1", "at": first["at"],
        }  # fmt: skip
        assert first["at"].endswith("Z") and datetime.fromisoformat(first["at"]).tzinfo
        assert second["status"] == "declined" and second["decline_code"] == "insufficient_funds"
        assert third["kind"] == "refund" and third["charge_id"] == a.reference
        assert third["status"] == "refunded" and third["reason"] is None
        assert [e["id"] for e in await s.ledger("merchant-2")] == [b.reference]
        with pytest.raises(ValueError, match="unknown merchant account"):
            await s.ledger("nope")
        stats = await fetch_stats(s.url)
        assert stats["ledger_entries"] == 3
        one = stats["accounts"]["merchant-1"]
        assert (one["requests"], one["charges"], one["refunds"], one["in_flight"]) == (2, 1, 1, 0)
        assert stats["accounts"]["merchant-2"]["declines"] == 1
        # what a checker needs to predict each decline: the configuration, and the token
        assert await fetch_config(s.url) == s.sim.config.to_dict()

    run(config(), scenario)


def test_the_growing_ledger_is_kept_out_of_the_cyclic_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every FREEZE_EVERY ledger entries what is tracked is frozen: a full collection no
    longer walks every charge recorded (it stalled every request in flight, refunds
    included, for ~200 ms at 1M charges); the pauses the simulator had are in its stats."""
    import gc

    from streams.testbed import gateway_simulator as simulator

    monkeypatch.setattr(simulator, "FREEZE_EVERY", 5)
    simulator.GC_PAUSES.install()
    freezes = []
    real_freeze = gc.freeze

    def freeze() -> None:
        freezes.append(len(freezes))
        real_freeze()

    monkeypatch.setattr(gc, "freeze", freeze)

    async def scenario(s: Served) -> None:
        gc.unfreeze()
        for i in range(4):
            await s.gateway.charge(charge(f"k{i}", invoice=f"inv-{i}"))
        assert not freezes and gc.get_freeze_count() == 0
        await s.gateway.charge(charge("k4", invoice="inv-4"))  # the 5th entry
        assert len(freezes) == 1 and gc.get_freeze_count() > 0
        for i in range(5, 9):
            await s.gateway.charge(charge(f"k{i}", invoice=f"inv-{i}"))
        assert len(freezes) == 1  # not again before the 10th
        await s.gateway.charge(charge("k9", invoice="inv-9"))
        assert len(freezes) == 2
        gc.collect()
        stats = (await fetch_stats(s.url))["gc"]
        assert stats["collections"][2] >= 1
        assert len(stats["max_pause_ms"]) == 3

    try:
        run(config(), scenario)
    finally:
        gc.unfreeze()


def test_bad_requests_are_refused_and_record_nothing() -> None:
    async def scenario(s: Served) -> None:
        for amount in ("-1", "abc", "0.00", "1e5", "1_000", " 1"):
            status, _, body = await s.post(CHARGES, {**CHARGE_BODY, "amount": amount}, "k")
            assert status == 400 and b"amount" in body, amount
        status, _, _ = await s.post(CHARGES, {**CHARGE_BODY, "amount": 10.5}, "k")  # a float
        assert status == 400
        status, _, body = await s.post(CHARGES, CHARGE_BODY)  # no Idempotency-Key
        assert status == 400 and b"Idempotency-Key" in body
        assert (await s.post(CHARGES, b"not json", "k"))[0] == 400
        with pytest.raises(ValueError, match="currency"):
            await s.gateway.charge(charge("k", currency="US"))
        with pytest.raises(ValueError, match="amount"):
            await s.gateway.charge(charge("k", amount="-5"))
        with pytest.raises(ValueError, match="unknown merchant account"):
            await s.gateway.charge(charge("k", account="merchant-9"))
        with pytest.raises(ValueError, match="unknown merchant account"):
            await s.gateway.lookup("merchant-9", "k")
        assert await s.gateway.lookup("merchant-1", "never/seen %") is None
        assert await s.ledger() == []
        # exponent notation is sent in plain form, with the currency's minor units; odd keys
        # survive the URL
        done = await s.gateway.charge(charge("a/b c%", amount="1E+2"))
        assert await s.gateway.lookup("merchant-1", "a/b c%") == done
        assert (await s.ledger())[0]["amount"] == "100.00"

    run(config(), scenario)


# --- latency -----------------------------------------------------------------------------


def test_latency_is_lognormal_with_the_configured_median_and_p99() -> None:
    draw = Latency(20, 60).sampler(random.Random(1))
    samples = sorted(draw() * 1000 for _ in range(20_000))
    assert statistics.median(samples) == pytest.approx(20, rel=0.05)
    assert samples[int(0.99 * len(samples))] == pytest.approx(60, rel=0.1)
    assert Latency(0, 0).sampler(random.Random(1))() == 0.0


def test_latency_over_http_has_roughly_the_configured_median() -> None:
    slow = replace(FAST, latency_median_ms=20, latency_p99_ms=60, max_concurrency=1000)
    instant = replace(FAST, latency_median_ms=0, latency_p99_ms=0, max_concurrency=1000)
    cfg = SimulatorConfig(accounts={"slow": slow, "instant": instant})

    async def scenario(s: Served) -> None:
        elapsed: dict[str, list[float]] = {"slow": [], "instant": []}

        async def worker(w: int) -> None:
            for i in range(40):
                for account, times in elapsed.items():
                    started = time.perf_counter()
                    await s.gateway.charge(charge(f"k{w}-{i}", account=account))
                    times.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(worker(w) for w in range(10)))
        # the zero-latency account measures what HTTP and this busy process add
        overhead = statistics.median(elapsed["instant"])
        assert statistics.median(elapsed["slow"]) - overhead == pytest.approx(20, rel=0.25)

    run(cfg, scenario)


# --- configuration and the served process ------------------------------------------------


def test_config_round_trips_through_json_and_refuses_unknown_keys(tmp_path: Path) -> None:
    default = SimulatorConfig()
    assert list(default.accounts) == ["merchant-1", "merchant-2", "merchant-3", "merchant-4"]
    assert default.accounts["merchant-1"] == AccountConfig()
    cfg = config(rpm_limit=600, transient_rate=0.01)
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert SimulatorConfig.from_json_file(path) == cfg
    partial = SimulatorConfig.from_dict({"accounts": {"m": {"max_concurrency": 5}}})
    assert partial.accounts["m"] == AccountConfig(max_concurrency=5)
    with pytest.raises(ValueError, match=r"unknown key.*max_concurency"):
        SimulatorConfig.from_dict({"accounts": {"m": {"max_concurency": 5}}})
    with pytest.raises(ValueError, match=r"unknown key.*acounts"):
        SimulatorConfig.from_dict({"acounts": {}})
    for bad in ({"max_concurrency": 0}, {"decline_rate": 2}, {"latency_p99_ms": 1},
                {"rpm_limit": "60"}, {"max_concurrency": True}):  # fmt: skip
        with pytest.raises(ValueError):
            AccountConfig.from_dict(bad)
    with pytest.raises(ValueError, match="account name"):
        SimulatorConfig(accounts={"a/b": AccountConfig()})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SimulatorConfig.from_json_file(path)
    assert cfg.with_overrides(max_concurrency=3).accounts["merchant-2"].max_concurrency == 3


def test_the_cli_serves_it_as_a_process_until_sigterm(tmp_path: Path) -> None:
    sim = SimulatorProcess.start(config(), tmp_path)
    try:
        assert sim.alive and sim.url.startswith("http://127.0.0.1:")
        assert json.loads((tmp_path / "gateway-ready.json").read_text())["pid"] == sim.proc.pid

        async def use() -> tuple[ChargeOutcome, dict[str, Any]]:
            gateway = SimulatorGateway(sim.url)
            try:
                return await gateway.charge(charge("k1")), await fetch_stats(sim.url)
            finally:
                await gateway.close()

        outcome, stats = asyncio.run(use())
        assert outcome.status == "succeeded"
        assert stats["accounts"]["merchant-1"]["charges"] == 1
    finally:
        code = sim.stop()
    assert code == 0 and not sim.alive, sim.tail()
