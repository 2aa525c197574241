"""``SimulatorGateway``: the ``Gateway`` protocol over HTTP against the gateway simulator
(``streambill gateway serve``, ``streams.testbed.gateway_simulator``), plus helpers that
read its ledger and counters and its decline rule (``decline_code_for``).

The adapter speaks HTTP/1.1 through ``streams.httpclient`` (keep-alive connections,
httptools parser): at thousands of charges a second the client's own CPU counts, and a
general-purpose client (aiohttp's) cost about 0.4 ms per charge. Create, use and close a
gateway on one event loop. The ledger and stats helpers are not hot and use aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from decimal import Decimal
from functools import partial
from typing import Any
from urllib.parse import quote

import aiohttp
import httptools
import orjson

from streams.domain.money import UnknownCurrency, minor_units
from streams.httpclient import ConnectionPool, HttpClient, InvalidURL, Response
from streams.metrics import LATE_LOOKUPS
from streams.payments.control import AnswerTimeout
from streams.payments.gateway import (
    ChargeOutcome,
    ChargeRequest,
    RateLimited,
    RefundOutcome,
    RefundRequest,
    TransientError,
)

# timed out, refused, reset, closed before the answer, or not HTTP: the outcome is unknown
_TRANSPORT_ERRORS = (TimeoutError, OSError, httptools.HttpParserError)
_CHARGE_STATUSES = ("succeeded", "declined")
_REFUND_STATUSES = ("refunded", "rejected")
DECLINE_CODES = ("insufficient_funds", "card_declined", "expired_card")
_JSON = {"Content-Type": "application/json"}
MAX_LATE_LOOKUPS = 10


class SimulatorGateway:
    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        """timeout_s: the longest wait for a charge's answer; per merchant account the
        wait follows its recent answers (``AnswerTimeout``) below that."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = HttpClient(timeout_s)
        self.answer_timeouts: dict[str, AnswerTimeout] = {}
        # per merchant account: (pool, URL, the request's bytes up to the key's value)
        self._charge_heads: dict[str, tuple[ConnectionPool, str, bytes]] = {}
        self._late_lookups: dict[str, int] = {}  # per merchant account, in flight
        self._lookup_tasks: set[asyncio.Task[None]] = set()

    def _account_url(self, merchant_account: str) -> str:
        return f"{self.base_url}/v1/accounts/{quote(merchant_account, safe='')}"

    def _charge_head(self, merchant_account: str) -> tuple[ConnectionPool, str, bytes]:
        # the URL parsed and the request line and fixed headers encoded once per account
        found = self._charge_heads.get(merchant_account)
        if found is None:
            url = f"{self._account_url(merchant_account)}/charges"
            try:
                pool, target, host = self._http.endpoint(url)
            except InvalidURL as exc:
                raise ValueError(f"invalid gateway URL {url!r}") from exc
            head = (
                f"POST {target} HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/json\r\nIdempotency-Key: "
            ).encode("latin-1")
            found = self._charge_heads[merchant_account] = (pool, url, head)
        return found

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        pool, url, head = self._charge_head(request.merchant_account)
        body = orjson.dumps(
            {
                "invoice_id": request.invoice_id,
                "account_id": request.account_id,
                "amount": _amount_text(request.amount, request.currency),
                "currency": request.currency,
                "payment_method": request.payment_method,
            }
        )
        key = _header_value(request.idempotency_key)
        data = b"%s%s\r\nContent-Length: %d\r\n\r\n%s" % (head, key, len(body), body)
        timeout = self.answer_timeouts.get(request.merchant_account)
        if timeout is None:
            timeout = self.answer_timeouts[request.merchant_account] = AnswerTimeout(
                ceiling=self.timeout_s, floor=min(1.0, self.timeout_s)
            )
        late_s = timeout.late_seconds
        late = None
        if late_s is not None:
            late = (late_s, partial(self._late, request.merchant_account, request.idempotency_key))
        started = time.monotonic()
        try:
            resp = await pool.request(data, timeout.seconds, late)
        except _FoundByKey as found:
            return found.outcome
        except TimeoutError as exc:
            timeout.on_timeout()
            raise _transient("POST", url, exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise _transient("POST", url, exc) from exc
        timeout.on_answer(time.monotonic() - started)
        return _charge_outcome(_decode(resp, url))

    def _late(self, account: str, key: str, waiter: asyncio.Future[Response]) -> None:
        """A charge's answer is late (past the account's p99): look its key up beside the
        open call. An outcome recorded whose answer is stuck (a stalled connection or
        server) then ends the wait at once instead of at the time-out plus a second
        request; a charge still in progress keeps waiting. At most MAX_LATE_LOOKUPS per
        account at once, so a gateway that slows down as a whole is not asked twice."""
        if self._late_lookups.get(account, 0) >= MAX_LATE_LOOKUPS or waiter.done():
            return
        self._late_lookups[account] = self._late_lookups.get(account, 0) + 1
        task = asyncio.get_running_loop().create_task(self._look_up_late(account, key, waiter))
        self._lookup_tasks.add(task)
        task.add_done_callback(self._lookup_tasks.discard)

    async def _look_up_late(self, account: str, key: str, waiter: asyncio.Future) -> None:
        try:
            outcome = await self.lookup(account, key)
        except (TransientError, ValueError):  # in progress (409), unreachable: wait on
            outcome = None
        finally:
            self._late_lookups[account] -= 1
        LATE_LOOKUPS.labels(account, str(outcome is not None).lower()).inc()
        if outcome is not None and not waiter.done():
            waiter.set_exception(_FoundByKey(outcome))

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
        resp = await self._send("GET", url)
        if resp.status == 404 and _error_code(resp.body) != "unknown_account":
            return None
        return _charge_outcome(_decode(resp, url))

    async def _post(self, url: str, idempotency_key: str, payload: dict[str, Any]) -> dict:
        headers = {**_JSON, "Idempotency-Key": idempotency_key}
        return _decode(await self._send("POST", url, orjson.dumps(payload), headers), url)

    async def _send(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        try:
            return await self._http.request(method, url, data, headers)
        except InvalidURL as exc:  # no retry can fix it
            raise ValueError(f"invalid gateway URL {url!r}") from exc
        except _TRANSPORT_ERRORS as exc:
            raise _transient(method, url, exc) from exc

    async def close(self) -> None:
        for task in list(self._lookup_tasks):
            task.cancel()
        await self._http.close()
        self._charge_heads.clear()


class _FoundByKey(Exception):
    """Ends the wait for a late answer: its outcome was found by its idempotency key."""

    def __init__(self, outcome: ChargeOutcome) -> None:
        super().__init__(outcome.status)
        self.outcome = outcome


def _header_value(value: str) -> bytes:
    if "\r" in value or "\n" in value:
        raise ValueError(f"invalid header value {value!r}: CR or LF")
    return value.encode("latin-1")


def _transient(method: str, url: str, exc: BaseException) -> TransientError:
    """Timed out or disconnected: the outcome is unknown, a retry with the key learns it."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return TransientError(f"{method} {url}: {detail}")


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


def _retry_after(resp: Response) -> float:
    try:
        if (ms := resp.header("Retry-After-Ms")) is not None:
            return max(0.0, float(ms) / 1000)
        if (s := resp.header("Retry-After")) is not None:
            return max(0.0, float(s))
    except ValueError:
        pass
    return 1.0


def _decode(resp: Response, url: str) -> dict[str, Any]:
    """A 200's JSON body, or the error its status means (see the module ``gateway``)."""
    status, raw = resp.status, resp.body
    if status == 200:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise TransientError(f"{url}: a 200 without a JSON body") from None
        if not isinstance(body, dict):
            raise ValueError(f"{url}: unexpected response body {raw[:200]!r}")
        return body
    if status == 429:
        raise RateLimited(_retry_after(resp), _error_message(raw))
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


async def fetch_config(base_url: str) -> dict[str, Any]:
    """The simulator's configuration: ``{"seed": n, "accounts": {name: {...}}}``."""
    return await _get_json(f"{base_url.rstrip('/')}/v1/config")


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


def decline_code_for(token: str, decline_rate: float) -> str | None:
    """The decline code the simulator gives a charge with this card token, or None if it
    succeeds: the simulator answers by this rule and ``streambill reconcile`` checks its
    ledger against it."""
    if token.startswith("tok_decline"):
        return "insufficient_funds"
    if token.startswith("tok_ok"):
        return None
    digest = hashlib.sha256(token.encode()).digest()
    if int.from_bytes(digest[:8], "big") / 2**64 < decline_rate:
        return DECLINE_CODES[digest[8] % len(DECLINE_CODES)]
    return None
