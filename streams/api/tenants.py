"""Tenants, their API keys (stored hashed) and limits, in one JSON file that the API
re-reads when it changes: limits change without a redeploy.

    {"tenants": [{"tenant_id": "acme", "account_prefix": "acme-",
                  "key_sha256": ["<hex>", ...], "max_concurrency": 256,
                  "rate_per_s": 5000}]}

A tenant owns the accounts whose id starts with its ``account_prefix`` (an empty prefix
owns every account: a single-tenant deployment). Plans are not any tenant's: they are
published and retired only with the key of a tenant marked ``"admin": true`` in the file
(an operator's), and read by every tenant. Keys are 256-bit
random tokens, so a SHA-256 of the key is enough to store (no password-style stretching
is needed for a secret nobody can guess, and the lookup stays cheap on the hot path);
the plain key is shown once, when it is made. A key is named by its id, the first
characters of its hash (not a secret: it cannot be turned back into the key), so it can be
listed and revoked without anyone holding the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MAX_CONCURRENCY = 256
DEFAULT_RATE_PER_S = 5000.0


class TenantError(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(tenant_id: str) -> str:
    return f"sb_{tenant_id}_{secrets.token_urlsafe(32)}"


def key_id(key_sha256: str) -> str:
    """A key's public name: 48 bits of its hash, unique among any tenants' keys."""
    return key_sha256[:12]


def revoke(tenants: dict[str, Tenant], key: str, tenant_id: str | None = None) -> Tenant:
    """Remove a key (by its id, or the key itself) from its tenant, which is returned;
    with ``tenant_id``, only from that tenant. An unknown key raises TenantError."""
    ids = {key_id(hash_key(key)), key}
    holders = [
        (t, h)
        for t in tenants.values()
        if tenant_id in (None, t.tenant_id)
        for h in t.key_sha256
        if key_id(h) in ids
    ]
    if not holders:
        owner = f" of tenant {tenant_id}" if tenant_id else ""
        raise TenantError(f"no key {key!r}{owner}")
    for tenant, h in holders:
        tenant.key_sha256.remove(h)
    return holders[0][0]


@dataclass
class Tenant:
    tenant_id: str
    account_prefix: str
    key_sha256: list[str] = field(default_factory=list)
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    rate_per_s: float = DEFAULT_RATE_PER_S
    admin: bool = False  # an operator: may publish and retire plans (global, no tenant's)

    def owns(self, account_id: str) -> bool:
        return account_id.startswith(self.account_prefix)

    @classmethod
    def from_dict(cls, d: Any) -> Tenant:
        try:
            t = cls(
                tenant_id=str(d["tenant_id"]),
                account_prefix=str(d["account_prefix"]),
                key_sha256=[str(k) for k in d.get("key_sha256", [])],
                max_concurrency=int(d.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)),
                rate_per_s=float(d.get("rate_per_s", DEFAULT_RATE_PER_S)),
                admin=d.get("admin", False),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TenantError(f"invalid tenant entry {d!r}: {exc}") from None
        if t.max_concurrency < 1 or t.rate_per_s <= 0:
            raise TenantError(f"tenant {t.tenant_id}: limits must be positive")
        if not isinstance(t.admin, bool):  # "false" would be true: only JSON's booleans
            raise TenantError(f"tenant {t.tenant_id}: admin must be true or false")
        return t


def load(path: Path) -> dict[str, Tenant]:
    """tenant_id -> Tenant; a missing file is no tenant at all."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        tenants = [Tenant.from_dict(d) for d in raw["tenants"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TenantError(f"{path}: {exc}") from None
    return {t.tenant_id: t for t in tenants}


def save(path: Path, tenants: dict[str, Tenant]) -> None:
    """Atomically (a reader never sees half a file), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tenants": [asdict(t) for t in tenants.values()]}, indent=2))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


class TenantDirectory:
    """The tenants file as the API sees it: re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version: tuple[int, int, int] | None = None
        self.by_key: dict[str, Tenant] = {}
        self.tenants: dict[str, Tenant] = {}
        self.refresh()

    def refresh(self) -> bool:
        """True when the file changed and was re-read. A broken file keeps the previous
        tenants (and raises), so a bad edit cannot lock every client out. A change is a
        new mtime, inode or size: `save` replaces the file, so two saves within one tick
        of the file system's clock (a key made, then revoked) are told apart too."""
        try:
            st = self.path.stat()
            version: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            version = None
        if version == self.version:
            return False
        tenants = load(self.path)
        self.version = version
        self.tenants = tenants
        self.by_key = {h: t for t in tenants.values() for h in t.key_sha256}
        return True

    def authenticate(self, key: str) -> Tenant | None:
        return self.by_key.get(hash_key(key))
