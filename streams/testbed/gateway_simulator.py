"""Test bed: a payment-gateway SIMULATOR for tests and benchmarks, not a real gateway.

An HTTP server (``streambill gateway serve``) that behaves like a card gateway under
load: per merchant account it has a concurrency cap and an optional requests-per-minute
limit (429 + Retry-After), lognormal latency, declines decided by the card token,
injected transient failures, an outage switch, and idempotency keys that never let money
move twice. Every recorded charge and refund is kept in an in-memory ledger that
reconciliation and benchmarks read back (``GET /v1/ledger``). Nothing is persisted: a
restarted simulator starts empty.

Faults: ``transient_rate`` injects, in turn, a 503 before processing (nothing recorded),
a connection dropped after recording, or an answer ``timeout_delay_s`` late after
recording; a retry with the same key then gets what was recorded (``Idempotent-Replayed``).

Determinism: a charge's decline depends only on its card token and the account's
``decline_rate`` (``decline_code_for``, in the client adapter
``streams.payments.http_gateway``: every charge with a token gets the same answer), so a
checker that knows the configuration (``GET /v1/config``) predicts every decline, as
``streambill reconcile`` does; latency and transient failures come from one
``random.Random`` per account seeded with ``"{seed}:{account}"``, so a run with the same
seed and the same request order behaves the same.

Endpoints (JSON; amounts are decimal strings)::

    POST /v1/accounts/{account}/charges          Idempotency-Key header required
    POST /v1/accounts/{account}/refunds          Idempotency-Key header required
    GET  /v1/accounts/{account}/charges/by-key/{key}
    GET  /v1/ledger[?account=]                   every recorded charge and refund
    GET  /v1/stats                               counters per account
    GET  /v1/config                              the configuration (decline rates, ...)
    POST /v1/admin/outage                        {"seconds": 60, "account": "merchant-1"}
    GET  /healthz
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import math
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import orjson
import structlog

from streams.metrics import GC_PAUSES
from streams.payments.http_gateway import decline_code_for
from streams.stack import ChildProcess, _die_with_parent
from streams.testbed.httpserver import HttpServer, Reply, Request, Router

log = structlog.get_logger(__name__)

Z_99 = 2.3263479  # the standard normal's 99th percentile
TRANSIENT_KINDS = ("unavailable", "dropped", "delayed")
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_AMOUNT = re.compile(r"\d{1,18}(\.\d{1,12})?")  # plain decimal: no sign, exponent or "_"
_ZERO = Decimal(0)
# The ledger only grows (millions of entries in a benchmark): every FREEZE_EVERY entries
# what is tracked is moved out of the cyclic collector's reach (gc.freeze, O(1)). Without
# it, each full collection walked every charge recorded so far, stopping the server, and
# every request in flight, for 200 ms at 1M charges: a gateway stand-in must not stall.
FREEZE_EVERY = 10_000


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class AccountConfig:
    max_concurrency: int = 250
    rpm_limit: int | None = None  # accepted requests per sliding 60 s window
    latency_median_ms: float = 250
    latency_p99_ms: float = 1000
    refund_latency_median_ms: float = 100
    refund_latency_p99_ms: float = 300
    decline_rate: float = 0.05
    transient_rate: float = 0.0
    timeout_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if _not_int(self.max_concurrency) or self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1: {self.max_concurrency!r}")
        if self.rpm_limit is not None and (_not_int(self.rpm_limit) or self.rpm_limit < 1):
            raise ValueError(f"rpm_limit must be null or an integer >= 1: {self.rpm_limit!r}")
        for name in ("latency", "refund_latency"):
            median = getattr(self, f"{name}_median_ms")
            p99 = getattr(self, f"{name}_p99_ms")
            if _not_number(median) or _not_number(p99) or median < 0 or p99 < median:
                raise ValueError(f"{name}: need 0 <= median <= p99, got {median!r}, {p99!r}")
        for name in ("decline_rate", "transient_rate"):
            value = getattr(self, name)
            if _not_number(value) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be within [0, 1]: {value!r}")
        if _not_number(self.timeout_delay_s) or self.timeout_delay_s < 0:
            raise ValueError(f"timeout_delay_s must be >= 0: {self.timeout_delay_s!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "account") -> AccountConfig:
        _reject_unknown(raw, {f.name for f in fields(cls)}, where)
        return cls(**raw)


def default_accounts(n: int = 4, config: AccountConfig | None = None) -> dict[str, AccountConfig]:
    return {f"merchant-{i}": config or AccountConfig() for i in range(1, n + 1)}


@dataclass(frozen=True)
class SimulatorConfig:
    accounts: dict[str, AccountConfig] = field(default_factory=default_accounts)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.accounts:
            raise ValueError("at least one merchant account is needed")
        for name in self.accounts:
            if not isinstance(name, str) or not _ACCOUNT_NAME.fullmatch(name):
                raise ValueError(f"account name {name!r} must match {_ACCOUNT_NAME.pattern}")
        if _not_int(self.seed):
            raise ValueError(f"seed must be an integer: {self.seed!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SimulatorConfig:
        if not isinstance(raw, dict):
            raise ValueError("the simulator config must be a JSON object")
        _reject_unknown(raw, {"accounts", "seed"}, "simulator config")
        accounts = raw.get("accounts")
        if accounts is None:
            return cls(seed=raw.get("seed", 0))
        if not isinstance(accounts, dict):
            raise ValueError('"accounts" must be an object: {"merchant-1": {...}, ...}')
        parsed = {}
        for name, acct in accounts.items():
            if not isinstance(acct, dict):
                raise ValueError(f"account {name!r} must be an object")
            parsed[name] = AccountConfig.from_dict(acct, f"account {name!r}")
        return cls(accounts=parsed, seed=raw.get("seed", 0))

    @classmethod
    def from_json_file(cls, path: Path) -> SimulatorConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        try:
            return cls.from_dict(raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "accounts": {n: asdict(a) for n, a in self.accounts.items()}}

    def with_overrides(self, **overrides: Any) -> SimulatorConfig:
        """The same config with the given AccountConfig fields set on every account."""
        if not overrides:
            return self
        return replace(
            self, accounts={n: replace(a, **overrides) for n, a in self.accounts.items()}
        )


def _not_int(value: object) -> bool:
    return not isinstance(value, int) or isinstance(value, bool)


def _not_number(value: object) -> bool:
    return not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)


def _reject_unknown(raw: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


# --- behaviour ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Lognormal latency given by its median and 99th percentile (milliseconds)."""

    median_ms: float
    p99_ms: float

    @property
    def mu(self) -> float:
        return math.log(self.median_ms)

    @property
    def sigma(self) -> float:
        return math.log(self.p99_ms / self.median_ms) / Z_99

    def sampler(self, rng: random.Random) -> Callable[[], float]:
        """A function drawing one latency, in seconds."""
        if self.median_ms <= 0:
            return lambda: 0.0
        mu, sigma, draw = self.mu, self.sigma, rng.lognormvariate
        return lambda: draw(mu, sigma) / 1000.0


