"""``StripeGateway``: the production payment gateway, on the official ``stripe`` package.

Configuration (production)::

    STRIPE_API_KEY=sk_live_...        # or a restricted key (rk_live_...) allowed to write
                                      # PaymentIntents and Refunds and to read PaymentIntents
    STRIPE_ACCOUNTS='{"acme-eu": "acct_1Nv...", "acme-us": "acct_1Pq..."}'   # optional
    STRIPE_API_BASE=http://stripe-mock:12111                                 # optional

    gateway = stripe_gateway_from_env(Settings())

Without ``STRIPE_ACCOUNTS`` every call runs on the platform account. With it (Stripe
Connect), each request's ``merchant_account`` must be one of its names and the call runs on
that connected account (the ``Stripe-Account`` header); an unmapped name is refused rather
than silently charged on the platform. ``STRIPE_API_BASE`` points the client elsewhere than
https://api.stripe.com (stripe-mock, an egress proxy). The API version is the one pinned by
the installed ``stripe`` release. Requests go through ``stripe.AIOHTTPClient`` unless another
async-capable ``stripe.HTTPClient`` is passed; the gateway owns that client and ``close()``
closes it, so create and use a gateway inside one event loop. ``max_network_retries`` is 0 by
default: the dispatcher retries ``TransientError``/``RateLimited`` with the same key itself.

Tested without the network (tests/payments/test_stripe_gateway.py): the parameters, headers
(``Idempotency-Key``, ``Stripe-Account``) and form encoding the library produces, and the
mapping of Stripe-shaped responses and errors (as documented by Stripe and as stripe 16.x
classifies them) to outcomes, through a fake transport; the default aiohttp transport
against a local HTTP server. Not tested: Stripe itself (declines, 3-D Secure, search-index
lag, the exact error bodies of over-refunds and idempotency conflicts); run a test-mode
key against the sandbox before relying on a new Stripe API version.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import stripe

from streams.config import Settings
from streams.domain.money import CTX, minor_units
from streams.payments.gateway import (
    ChargeOutcome,
    ChargeRequest,
    RateLimited,
    RefundOutcome,
    RefundRequest,
    TransientError,
)

# Stripe's API exponent differs from ISO 4217 / CLDR (money.minor_units) for some
# currencies: e.g. ISK, ALL, IQD, RSD are two-decimal in the Stripe API (ISK 100 = 1 krona)
# although babel says 0. https://docs.stripe.com/currencies#zero-decimal
_STRIPE_ZERO_DECIMAL = frozenset(
    {
        "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA",
        "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF",
    }
)  # fmt: skip
# three-decimal in the API, but Stripe requires the last digit to be 0
_STRIPE_THREE_DECIMAL = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})

DEFAULT_RETRY_AFTER = 1.0

# refund errors that mean "Stripe will not refund this amount", not a broken request
_REFUND_REFUSALS = frozenset({"charge_already_refunded", "charge_disputed", "amount_too_large"})


def stripe_minor_units(currency: str) -> int:
    """Digits of the integer ``amount`` the Stripe API expects for an ISO 4217 code."""
    if currency in _STRIPE_ZERO_DECIMAL:
        return 0
    if currency in _STRIPE_THREE_DECIMAL:
        return 3
    return 2


def to_stripe_amount(amount: Decimal, currency: str) -> int:
    """An exact positive amount in major units as Stripe's integer ``amount``.

    Refuses (ValueError) amounts with more decimals than the currency has (JPY 500.5),
    amounts Stripe cannot represent exactly, and unknown currency codes: money is never
    rounded here (money.round_money rounds once, upstream).
    """
    digits = minor_units(currency)  # also validates the code (UnknownCurrency)
    if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
        raise ValueError(f"amount must be a positive finite Decimal, got {amount!r}")
    if amount.quantize(Decimal(1).scaleb(-digits), context=CTX) != amount:
        raise ValueError(f"{amount} has more decimals than {currency} has ({digits})")
    scaled = amount.scaleb(stripe_minor_units(currency), context=CTX)
    if scaled != scaled.to_integral_value(context=CTX):
        raise ValueError(f"{amount} {currency} has no exact Stripe amount")
    value = int(scaled)
    if currency in _STRIPE_THREE_DECIMAL and value % 10:
        raise ValueError(f"Stripe needs {currency} amounts in multiples of 0.010, got {amount}")
    return value


def search_literal(value: str) -> str:
    """A quoted string for Stripe's search query language (quotes escaped by backslash)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class StripeGateway:
    """The ``Gateway`` protocol over Stripe PaymentIntents and Refunds."""

    def __init__(
        self,
        api_key: str,
        *,
        accounts: dict[str, str] | None = None,
        http_client: stripe.HTTPClient | None = None,
        api_base: str | None = None,
        max_network_retries: int = 0,
    ) -> None:
        if not api_key:
            raise ValueError("a Stripe secret or restricted API key is required")
        if api_key.startswith("pk_"):
            raise ValueError("a publishable key (pk_...) cannot create payments; use a secret key")
        self._accounts = dict(accounts) if accounts is not None else None
        self._http = http_client if http_client is not None else stripe.AIOHTTPClient()
        self._client = stripe.StripeClient(
            api_key,
            http_client=self._http,
            base_addresses={"api": api_base.rstrip("/")} if api_base else None,
            max_network_retries=max_network_retries,
        )

    def _options(self, merchant_account: str, idempotency_key: str | None) -> stripe.RequestOptions:
        options: stripe.RequestOptions = {}
        if self._accounts is not None:
            try:
                options["stripe_account"] = self._accounts[merchant_account]
            except KeyError:
                raise ValueError(
                    f"merchant account {merchant_account!r} has no Stripe account mapping"
                ) from None
        if idempotency_key is not None:
            options["idempotency_key"] = idempotency_key
        return options

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        amount = to_stripe_amount(request.amount, request.currency)
        options = self._options(request.merchant_account, request.idempotency_key)
        try:
            intent = await self._client.v1.payment_intents.create_async(
                {
                    "amount": amount,
                    "currency": request.currency.lower(),
                    "payment_method": request.payment_method,
                    "confirm": True,
                    "off_session": True,
                    "metadata": {
                        "invoice_id": request.invoice_id,
                        "account_id": request.account_id,
                        "idempotency_key": request.idempotency_key,
                    },
                },
                options,
            )
        except stripe.CardError as err:
            return _card_declined(err)
        except stripe.StripeError as err:
            raise _translate(err) from err
        return _intent_outcome(intent)

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        amount = to_stripe_amount(request.amount, request.currency)
        options = self._options(request.merchant_account, request.idempotency_key)
        try:
            refund = await self._client.v1.refunds.create_async(
                {
                    "payment_intent": request.charge_reference,
                    "amount": amount,
                    "metadata": {
                        "invoice_id": request.invoice_id,
                        "idempotency_key": request.idempotency_key,
                    },
                },
                options,
            )
        except stripe.InvalidRequestError as err:
            if err.code in _REFUND_REFUSALS or err.param == "amount":
                return RefundOutcome("rejected", None, reason=err.code or err.user_message)
            raise _translate(err) from err
        except stripe.StripeError as err:
            raise _translate(err) from err
        status = _field(refund, "status")
        # pending / requires_action: accepted and under way; a later failure arrives as
        # the refund.failed webhook, not through this call
        if status in ("succeeded", "pending", "requires_action"):
            return RefundOutcome("refunded", refund.id)
        if status in ("failed", "canceled"):
            reason = _field(refund, "failure_reason") or status
            return RefundOutcome("rejected", refund.id, reason=reason)
        raise TransientError(f"refund {refund.id} has unexpected status {status!r}")

    async def lookup(self, merchant_account: str, idempotency_key: str) -> ChargeOutcome | None:
        """The newest PaymentIntent created with this key (from its metadata), or None.

        Uses Stripe's search, whose index lags writes: usually under a minute, during
        Stripe incidents up to an hour. For a charge sent in the last minutes None only
        means "not visible yet": reconciliation must not read it as "never charged" (and
        charge again under a new key) until the attempt is older than that lag.
        Search is not available to accounts in India.
        """
        options = self._options(merchant_account, None)
        query = f"metadata['idempotency_key']:{search_literal(idempotency_key)}"
        try:
            found = await self._client.v1.payment_intents.search_async(
                {"query": query, "limit": 10}, options
            )
        except stripe.StripeError as err:
            raise _translate(err) from err
        intents = list(found.data)
        if not intents:
            return None
        # one key creates one PaymentIntent, but a key reused after Stripe forgot it
        # (24 h) creates another: the newest is the one a retry would have seen
        newest = max(intents, key=lambda intent: _field(intent, "created") or 0)
        return _intent_outcome(newest)

    async def close(self) -> None:
        with contextlib.suppress(NotImplementedError):  # a client without an async session
            await self._http.close_async()


