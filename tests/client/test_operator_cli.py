"""`heartcluster keys list|revoke|rotate` and `heartcluster retention` against a real Redis."""

from __future__ import annotations

from api.client.cli import main
from shared.core.quotas import Quotas, QuotaStore
from shared.core.tenants import TenantStore, hash_key


def test_keys_are_listed_revoked_and_rotated(redis_url, redis_client, monkeypatch, capsys):
    monkeypatch.setenv("HEARTCLUSTER_REDIS_URL", redis_url)
    tenants = TenantStore(redis_client)
    old, kept = tenants.create_key("acme"), tenants.create_key("acme")
    assert main(["keys", "list", "--tenant", "acme"]) == 0
    listing = capsys.readouterr().out
    assert hash_key(old)[:12] in listing and old not in listing
    assert main(["keys", "rotate", "--tenant", "acme", hash_key(old)[:12]]) == 0
    new = capsys.readouterr().out.strip().splitlines()[-1]
    assert tenants.tenant_for_key(old) is None and tenants.tenant_for_key(new) == "acme"
    assert main(["keys", "revoke", "--tenant", "acme", hash_key(kept)[:12]]) == 0
    assert tenants.tenant_for_key(kept) is None
    assert main(["keys", "revoke", "--tenant", "acme", "nope"]) == 2
    assert "no key with id 'nope'" in capsys.readouterr().err


def test_retention_is_set_per_tenant(redis_url, redis_client, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HEARTCLUSTER_REDIS_URL", redis_url)
    assert main(["retention", "--tenant", "acme", "--days", "30"]) == 0
    assert TenantStore(redis_client).retention_days("acme") == 30
    assert "30 days" in capsys.readouterr().out
    assert main(["retention", "--tenant", "acme", "--default"]) == 0
    assert TenantStore(redis_client).retention_days("acme") is None
    assert main(["retention", "--tenant", "acme", "--days", "-1"]) == 2


def test_tenants_set_and_show_quotas(redis_url, redis_client, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HEARTCLUSTER_REDIS_URL", redis_url)
    monkeypatch.setenv("HEARTCLUSTER_TENANT_MAX_QUEUED", "500")
    assert main(["tenants", "set", "acme", "--weight", "2", "--max-running", "4"]) == 0
    quotas = QuotaStore(redis_client, Quotas())
    assert quotas.own("acme") == {"weight": 2.0, "max_running": 4}
    assert main(["tenants", "show", "acme"]) == 0
    shown = capsys.readouterr().out
    assert "max_running" in shown and "500  (default, HEARTCLUSTER_TENANT_MAX_QUEUED)" in shown
    assert main(["tenants", "set", "acme", "--reset", "max_running"]) == 0
    assert quotas.own("acme") == {"weight": 2.0}
    assert main(["tenants", "set", "acme", "--weight", "0.5"]) == 2
    assert "weight must be at least 1" in capsys.readouterr().err
    assert main(["tenants", "set", "Bad Name", "--weight", "2"]) == 2