class _BadRequest(Exception):
    pass


class _Pending:
    """An idempotency key whose first request is still being processed."""

    __slots__ = ("kind", "params")

    def __init__(self, kind: str, params: int) -> None:
        self.kind = kind
        self.params = params


@dataclass(slots=True, eq=False)
class _Charge:
    id: str
    key: str
    params: int  # hash of the request's parameters, to spot a key reused for another
    invoice_id: str
    amount: str  # as the first request sent it
    currency: str
    decline_code: str | None
    refunded: Decimal = _ZERO
    kind: ClassVar[str] = "charge"

    @property
    def status(self) -> str:
        return "declined" if self.decline_code else "succeeded"

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "status": self.status,
                "decline_code": self.decline_code,
                "amount": self.amount,
                "currency": self.currency,
                "invoice_id": self.invoice_id,
                "idempotency_key": self.key,
            }
        )


@dataclass(slots=True, eq=False)
class _Refund:
    id: str
    key: str
    params: int
    charge_id: str
    amount: str
    currency: str
    reason: str | None
    kind: ClassVar[str] = "refund"

    @property
    def status(self) -> str:
        return "rejected" if self.reason else "refunded"

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "status": self.status,
                "reason": self.reason,
                "amount": self.amount,
                "currency": self.currency,
                "charge_id": self.charge_id,
            }
        )