def _intent_outcome(intent: Any) -> ChargeOutcome:
    status = _field(intent, "status")
    if status == "succeeded":
        return ChargeOutcome("succeeded", intent.id)
    if status == "processing":
        # the payment method settles asynchronously (bank debits): the outcome is not
        # known yet and arrives later (webhook, lookup); declined would invite a second
        # charge for a payment that may still succeed
        raise TransientError(f"payment intent {intent.id} is still processing")
    if status in ("requires_action", "requires_payment_method", "canceled"):
        # no money moved. requires_action: off-session there is no customer to complete
        # 3-D Secure, so it is a decline for dunning to handle
        defaults = {"requires_action": "authentication_required"}
        error = _field(intent, "last_payment_error")
        code = (
            _field(error, "decline_code") or _field(error, "code") or defaults.get(status, status)
        )
        return ChargeOutcome("declined", intent.id, decline_code=code)
    # requires_confirmation / requires_capture: never produced by confirm=True with
    # automatic capture, so the outcome is unknown rather than guessed
    raise TransientError(f"payment intent {intent.id} has unexpected status {status!r}")


def _field(obj: Any, name: str) -> Any:
    # StripeObjects are not dicts: a field absent from the response is an absent attribute
    return getattr(obj, name, None)


def _card_declined(err: stripe.CardError) -> ChargeOutcome:
    reference = _field(_field(err.error, "payment_intent"), "id")
    code = _field(err.error, "decline_code") or err.code
    return ChargeOutcome("declined", reference, decline_code=code or "card_declined")


