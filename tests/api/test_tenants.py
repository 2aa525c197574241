"""Tenants: keys stored hashed, ownership by account prefix, live reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streams.api.tenants import (
    Tenant,
    TenantDirectory,
    TenantError,
    hash_key,
    key_id,
    new_key,
    revoke,
    save,
)


def test_keys_are_stored_hashed_and_authenticate(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    key = new_key("acme")
    save(path, {"acme": Tenant("acme", "acme-", [hash_key(key)])})
    assert key not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    directory = TenantDirectory(path)
    tenant = directory.authenticate(key)
    assert tenant is not None and tenant.owns("acme-42") and not tenant.owns("globex-1")
    assert directory.authenticate(key + "x") is None


def test_a_changed_file_is_reread_and_a_broken_one_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    save(path, {"acme": Tenant("acme", "acme-", ["h"], max_concurrency=10)})
    directory = TenantDirectory(path)
    save(path, {"acme": Tenant("acme", "acme-", ["h"], max_concurrency=5)})
    os.utime(path, (1, 1))  # a distinct mtime, whatever the clock's resolution
    assert directory.refresh() and directory.tenants["acme"].max_concurrency == 5
    path.write_text("{not json")
    os.utime(path, (2, 2))
    with pytest.raises(TenantError):
        directory.refresh()
    assert directory.tenants["acme"].max_concurrency == 5


def test_invalid_entries_are_refused() -> None:
    with pytest.raises(TenantError, match="account_prefix"):
        Tenant.from_dict({"tenant_id": "a"})
    assert Tenant.from_dict({"tenant_id": "all", "account_prefix": ""}).owns("anyone")
    with pytest.raises(TenantError, match="limits"):
        Tenant.from_dict({"tenant_id": "a", "account_prefix": "a-", "rate_per_s": 0})


def test_a_key_is_revoked_by_its_id_or_by_itself_and_an_unknown_one_is_an_error() -> None:
    first, second, other = new_key("acme"), new_key("acme"), new_key("globex")
    tenants = {
        "acme": Tenant("acme", "acme-", [hash_key(first), hash_key(second)]),
        "globex": Tenant("globex", "globex-", [hash_key(other)]),
    }
    assert revoke(tenants, key_id(hash_key(first))).tenant_id == "acme"
    assert tenants["acme"].key_sha256 == [hash_key(second)]
    with pytest.raises(TenantError, match="no key"):
        revoke(tenants, key_id(hash_key(first)))  # already gone
    with pytest.raises(TenantError, match="of tenant acme"):
        revoke(tenants, key_id(hash_key(other)), "acme")  # globex's, not acme's
    assert revoke(tenants, second, "acme").key_sha256 == []  # the key itself names it too
    assert tenants["globex"].key_sha256 == [hash_key(other)]


def test_a_revocation_within_the_same_clock_tick_is_seen(tmp_path: Path) -> None:
    """A key replaced by another (same file size) at the same mtime: the file is a new
    one (save replaces it), so the change is still seen."""
    path = tmp_path / "tenants.json"
    old, new = new_key("acme"), new_key("acme")
    save(path, {"acme": Tenant("acme", "acme-", [hash_key(old)])})
    directory = TenantDirectory(path)
    before = path.stat()
    save(path, {"acme": Tenant("acme", "acme-", [hash_key(new)])})
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert directory.refresh()
    assert directory.authenticate(old) is None and directory.authenticate(new) is not None