class AccountState:
    """One merchant account: its limits, counters, idempotency keys, charges and ledger."""

    def __init__(self, name: str, config: AccountConfig, seed: int) -> None:
        self.name = name
        self.config = config
        self.rng = random.Random(f"{seed}:{name}")
        self.charge_latency = Latency(config.latency_median_ms, config.latency_p99_ms).sampler(
            self.rng
        )
        self.refund_latency = Latency(
            config.refund_latency_median_ms, config.refund_latency_p99_ms
        ).sampler(self.rng)
        self.busy_retry_ms = str(max(1, round(config.latency_median_ms)))
        self.window: deque[float] = deque()  # accept times within the last 60 s (rpm)
        self.outage_until = 0.0
        self.keys: dict[str, _Pending | _Charge | _Refund] = {}
        self.charges: dict[str, _Charge] = {}
        self.ledger: list[bytes] = []  # this account's entries, pre-serialized
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.requests = 0
        self.rejected_429 = 0
        self.rejected_outage = 0
        self.charge_count = 0
        self.declines = 0
        self.refunds = 0
        self.refunds_rejected = 0
        self.replays = 0
        self.conflicts = 0
        self.transient_injected = 0

    def admit(self, now: float) -> Reply | None:
        """Take an in-flight slot, or the 429 that refuses the request."""
        if self.in_flight >= self.config.max_concurrency:
            self.rejected_429 += 1
            return _json_error(
                429,
                "too many concurrent requests",
                {"Retry-After": "1", "Retry-After-Ms": self.busy_retry_ms},
            )
        limit = self.config.rpm_limit
        if limit is not None:
            window = self.window
            while window and window[0] <= now - 60.0:
                window.popleft()
            if len(window) >= limit:
                self.rejected_429 += 1
                wait = window[0] + 60.0 - now
                return _json_error(
                    429,
                    "requests per minute limit reached",
                    {
                        "Retry-After": str(max(1, math.ceil(wait))),
                        "Retry-After-Ms": str(max(1, math.ceil(wait * 1000))),
                    },
                )
            window.append(now)
        self.in_flight += 1
        if self.in_flight > self.max_in_flight_seen:
            self.max_in_flight_seen = self.in_flight
        return None

    def transient_kind(self) -> str | None:
        rate = self.config.transient_rate
        if rate <= 0 or self.rng.random() >= rate:
            return None
        # round robin, so the three kinds split evenly (and tests know which comes next)
        kind = TRANSIENT_KINDS[self.transient_injected % len(TRANSIENT_KINDS)]
        self.transient_injected += 1
        return kind

    def stats(self) -> dict[str, int]:
        return {
            "in_flight": self.in_flight,
            "max_in_flight_seen": self.max_in_flight_seen,
            "requests": self.requests,
            "rejected_429": self.rejected_429,
            "rejected_outage": self.rejected_outage,
            "charges": self.charge_count,
            "declines": self.declines,
            "refunds": self.refunds,
            "refunds_rejected": self.refunds_rejected,
            "replays": self.replays,
            "conflicts_409": self.conflicts,
            "transient_injected": self.transient_injected,
        }


_JSON = {"Content-Type": "application/json"}
_REPLAYED = {"Content-Type": "application/json", "Idempotent-Replayed": "true"}


def _json(body: bytes, status: int = 200) -> Reply:
    return Reply(body, status, _JSON)


def _json_error(
    status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None
) -> Reply:
    payload: dict[str, Any] = {"error": message}
    if code:
        payload["code"] = code
    return Reply(orjson.dumps(payload), status, {**_JSON, **(headers or {})})


def _text(body: dict[str, Any], name: str, limit: int = 200) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _BadRequest(f"{name} must be a non-empty string of at most {limit} characters")
    return value


def _amount(body: dict[str, Any]) -> tuple[str, Decimal]:
    value = body.get("amount")
    if not isinstance(value, str) or not _AMOUNT.fullmatch(value):
        raise _BadRequest(f'amount must be a decimal string like "12.50", got {value!r}')
    amount = Decimal(value)
    if amount <= 0:
        raise _BadRequest(f"amount must be > 0, got {value!r}")
    return value, amount


