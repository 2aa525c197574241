"""``SimulatorGateway``: the ``Gateway`` protocol over HTTP against the gateway simulator
(``streambill gateway serve``), plus helpers that read its ledger and counters.

One shared ``aiohttp.ClientSession`` (keep-alive, no connection cap) per gateway: create,
use and close it on one event loop.
"""

from __future__ import annotations

import contextlib
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from streams.domain.money import UnknownCurrency, minor_units
from streams.payments.gateway import (
    ChargeOutcome,
    ChargeRequest,
    RateLimited,
    RefundOutcome,
    RefundRequest,
    TransientError,
)

_TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientError, OSError)
_CHARGE_STATUSES = ("succeeded", "declined")
_REFUND_STATUSES = ("refunded", "rejected")


class SimulatorGateway:
    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._charge_urls: dict[str, URL] = {}

    def _http(self) -> aiohttp.ClientSession:
        # created on first use: a session belongs to the running event loop
        if self._session is None or self._session.closed:
            # no cookies, no compression: less work per request on the hot path
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session

    def _account_url(self, merchant_account: str) -> str:
        return f"{self.base_url}/v1/accounts/{quote(merchant_account, safe='')}"

    def _charges_url(self, merchant_account: str) -> URL:
        # parsed once per account, not per request
        url = self._charge_urls.get(merchant_account)
        if url is None:
            url = self._charge_urls[merchant_account] = URL(
                f"{self._account_url(merchant_account)}/charges"
            )
        return url

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        body = await self._post(
            self._charges_url(request.merchant_account),
            request.idempotency_key,
            {
                "invoice_id": request.invoice_id,
                "account_id": request.account_id,
                "amount": _amount_text(request.amount, request.currency),
                "currency": request.currency,
                "payment_method": request.payment_method,
            },
        )
        return _charge_outcome(body)

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        body = await self._post(
            f"{self._account_url(request.merchant_account)}/refunds",
            request.idempotency_key,
            {
                "charge_id": request.charge_reference,
                "invoice_id": request.invoice_id,
                "amount": _amount_text(request.amount, request.currency),
                "currency": request.currency,
            },
        )
        status = body.get("status")
        if status not in _REFUND_STATUSES:
            raise ValueError(f"unexpected refund status from the gateway: {status!r}")
        return RefundOutcome(status=status, reference=body.get("id"), reason=body.get("reason"))

    async def lookup(self, merchant_account: str, idempotency_key: str) -> ChargeOutcome | None:
        url = (
            f"{self._account_url(merchant_account)}/charges/by-key/"
            f"{quote(idempotency_key, safe='')}"
        )
        status, headers, raw = await self._send("GET", url)
        if status == 404 and _error_code(raw) != "unknown_account":
            return None
        return _charge_outcome(_decode(status, headers, raw, url))

    async def _post(self, url: str | URL, idempotency_key: str, payload: dict[str, Any]) -> dict:
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        status, resp_headers, raw = await self._send("POST", url, orjson.dumps(payload), headers)
        return _decode(status, resp_headers, raw, url)

    async def _send(
        self, method: str, url: str | URL, data: bytes | None = None, headers: Any = None
    ) -> tuple[int, Any, bytes]:
        try:
            async with self._http().request(method, url, data=data, headers=headers) as resp:
                return resp.status, resp.headers, await resp.read()
        except aiohttp.InvalidURL as exc:  # a ClientError, but no retry can fix it
            raise ValueError(f"invalid gateway URL {url!r}") from exc
        except _TRANSPORT_ERRORS as exc:  # timed out or disconnected: the outcome is unknown
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise TransientError(f"{method} {url}: {detail}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _amount_text(amount: Decimal | str, currency: str) -> str:
    """Plain notation (str(Decimal("1E+2")) would be "1E+2", which the gateway refuses),
    with the currency's minor-unit digits when that is exact: 40.000000000 -> 40.00."""
    value = amount if isinstance(amount, Decimal) else Decimal(amount)
    with contextlib.suppress(UnknownCurrency):
        exact = value.quantize(Decimal(1).scaleb(-minor_units(currency)))
        if exact == value:
            value = exact
    return format(value, "f")


def _charge_outcome(body: dict[str, Any]) -> ChargeOutcome:
    status = body.get("status")
    if status not in _CHARGE_STATUSES:
        raise ValueError(f"unexpected charge status from the gateway: {status!r}")
    return ChargeOutcome(
        status=status, reference=body.get("id"), decline_code=body.get("decline_code")
    )


def _error_code(raw: bytes) -> str | None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body.get("code") if isinstance(body, dict) else None


def _error_message(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode(errors="replace")
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return raw[:200].decode(errors="replace")


def _retry_after(headers: Any) -> float:
    try:
        if (ms := headers.get("Retry-After-Ms")) is not None:
            return max(0.0, float(ms) / 1000)
        if (s := headers.get("Retry-After")) is not None:
            return max(0.0, float(s))
    except ValueError:
        pass
    return 1.0


def _decode(status: int, headers: Any, raw: bytes, url: str) -> dict[str, Any]:
    """A 200's JSON body, or the error its status means (see the module ``gateway``)."""
    if status == 200:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise TransientError(f"{url}: a 200 without a JSON body") from None
        if not isinstance(body, dict):
            raise ValueError(f"{url}: unexpected response body {raw[:200]!r}")
        return body
    if status == 429:
        raise RateLimited(_retry_after(headers), _error_message(raw))
    if status == 409 or status >= 500:  # in progress elsewhere, or unavailable
        raise TransientError(f"{url}: HTTP {status}: {_error_message(raw)}")
    # other 4xx: the request itself is wrong; retrying cannot help
    raise ValueError(f"gateway refused the request (HTTP {status}): {_error_message(raw)}")


# --- helpers for reconciliation, benchmarks and fault tests -------------------------------


async def _get_json(url: str, timeout_s: float = 300.0) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
        session.get(url) as resp,
    ):
        raw = await resp.read()
        if resp.status != 200:
            raise ValueError(f"GET {url}: HTTP {resp.status}: {_error_message(raw)}")
        return orjson.loads(raw)


async def fetch_ledger(base_url: str, account: str | None = None) -> list[dict[str, Any]]:
    """Every charge and refund the simulator recorded (optionally of one merchant
    account), in recording order."""
    url = f"{base_url.rstrip('/')}/v1/ledger"
    if account is not None:
        url += f"?account={quote(account, safe='')}"
    return (await _get_json(url))["entries"]


async def fetch_stats(base_url: str) -> dict[str, Any]:
    """The simulator's counters: ``{"accounts": {name: {...}}, "ledger_entries": n}``."""
    return await _get_json(f"{base_url.rstrip('/')}/v1/stats")


async def set_outage(base_url: str, seconds: float, account: str | None = None) -> dict[str, Any]:
    """Fail every charge and refund with 503 for ``seconds`` (0 ends an outage), on one
    merchant account or all of them."""
    payload: dict[str, Any] = {"seconds": seconds}
    if account is not None:
        payload["account"] = account
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.post(f"{base_url.rstrip('/')}/v1/admin/outage", data=orjson.dumps(payload)) as resp,
    ):
        raw = await resp.read()
        if resp.status != 200:
            raise ValueError(f"outage: HTTP {resp.status}: {_error_message(raw)}")
        return orjson.loads(raw)
