"""StripeGateway against a fake Stripe API.

api.stripe.com cannot be reached from here, so ``FakeStripe`` stands in for it: a subclass
of stripe's own ``HTTPClient`` that replaces only the transport (``request_async``). The real
``stripe.StripeClient`` still builds every request (form encoding, headers, idempotency and
Connect options, retries) and parses every response into its objects and exceptions, so
these tests check what the library would send and how Stripe-shaped answers (bodies and
status codes as Stripe documents them) become gateway outcomes. One test also runs the
default ``AIOHTTPClient`` transport against a local aiohttp server.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import stripe
from aiohttp import web
from multidict import CIMultiDict

from streams.config import Settings
from streams.payments.gateway import (
    ChargeOutcome,
    ChargeRequest,
    RateLimited,
    RefundOutcome,
    RefundRequest,
    TransientError,
)
from streams.payments.stripe_gateway import (
    StripeGateway,
    stripe_gateway_from_env,
    to_stripe_amount,
)

API_KEY = "sk_test_fake"


@dataclass
class Recorded:
    method: str
    url: str
    headers: dict[str, str]
    form: dict[str, str]  # POST body, or the query string of a GET

    @property
    def path(self) -> str:
        return urlsplit(self.url).path


Answer = tuple[int, Mapping[str, Any], Mapping[str, str]] | Exception


class FakeStripe(stripe.HTTPClient):
    """The transport: records each request and answers the next canned response."""

    name = "fake-stripe"

    def __init__(self, *answers: Answer) -> None:
        super().__init__()
        self.answers: deque[Answer] = deque(answers)
        self.requests: list[Recorded] = []
        self.closed = False

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        body = post_data if method == "post" else urlsplit(url).query
        self.requests.append(Recorded(method, url, dict(headers), dict(parse_qsl(body or ""))))
        answer = self.answers.popleft()
        if isinstance(answer, Exception):
            raise answer
        status, payload, response_headers = answer
        return json.dumps(payload).encode(), status, CIMultiDict(response_headers)

    def sleep_async(self, secs: float) -> Any:
        return asyncio.sleep(0)  # the library's retry backoff, skipped

    async def close_async(self) -> None:
        self.closed = True


def ok(payload: Mapping[str, Any], **headers: str) -> Answer:
    return 200, payload, {"Request-Id": "req_ok", **headers}


def error(status: int, headers: Mapping[str, str] | None = None, **fields: Any) -> Answer:
    return status, {"error": fields}, {"Request-Id": "req_err", **(headers or {})}


def intent(
    status: str = "succeeded",
    *,
    pi_id: str = "pi_3Ok",
    amount: int = 1234,
    currency: str = "eur",
    created: int = 1_700_000_000,
    metadata: Mapping[str, str] | None = None,
    last_payment_error: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": pi_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_received": amount if status == "succeeded" else 0,
        "capture_method": "automatic_async",
        "confirmation_method": "automatic",
        "created": created,
        "currency": currency,
        "last_payment_error": last_payment_error,
        "latest_charge": "ch_3Ok" if status == "succeeded" else None,
        "livemode": False,
        "metadata": dict(metadata or {}),
        "payment_method": "pm_card_visa",
        "status": status,
    }


def refund_object(status: str = "succeeded", failure_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "re_3Ok",
        "object": "refund",
        "amount": 500,
        "charge": "ch_3Ok",
        "currency": "eur",
        "failure_reason": failure_reason,
        "metadata": {"invoice_id": "inv-1"},
        "payment_intent": "pi_3Ok",
        "status": status,
    }


DECLINE = {
    "type": "card_error",
    "code": "card_declined",
    "decline_code": "insufficient_funds",
    "message": "Your card has insufficient funds.",
    "charge": "ch_3Declined",
    "doc_url": "https://stripe.com/docs/error-codes/card-declined",
    "payment_intent": intent(
        "requires_payment_method",
        pi_id="pi_3Declined",
        last_payment_error={
            "type": "card_error",
            "code": "card_declined",
            "decline_code": "insufficient_funds",
        },
    ),
}


def charge_request(
    amount: str = "12.34", currency: str = "EUR", merchant: str = "acme-eu"
) -> ChargeRequest:
    return ChargeRequest(
        merchant_account=merchant,
        idempotency_key="streambill:inv-1:1",
        invoice_id="inv-1",
        account_id="acc-7",
        amount=Decimal(amount),
        currency=currency,
        payment_method="pm_card_visa",
    )


def refund_request(amount: str = "5.00") -> RefundRequest:
    return RefundRequest(
        merchant_account="acme-eu",
        idempotency_key="streambill:refund:inv-1:1",
        charge_reference="pi_3Ok",
        invoice_id="inv-1",
        amount=Decimal(amount),
        currency="EUR",
    )


def gateway(fake: FakeStripe, **kwargs: Any) -> StripeGateway:
    return StripeGateway(API_KEY, http_client=fake, **kwargs)


def charge(fake: FakeStripe, request: ChargeRequest | None = None, **kwargs: Any) -> ChargeOutcome:
    return asyncio.run(gateway(fake, **kwargs).charge(request or charge_request()))


# -- request mapping ----------------------------------------------------------------


def test_charge_sends_an_off_session_confirmed_payment_intent():
    fake = FakeStripe(ok(intent()))
    assert charge(fake) == ChargeOutcome("succeeded", "pi_3Ok")

    (sent,) = fake.requests
    assert (sent.method, sent.url) == ("post", "https://api.stripe.com/v1/payment_intents")
    assert sent.form == {
        "amount": "1234",
        "currency": "eur",
        "payment_method": "pm_card_visa",
        "confirm": "true",
        "off_session": "true",
        "metadata[invoice_id]": "inv-1",
        "metadata[account_id]": "acc-7",
        "metadata[idempotency_key]": "streambill:inv-1:1",
    }
    assert sent.headers["Idempotency-Key"] == "streambill:inv-1:1"
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert "Stripe-Account" not in sent.headers  # no mapping: the platform account


def test_charge_in_a_zero_decimal_currency_on_a_connected_account():
    fake = FakeStripe(ok(intent(amount=500, currency="jpy")))
    outcome = charge(fake, charge_request("500", "JPY"), accounts={"acme-eu": "acct_1Eu"})
    assert outcome.status == "succeeded"
    (sent,) = fake.requests
    assert (sent.form["amount"], sent.form["currency"]) == ("500", "jpy")
    assert sent.headers["Stripe-Account"] == "acct_1Eu"


def test_api_base_override():
    fake = FakeStripe(ok(intent()))
    charge(fake, api_base="http://stripe-mock:12111/")
    assert fake.requests[0].url == "http://stripe-mock:12111/v1/payment_intents"


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("12.34", "EUR", 1234),
        ("12.3", "EUR", 1230),
        ("500", "JPY", 500),
        ("500.00", "JPY", 500),  # trailing zeros are not extra decimals
        ("1.230", "KWD", 1230),
        ("500", "ISK", 50000),  # zero-decimal in ISO 4217, two-decimal in Stripe's API
        ("0.01", "USD", 1),
    ],
)
def test_stripe_amounts(amount, currency, expected):
    assert to_stripe_amount(Decimal(amount), currency) == expected


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        ("500.5", "JPY"),  # more decimals than the currency has
        ("12.345", "EUR"),
        ("1.235", "KWD"),  # Stripe wants the last of three digits to be 0
        ("0", "EUR"),
        ("-1.00", "EUR"),
        ("12.34", "XYZ"),  # unknown code
    ],
)
def test_amounts_stripe_cannot_take_exactly_are_refused(amount, currency):
    with pytest.raises(ValueError):
        to_stripe_amount(Decimal(amount), currency)


def test_charge_refuses_too_many_decimals_without_calling_stripe():
    fake = FakeStripe()
    with pytest.raises(ValueError, match="more decimals"):
        charge(fake, charge_request("500.5", "JPY"))
    assert fake.requests == []


def test_unmapped_merchant_account_is_refused_not_charged_on_the_platform():
    fake = FakeStripe()
    with pytest.raises(ValueError, match="no Stripe account"):
        charge(fake, charge_request(merchant="acme-us"), accounts={"acme-eu": "acct_1Eu"})
    assert fake.requests == []


# -- charge outcomes ----------------------------------------------------------------


def test_card_decline():
    fake = FakeStripe(error(402, **DECLINE))
    assert charge(fake) == ChargeOutcome(
        "declined", "pi_3Declined", decline_code="insufficient_funds"
    )


def test_card_error_without_decline_code_uses_the_error_code():
    fake = FakeStripe(error(402, type="card_error", code="expired_card", message="Expired."))
    assert charge(fake) == ChargeOutcome("declined", None, decline_code="expired_card")


@pytest.mark.parametrize(("headers", "retry_after"), [({"Retry-After": "2"}, 2.0), ({}, 1.0)])
def test_rate_limit(headers, retry_after):
    fake = FakeStripe(
        error(429, headers, type="invalid_request_error", code="rate_limit", message="Too many")
    )
    with pytest.raises(RateLimited) as caught:
        charge(fake)
    assert caught.value.retry_after == retry_after


@pytest.mark.parametrize(
    "answer",
    [
        error(500, type="api_error", message="An unknown error occurred"),
        error(503, type="api_error", message="Service unavailable"),
        stripe.APIConnectionError("Network error: A ClientConnectorError", should_retry=True),
        # the same idempotency key still in flight (stripe 16.x raises APIError for 409)
        error(
            409,
            type="idempotency_error",
            code="idempotency_key_in_use",
            message="There is currently another in-progress request using this Idempotent Key",
        ),
    ],
    ids=["500", "503", "connection", "409-in-flight"],
)
def test_transient_failures(answer):
    with pytest.raises(TransientError):
        charge(FakeStripe(answer))


@pytest.mark.parametrize(
    "answer",
    [
        error(
            400,
            type="invalid_request_error",
            code="resource_missing",
            param="payment_method",
            message="No such PaymentMethod: 'pm_card_visa'",
        ),
        error(401, type="invalid_request_error", message="Invalid API Key provided"),
        error(403, type="invalid_request_error", message="The provided key does not have access"),
        # the key reused with different parameters: a bug, not something to retry
        error(400, type="idempotency_error", message="Keys for idempotent requests can only..."),
    ],
    ids=["invalid", "auth", "permission", "key-reused"],
)
def test_non_retryable_errors(answer):
    with pytest.raises(ValueError, match="Stripe refused"):
        charge(FakeStripe(answer))


@pytest.mark.parametrize(
    ("status", "last_error", "decline_code"),
    [
        ("requires_action", None, "authentication_required"),
        ("requires_payment_method", None, "requires_payment_method"),
        ("requires_payment_method", {"code": "card_declined", "decline_code": "do_not_honor"},
         "do_not_honor"),
        ("canceled", None, "canceled"),
    ],
)  # fmt: skip
def test_unfinished_payment_intents_are_declines(status, last_error, decline_code):
    fake = FakeStripe(ok(intent(status, last_payment_error=last_error)))
    assert charge(fake) == ChargeOutcome("declined", "pi_3Ok", decline_code=decline_code)


def test_processing_payment_intent_is_not_an_outcome_yet():
    with pytest.raises(TransientError, match="processing"):
        charge(FakeStripe(ok(intent("processing"))))


def test_library_retries_keep_the_idempotency_key():
    fake = FakeStripe(error(500, type="api_error", message="boom"), ok(intent()))
    assert charge(fake, max_network_retries=2).status == "succeeded"
    keys = [r.headers["Idempotency-Key"] for r in fake.requests]
    assert keys == ["streambill:inv-1:1", "streambill:inv-1:1"]


# -- refunds ------------------------------------------------------------------------


OVER_REFUND = "Refund amount (€20.00) is greater than unrefunded amount on charge (€12.34)"


def refund(fake: FakeStripe, request: RefundRequest | None = None) -> RefundOutcome:
    return asyncio.run(gateway(fake).refund(request or refund_request()))


def test_refund_request_and_success():
    fake = FakeStripe(ok(refund_object()))
    assert refund(fake) == RefundOutcome("refunded", "re_3Ok")
    (sent,) = fake.requests
    assert (sent.method, sent.path) == ("post", "/v1/refunds")
    assert sent.form == {
        "payment_intent": "pi_3Ok",
        "amount": "500",
        "metadata[invoice_id]": "inv-1",
        "metadata[idempotency_key]": "streambill:refund:inv-1:1",
    }
    assert sent.headers["Idempotency-Key"] == "streambill:refund:inv-1:1"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (ok(refund_object("pending")), RefundOutcome("refunded", "re_3Ok")),
        (
            ok(refund_object("failed", "expired_or_canceled_card")),
            RefundOutcome("rejected", "re_3Ok", reason="expired_or_canceled_card"),
        ),
        (ok(refund_object("canceled")), RefundOutcome("rejected", "re_3Ok", reason="canceled")),
        (
            error(400, type="invalid_request_error", param="amount", message=OVER_REFUND),
            RefundOutcome("rejected", None, reason=OVER_REFUND),
        ),
        (
            error(
                400,
                type="invalid_request_error",
                code="charge_already_refunded",
                message="Charge ch_3Ok has already been refunded.",
            ),
            RefundOutcome("rejected", None, reason="charge_already_refunded"),
        ),
    ],
    ids=["pending", "failed", "canceled", "over-refund", "already-refunded"],
)
def test_refund_outcomes(answer, expected):
    assert refund(FakeStripe(answer)) == expected


def test_refund_of_an_unknown_payment_intent_is_an_error():
    answer = error(
        400,
        type="invalid_request_error",
        code="resource_missing",
        param="payment_intent",
        message="No such payment_intent: 'pi_3Ok'",
    )
    with pytest.raises(ValueError):
        refund(FakeStripe(answer))


def test_refund_rate_limited():
    answer = error(429, type="invalid_request_error", code="rate_limit", message="Too many")
    with pytest.raises(RateLimited):
        refund(FakeStripe(answer))


# -- lookup ---------------------------------------------------------------------------


def search_result(*intents: Mapping[str, Any]) -> Answer:
    return ok(
        {
            "object": "search_result",
            "data": list(intents),
            "has_more": False,
            "next_page": None,
            "url": "/v1/payment_intents/search",
        }
    )


def lookup(fake: FakeStripe, key: str = "streambill:inv-1:1", **kwargs: Any):
    return asyncio.run(gateway(fake, **kwargs).lookup("acme-eu", key))


def test_lookup_searches_by_idempotency_key_metadata():
    fake = FakeStripe(search_result(intent()))
    assert lookup(fake, accounts={"acme-eu": "acct_1Eu"}) == ChargeOutcome("succeeded", "pi_3Ok")
    (sent,) = fake.requests
    assert (sent.method, sent.path) == ("get", "/v1/payment_intents/search")
    assert sent.form["query"] == "metadata['idempotency_key']:'streambill:inv-1:1'"
    assert sent.headers["Stripe-Account"] == "acct_1Eu"
    assert "Idempotency-Key" not in sent.headers


def test_lookup_escapes_quotes():
    fake = FakeStripe(search_result())
    lookup(fake, key="it's")
    assert fake.requests[0].form["query"] == "metadata['idempotency_key']:'it\\'s'"


def test_lookup_not_found():
    assert lookup(FakeStripe(search_result())) is None


def test_lookup_takes_the_newest_match():
    declined = intent(
        "requires_payment_method",
        pi_id="pi_new",
        created=1_700_000_500,
        last_payment_error={"type": "card_error", "code": "card_declined"},
    )
    fake = FakeStripe(search_result(intent(pi_id="pi_old", created=1_700_000_000), declined))
    assert lookup(fake) == ChargeOutcome("declined", "pi_new", decline_code="card_declined")


def test_lookup_transient_failure():
    with pytest.raises(TransientError):
        lookup(FakeStripe(error(500, type="api_error", message="boom")))


def test_close_closes_the_transport():
    fake = FakeStripe()
    asyncio.run(gateway(fake).close())
    assert fake.closed


# -- configuration from the environment -------------------------------------------------


def test_from_env_requires_the_api_key(monkeypatch):
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="STRIPE_API_KEY"):
        stripe_gateway_from_env(Settings())


def test_from_env_rejects_malformed_accounts(monkeypatch):
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_ACCOUNTS", '["acct_1"]')
    with pytest.raises(RuntimeError, match="STRIPE_ACCOUNTS"):
        stripe_gateway_from_env(Settings())
    monkeypatch.setenv("STRIPE_ACCOUNTS", "{not json")
    with pytest.raises(RuntimeError, match="STRIPE_ACCOUNTS"):
        stripe_gateway_from_env(Settings())


def test_publishable_key_is_refused():
    with pytest.raises(ValueError, match="publishable"):
        StripeGateway("pk_test_123")


def test_from_env_over_the_default_aiohttp_transport(monkeypatch):
    """The production configuration end to end, with a local server in Stripe's place."""
    seen: list[tuple[str, Mapping[str, str], dict[str, str]]] = []

    async def create_intent(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers, dict(await request.post())))
        return web.json_response(intent(), headers={"Request-Id": "req_local"})

    async def scenario() -> ChargeOutcome:
        app = web.Application()
        app.router.add_post("/v1/payment_intents", create_intent)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        monkeypatch.setenv("STRIPE_API_BASE", f"http://127.0.0.1:{sock.getsockname()[1]}")
        gw = stripe_gateway_from_env(Settings())
        try:
            return await gw.charge(charge_request())
        finally:
            await gw.close()
            await runner.cleanup()

    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_ACCOUNTS", '{"acme-eu": "acct_1Eu"}')
    assert asyncio.run(scenario()) == ChargeOutcome("succeeded", "pi_3Ok")
    ((path, headers, form),) = seen
    assert path == "/v1/payment_intents"
    assert headers["Stripe-Account"] == "acct_1Eu"
    assert headers["Idempotency-Key"] == "streambill:inv-1:1"
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert form["amount"] == "1234"
