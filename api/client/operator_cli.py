"""Operator commands that act on Redis directly (no gateway): API keys, retention, quotas.

`heartcluster keys create|list|revoke|rotate --tenant T`, `heartcluster retention --tenant T`
and `heartcluster tenants set|show TENANT` (quotas; `--reset NAME` returns one to the default).
Keys are shown once, when created or rotated; listings show only their ids (the start of their
SHA-256), which is also what revoke and rotate take.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from shared.core.config import Settings
from shared.core.quotas import QUOTA_NAMES, QuotaStore, default_quotas
from shared.core.tenants import TenantStore, validate_tenant


def _tenants() -> TenantStore:
    return TenantStore(redis.Redis.from_url(Settings.from_env().redis_url))


def _reporting(handler: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """A bad tenant, unknown key id or unreachable Redis as one line and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, KeyError, redis.RedisError) as error:
            message = error.args[0] if isinstance(error, KeyError) else error
            print(f"error: {message}", file=sys.stderr)
            return 2

    return run


def _create(args: argparse.Namespace) -> int:
    key = _tenants().create_key(args.tenant)
    print(f"API key for tenant {args.tenant!r} (shown once; keep it secret):")
    print(key)
    return 0


def _list(args: argparse.Namespace) -> int:
    keys = _tenants().list_keys(args.tenant)
    if not keys:
        print(f"tenant {args.tenant!r} has no keys", file=sys.stderr)
    for key in keys:
        created = key["created_at"]
        when = datetime.fromtimestamp(created, UTC).isoformat() if created else "unknown"
        print(f"{key['id']}  created {when}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    _tenants().revoke_key(args.tenant, args.key_id)
    print(f"revoked key {args.key_id} of tenant {args.tenant!r}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    key = _tenants().rotate_key(args.tenant, args.key_id)
    print(f"revoked key {args.key_id}; new API key for {args.tenant!r} (shown once):")
    print(key)
    return 0


def _retention(args: argparse.Namespace) -> int:
    tenants = _tenants()
    if args.days is not None or args.default:
        tenants.set_retention_days(args.tenant, None if args.default else args.days)
    days = tenants.retention_days(args.tenant)
    print(
        f"tenant {args.tenant!r}: "
        + (
            "the cluster default (HEARTCLUSTER_RETENTION_DAYS)"
            if days is None
            else f"{days:g} days"
        )
    )
    return 0


def _quotas() -> QuotaStore:
    settings = Settings.from_env()
    return QuotaStore(redis.Redis.from_url(settings.redis_url), default_quotas(settings))


def _show_quotas(store: QuotaStore, tenant: str) -> None:
    quotas, own = store.get(tenant), store.own(tenant)
    for name in QUOTA_NAMES:
        value = getattr(quotas, name)
        shown = "unlimited" if value == 0 and name != "weight" else f"{value:g}"
        origin = "" if name in own else "  (default, HEARTCLUSTER_TENANT_" + name.upper() + ")"
        print(f"{name:30} {shown}{origin}")


def _set_tenant(args: argparse.Namespace) -> int:
    store = _quotas()
    tenant = validate_tenant(args.tenant)
    values: dict[str, float | None] = {
        name: getattr(args, name) for name in QUOTA_NAMES if getattr(args, name) is not None
    }
    for name in args.reset or []:
        values[name] = None
    if not values:
        raise ValueError("name at least one quota to set (--weight, --max-running, ...)")
    store.set(tenant, values)
    _show_quotas(store, tenant)
    return 0


def _show_tenant(args: argparse.Namespace) -> int:
    _show_quotas(_quotas(), validate_tenant(args.tenant))
    return 0


def add_operator_commands(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="API keys (stored hashed in Redis)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    for name, handler, text in (
        ("create", _create, "create a tenant's API key; prints it alone on the last line"),
        ("list", _list, "a tenant's key ids and creation times"),
        ("revoke", _revoke, "stop a key working at once"),
        ("rotate", _rotate, "a new key for the tenant, the old one revoked"),
    ):
        parser = key_commands.add_parser(name, help=text)
        parser.add_argument("--tenant", required=True, help="lowercase letters, digits, - and _")
        if name in ("revoke", "rotate"):
            parser.add_argument("key_id", help="as `keys list` shows it")
        parser.set_defaults(handler=_reporting(handler))

    retention = commands.add_parser(
        "retention", help="show or set how many days a tenant's finished jobs and uploads stay"
    )
    retention.add_argument("--tenant", required=True)
    choice = retention.add_mutually_exclusive_group()
    choice.add_argument("--days", type=float, help="0 keeps everything")
    choice.add_argument("--default", action="store_true", help="follow the cluster default")
    retention.set_defaults(handler=_reporting(_retention))

    tenants = commands.add_parser("tenants", help="a tenant's quotas (0 is unlimited)")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", required=True)
    show = tenant_commands.add_parser("show", help="a tenant's quotas and where they come from")
    show.add_argument("tenant")
    show.set_defaults(handler=_reporting(_show_tenant))
    set_ = tenant_commands.add_parser("set", help="set some of a tenant's quotas")
    set_.add_argument("tenant")
    for name, kind, text in (
        ("weight", float, "its share of a contended queue (at least 1)"),
        ("max_running", int, "jobs running at once; more wait queued"),
        ("max_queued", int, "jobs waiting; more are refused (429)"),
        ("audio_seconds_per_day", float, "audio generated per UTC day (429 past it)"),
        ("finetune_gpu_seconds_per_day", float, "train-queue run time per UTC day"),
        ("storage_bytes", int, "uploads and artifacts stored"),
        ("submits_per_minute", float, "submit rate (a token bucket; 429 past it)"),
    ):
        set_.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    set_.add_argument(
        "--reset", action="append", choices=QUOTA_NAMES, help="back to the cluster default"
    )
    set_.set_defaults(handler=_reporting(_set_tenant))
