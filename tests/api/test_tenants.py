"""Tenants: keys stored hashed, ownership by account prefix, live reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streams.api.tenants import Tenant, TenantDirectory, TenantError, hash_key, new_key, save


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
