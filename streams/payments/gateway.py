"""The payment gateway interface: charge, refund, look up by idempotency key.

Every call carries an idempotency key; a gateway returns the first outcome again for a
key it has seen, and never moves money twice for one key. Adapters raise
``RateLimited`` (slow down, retry after), ``TransientError`` (retry later with the same
key: the outcome is unknown or the gateway is unavailable) or return an outcome.

Adapters: ``SimulatorGateway`` (the load-test gateway of ``streambill gateway serve``,
over HTTP) and ``StripeGateway`` (the official ``stripe`` package; the production path).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, Protocol

from streams.config import Settings

ChargeStatus = Literal["succeeded", "declined"]
RefundStatus = Literal["refunded", "rejected"]


@dataclass(frozen=True)
class ChargeRequest:
    merchant_account: str
    idempotency_key: str
    invoice_id: str
    account_id: str
    amount: Decimal  # major units, exact
    currency: str
    payment_method: str  # a gateway token, never card data


@dataclass(frozen=True)
class ChargeOutcome:
    status: ChargeStatus
    reference: str | None  # the gateway's charge id
    decline_code: str | None = None


@dataclass(frozen=True)
class RefundRequest:
    merchant_account: str
    idempotency_key: str
    charge_reference: str
    invoice_id: str
    amount: Decimal
    currency: str


@dataclass(frozen=True)
class RefundOutcome:
    status: RefundStatus
    reference: str | None
    reason: str | None = None


class GatewayError(Exception):
    """Base of the errors that leave a call's outcome to a later retry."""


class RateLimited(GatewayError):
    def __init__(self, retry_after: float, detail: str = "") -> None:
        super().__init__(f"rate limited, retry after {retry_after:.3f}s {detail}".strip())
        self.retry_after = retry_after


class TransientError(GatewayError):
    """Unavailable, timed out, connection lost, or a request with the same key still in
    progress: the outcome is unknown; retrying with the same key is safe."""


class Gateway(Protocol):
    async def charge(self, request: ChargeRequest) -> ChargeOutcome: ...

    async def refund(self, request: RefundRequest) -> RefundOutcome: ...

    async def lookup(self, merchant_account: str, idempotency_key: str) -> ChargeOutcome | None:
        """The outcome recorded for a charge's idempotency key, or None if never seen."""
        ...

    async def close(self) -> None: ...


def make_gateway(settings: Settings) -> Gateway:
    """The gateway STREAMBILL_GATEWAY names: the simulator's HTTP client or Stripe."""
    if settings.gateway == "simulator":
        from streams.payments.http_gateway import SimulatorGateway

        return SimulatorGateway(settings.gateway_url, timeout_s=settings.gateway_timeout_s)
    if settings.gateway == "stripe":
        from streams.payments.stripe_gateway import stripe_gateway_from_env

        return stripe_gateway_from_env(settings)
    raise ValueError(f"STREAMBILL_GATEWAY must be simulator or stripe, not {settings.gateway!r}")