def _currency(body: dict[str, Any]) -> str:
    value = body.get("currency")
    if not isinstance(value, str) or len(value) != 3 or not (value.isascii() and value.isalpha()):
        raise _BadRequest(f"currency must be 3 letters, got {value!r}")
    return sys.intern(value.upper())


class GatewaySimulator:
    """The simulator's state and request handlers (one per application)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.accounts = {n: AccountState(n, a, config.seed) for n, a in config.accounts.items()}
        self.ledger: list[bytes] = []  # every account's entries, in recording order
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)  # ids stay unique across restarts

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{self._id_prefix}{next(self._ids):010d}"

    def _record(self, acct: AccountState, entry: dict[str, Any]) -> None:
        entry["at"] = datetime.now(UTC)
        # copied: orjson's own bytes object keeps a ~4 KiB buffer, too much x 300,000
        line = bytes(memoryview(orjson.dumps(entry, option=orjson.OPT_UTC_Z)))
        acct.ledger.append(line)
        self.ledger.append(line)
        if len(self.ledger) % FREEZE_EVERY == 0:
            gc.freeze()

    # --- charges and refunds ----------------------------------------------------------

    def _begin(self, request: Request) -> tuple[AccountState, str, dict[str, Any]] | Reply:
        """Checks shared by charges and refunds: account, outage, key and JSON body."""
        acct = self.accounts.get(request.params["account"])
        if acct is None:
            return _json_error(404, "unknown merchant account", code="unknown_account")
        acct.requests += 1
        if time.monotonic() < acct.outage_until:
            acct.rejected_outage += 1
            return _json_error(503, "gateway outage (simulated)", {"Retry-After": "1"})
        key = request.header("Idempotency-Key")
        if not key:
            return _json_error(400, "the Idempotency-Key header is required")
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return _json_error(400, "the body must be JSON")
        if not isinstance(body, dict):
            return _json_error(400, "the body must be a JSON object")
        return acct, key, body

    @staticmethod
    def _seen(acct: AccountState, key: str, kind: str, params: int) -> Reply | None:
        """The answer for a key seen before: replay, 422 (other parameters) or 409."""
        entry = acct.keys.get(key)
        if entry is None:
            return None
        if entry.kind != kind or entry.params != params:
            return _json_error(422, "idempotency key reused with different parameters")
        if isinstance(entry, _Pending):
            acct.conflicts += 1
            return _json_error(409, "a request with this idempotency key is in progress")
        acct.replays += 1
        return Reply(entry.body(), 200, _REPLAYED)

    async def _process(
        self,
        request: Request,
        acct: AccountState,
        key: str,
        kind: str,
        params: int,
        latency: Callable[[], float],
        record: Callable[[], _Charge | _Refund],
    ) -> Reply:
        """Admission, latency while holding a slot, recording, then any injected fault."""
        if (refused := acct.admit(time.monotonic())) is not None:
            return refused
        fault = acct.transient_kind()
        if fault == "unavailable":  # before processing: nothing recorded
            acct.in_flight -= 1
            return _json_error(503, "service unavailable (simulated)")
        acct.keys[key] = _Pending(kind, params)
        entry = None
        try:
            await asyncio.sleep(latency())
            entry = record()
            acct.keys[key] = entry
        finally:
            acct.in_flight -= 1
            if entry is None:  # cancelled before recording: the key is free again
                acct.keys.pop(key, None)
        if fault == "dropped":  # recorded, then the connection is lost without an answer
            request.drop()
            return Reply(status=500)  # never sent: the connection is closed
        if fault == "delayed":  # recorded (slot freed), answered after the client gave up
            await asyncio.sleep(acct.config.timeout_delay_s)
        return _json(entry.body())

    async def post_charge(self, request: Request) -> Reply:
        begun = self._begin(request)
        if isinstance(begun, Reply):
            return begun
        acct, key, body = begun
        try:
            invoice_id = _text(body, "invoice_id")
            account_id = _text(body, "account_id")
            amount_text, amount = _amount(body)
            currency = _currency(body)
            token = _text(body, "payment_method")
        except _BadRequest as exc:
            return _json_error(400, str(exc))
        params = hash(("charge", invoice_id, account_id, amount, currency, token))
        if (seen := self._seen(acct, key, "charge", params)) is not None:
            return seen

        def record() -> _Charge:
            code = decline_code_for(token, acct.config.decline_rate)
            charge = _Charge(
                self._new_id("ch"), key, params, invoice_id, amount_text, currency, code
            )
            acct.charges[charge.id] = charge
            acct.charge_count += 1
            acct.declines += code is not None
            self._record(
                acct,
                {
                    "kind": "charge",
                    "id": charge.id,
                    "merchant_account": acct.name,
                    "idempotency_key": key,
                    "invoice_id": invoice_id,
                    "amount": amount_text,
                    "currency": currency,
                    "status": charge.status,
                    "decline_code": code,
                    "payment_method": token,  # what decided the decline, for reconcile
                },
            )
            return charge

        return await self._process(
            request, acct, key, "charge", params, acct.charge_latency, record
        )

    async def post_refund(self, request: Request) -> Reply:
        begun = self._begin(request)
        if isinstance(begun, Reply):
            return begun
        acct, key, body = begun
        try:
            charge_id = _text(body, "charge_id")
            invoice_id = _text(body, "invoice_id")
            amount_text, amount = _amount(body)
            currency = _currency(body)
        except _BadRequest as exc:
            return _json_error(400, str(exc))
        params = hash(("refund", charge_id, invoice_id, amount, currency))
        if (seen := self._seen(acct, key, "refund", params)) is not None:
            return seen

        def record() -> _Refund:
            # decided when recorded (no await in between), so concurrent refunds of one
            # charge can never exceed it
            charge = acct.charges.get(charge_id)
            reason = None
            if charge is None:
                reason = "unknown_charge"
            elif charge.status != "succeeded":
                reason = "charge_not_succeeded"
            elif charge.currency != currency:
                reason = "currency_mismatch"
            elif charge.refunded + amount > Decimal(charge.amount):
                reason = "amount_exceeds_remaining"
            else:
                charge.refunded += amount
            refund = _Refund(
                self._new_id("re"), key, params, charge_id, amount_text, currency, reason
            )
            acct.refunds += 1
            acct.refunds_rejected += reason is not None
            self._record(
                acct,
                {
                    "kind": "refund",
                    "id": refund.id,
                    "merchant_account": acct.name,
                    "idempotency_key": key,
                    "invoice_id": invoice_id,
                    "amount": amount_text,
                    "currency": currency,
                    "status": refund.status,
                    "reason": reason,
                    "charge_id": charge_id,
                },
            )
            return refund

        return await self._process(
            request, acct, key, "refund", params, acct.refund_latency, record
        )

    # --- reads and admin --------------------------------------------------------------

    async def get_charge_by_key(self, request: Request) -> Reply:
        acct = self.accounts.get(request.params["account"])
        if acct is None:
            return _json_error(404, "unknown merchant account", code="unknown_account")
        entry = acct.keys.get(request.params["key"])
        if isinstance(entry, _Charge):
            return _json(entry.body())
        if isinstance(entry, _Pending) and entry.kind == "charge":
            return _json_error(409, "a charge with this idempotency key is in progress")
        return _json_error(404, "no charge with this idempotency key", code="not_found")

    async def get_ledger(self, request: Request) -> Reply:
        name = request.query.get("account")
        if name is None:
            lines = self.ledger
        elif (acct := self.accounts.get(name)) is not None:
            lines = acct.ledger
        else:
            return _json_error(404, "unknown merchant account", code="unknown_account")
        # entries are serialized once, when recorded: a join is all a large ledger costs
        return _json(b'{"entries":[' + b",".join(lines) + b"]}")

    async def get_stats(self, request: Request) -> Reply:
        return _json(
            orjson.dumps(
                {
                    "accounts": {n: a.stats() for n, a in self.accounts.items()},
                    "ledger_entries": len(self.ledger),
                    "gc": GC_PAUSES.stats(),
                }
            )
        )

    async def get_config(self, request: Request) -> Reply:
        return _json(orjson.dumps(self.config.to_dict()))

    async def post_outage(self, request: Request) -> Reply:
        try:
            body = orjson.loads(request.body or b"{}")
        except orjson.JSONDecodeError:
            return _json_error(400, "the body must be JSON")
        seconds = body.get("seconds") if isinstance(body, dict) else None
        if _not_number(seconds) or seconds < 0:
            return _json_error(400, "seconds must be a number >= 0 (0 ends an outage)")
        name = body.get("account")
        if name is None:
            chosen = list(self.accounts.values())
        elif name in self.accounts:
            chosen = [self.accounts[name]]
        else:
            return _json_error(404, "unknown merchant account", code="unknown_account")
        until = time.monotonic() + seconds
        for acct in chosen:
            acct.outage_until = until
        return _json(orjson.dumps({"accounts": [a.name for a in chosen], "seconds": seconds}))

    async def get_healthz(self, request: Request) -> Reply:
        return _json(b'{"ok":true}')


def build_router(sim: GatewaySimulator) -> Router:
    router = Router()
    router.add("POST", "/v1/accounts/{account}/charges", sim.post_charge)
    router.add("POST", "/v1/accounts/{account}/refunds", sim.post_refund)
    router.add("GET", "/v1/accounts/{account}/charges/by-key/{key}", sim.get_charge_by_key)
    router.add("GET", "/v1/ledger", sim.get_ledger)
    router.add("GET", "/v1/stats", sim.get_stats)
    router.add("GET", "/v1/config", sim.get_config)
    router.add("POST", "/v1/admin/outage", sim.post_outage)
    router.add("GET", "/healthz", sim.get_healthz)
    return router


class SimulatorServer:
    """The simulator served in this process (``streams.testbed.httpserver``: its CPU per request
    counts against the payment run it serves). ``serve`` runs one until a signal; tests
    start one directly."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.sim = GatewaySimulator(config)
        self.http = HttpServer(build_router(self.sim))
        self.url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> SimulatorServer:
        _, bound_port = await self.http.start(host, port, backlog=4096)
        self.url = _url(host, bound_port)
        return self

    async def close(self) -> None:
        # a short wait: "delayed" answers may sleep for timeout_delay_s
        await self.http.close(timeout_s=1.0)