def _translate(err: stripe.StripeError) -> Exception:
    """The gateway error for a Stripe error other than a card decline."""
    if isinstance(err, stripe.RateLimitError):
        return RateLimited(_retry_after(err.headers), detail=err.code or "")
    if isinstance(err, stripe.APIConnectionError):
        return TransientError(f"cannot reach Stripe: {err.user_message}")
    # stripe 16.x raises APIError for every status it does not classify: 5xx and 409
    # (a request with the same idempotency key still in flight). After a 5xx the outcome
    # is unknown; Stripe may replay the same 5xx for that key, which lookup() resolves.
    if isinstance(err, stripe.APIError) or (
        isinstance(err, stripe.IdempotencyError) and err.http_status == 409
    ):
        return TransientError(f"Stripe HTTP {err.http_status}: {err.user_message}")
    # invalid request, authentication, permission, and a key reused with other
    # parameters (IdempotencyError, HTTP 400): retrying the same request cannot help
    return ValueError(f"Stripe refused the request ({err.http_status} {err.code}): {err}")


def _retry_after(headers: Mapping[str, str] | None) -> float:
    value = next((v for k, v in (headers or {}).items() if k.lower() == "retry-after"), None)
    if value is None:
        return DEFAULT_RETRY_AFTER
    try:
        seconds = float(value)
    except ValueError:
        try:  # the HTTP-date form
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER
    return max(seconds, 0.0) if math.isfinite(seconds) else DEFAULT_RETRY_AFTER


def stripe_gateway_from_env(settings: Settings) -> StripeGateway:
    """A gateway configured by STRIPE_API_KEY, STRIPE_ACCOUNTS and STRIPE_API_BASE."""
    api_key = settings.stripe_api_key
    if not api_key:
        raise RuntimeError(
            "STRIPE_API_KEY is not set: export the secret (sk_...) or restricted (rk_...) key"
            " of the Stripe account to charge"
        )
    accounts: dict[str, str] | None = None
    raw = settings.stripe_accounts
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise RuntimeError(f"STRIPE_ACCOUNTS is not valid JSON: {err}") from None
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in parsed.items()
        ):
            raise RuntimeError(
                "STRIPE_ACCOUNTS must be a JSON object of merchant-account names to Stripe"
                ' account ids, e.g. {"acme-eu": "acct_1Nv..."}'
            )
        accounts = parsed
    api_base = settings.stripe_api_base or None
    return StripeGateway(api_key, accounts=accounts, api_base=api_base)