def _url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 18080,
    ready_file: Path | None = None,
) -> None:
    """Serve until cancelled, SIGTERM or SIGINT; port 0 picks a free port. Once listening,
    ``{"url", "pid"}`` is written to ``ready_file`` (atomically)."""
    server = SimulatorServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = []
    try:
        await server.start(host, port)
        url = server.url
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        if ready_file is not None:
            ready_file = Path(ready_file)
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
            tmp.replace(ready_file)
        log.info(
            "gateway simulator listening (a simulator, not a real gateway)",
            url=url,
            accounts=list(config.accounts),
            seed=config.seed,
        )
        await stop.wait()
        log.info("gateway simulator stopping", url=url)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await server.close()


def run_server(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 18080,
    ready_file: Path | None = None,
) -> None:
    """Blocking entry point (the CLI): ``serve`` on uvloop when it is installed."""
    GC_PAUSES.install()
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config, host, port, ready_file))


# --- a simulator in its own process ------------------------------------------------------


class SimulatorProcess(ChildProcess):
    """``streambill gateway serve`` as a subprocess, for tests and benchmarks (its own
    process, so it takes a core of its own and the client's load is measured fairly)."""

    name = "gateway"

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path

    @classmethod
    def start(
        cls, config: SimulatorConfig, log_dir: Path, timeout: float = 30.0
    ) -> SimulatorProcess:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        config_file = log_dir / "gateway-config.json"
        config_file.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        ready_file = log_dir / "gateway-ready.json"
        ready_file.unlink(missing_ok=True)
        log_path = log_dir / "gateway.log"
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "streams.cli",
                    "gateway",
                    "serve",
                    "--config",
                    str(config_file),
                    "--port",
                    "0",
                    "--ready-file",
                    str(ready_file),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # no orphaned simulator if we are killed
            )
        started = cls(proc, "", log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the gateway simulator exited ({proc.returncode}):\n{started.tail()}"
                )
            try:
                info = json.loads(ready_file.read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("pid") == proc.pid:
                started.url = info["url"]
                return started
            time.sleep(0.05)
        started.stop()
        raise TimeoutError(f"the gateway simulator was not ready in {timeout}s:\n{started.tail()}")

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
