"""`tenant-proxy control|tenants|keys ...`: the catalog from the command line.

Every command takes the config file for ``control.dsn`` (and the clusters, tenant id
format and defaults that values are checked against), makes its change in one
transaction, and exits 1 with one line saying what is wrong on bad input or an
unreachable catalog.  Changes are recorded in the change log as ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import json
import os
import re
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import Settings, load_config
from ..control.catalog import Catalog
from ..control.schema import CatalogError, connect, migrate
from ..policy.auth import hash_key

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def new_key() -> str:
    return "tp_" + secrets.token_urlsafe(32)


def duration_s(text: str, what: str) -> float:
    m = _DURATION.match(text.strip())
    if m is None:
        raise CatalogError(f"{what} {text!r}: give a duration such as 90s, 30m, 12h, 30d or 2w")
    return float(int(m.group(1)) * _UNIT_S[m.group(2)])


def expiry(text: str | None) -> datetime.datetime | None:
    """``--expires``: a duration from now (30d) or an ISO date or time (2027-01-31)."""
    if text is None:
        return None
    if _DURATION.match(text.strip()):
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=duration_s(text, "--expires"))
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise CatalogError(f"--expires {text!r}: give a duration (30d) or an ISO date or time "
                           "(2027-01-31, 2027-01-31T12:00:00Z)") from None
    when = when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)
    if when <= datetime.datetime.now(datetime.UTC):
        raise CatalogError(f"--expires {text!r} is in the past")
    return when


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def _with_catalog(settings: Settings, run: Callable[[Catalog], Awaitable[int]], init: bool = False) -> int:
    dsn = settings.control.dsn
    if dsn is None:
        raise CatalogError("control.dsn is not set in the config: the catalog commands need it (docs/scaling.md)")
    conn = await connect(dsn, checked=not init)
    try:
        if init:
            before, after = await migrate(conn)
            print(f"control catalog: schema version {after}" + ("" if before == after else f" (was {before})"))
        return await run(Catalog(conn, settings))
    finally:
        await conn.close()


def _print_tenant(t: dict[str, Any]) -> None:
    limits = json.dumps(t["limits"], sort_keys=True) if t["limits"] else "-"
    print(f"{t['id']}  {t['state']:<9}  {t['cluster']:<12}  {limits}")


async def _init(args: argparse.Namespace, cat: Catalog) -> int:
    tenants, keys = await cat.import_settings(_actor())
    print(f"imported from {args.config}: {tenants} tenants, {keys} API keys (what the catalog had stays)")
    print(f"catalog version {await cat.version()}")
    return 0


async def _tenants(args: argparse.Namespace, cat: Catalog) -> int:
    action = args.action
    if action == "list":
        for t in await cat.tenants():
            _print_tenant(t)
        return 0
    if args.tenant is None:
        raise CatalogError(f"tenants {action} needs --tenant ID")
    tid = cat.tenant_id(args.tenant)
    if action == "add":
        _print_tenant(await cat.add_tenant(_actor(), tid, cluster=args.cluster))
    elif action == "show":
        row = await cat.tenant(tid)
        if row is None:
            raise CatalogError(f"tenant {tid} is not registered")
        print(json.dumps(row, indent=2, sort_keys=True))
    else:
        # resume also ends a pause a move left behind when it was killed
        state, expect = {"suspend": ("suspended", ("active",)), "resume": ("active", ("suspended", "moving"))}[action]
        _before, after = await cat.update_tenant(_actor(), tid, state=state, expect_state=expect)
        _print_tenant(after)
    return 0


async def _keys(args: argparse.Namespace, cat: Catalog) -> int:
    action = args.action
    if action == "list":
        for k in await cat.keys():
            status = "revoked" if k["revoked_at"] else "active"
            print(f"{k['name']}  {status:<7}  tenants={','.join(k['tenants'])}  expires={k['expires_at'] or '-'}"
                  + (f"  previous key valid until {k['previous_valid_until']}" if k["previous_valid_until"] else ""))
        return 0
    if args.name is None:
        raise CatalogError(f"keys {action} needs --name NAME")
    if action == "revoke":
        await cat.revoke_key(_actor(), args.name)
        print(f"revoked key {args.name!r}: every instance refuses it within seconds")
        return 0
    key = new_key()
    if action == "add":
        if not args.tenant:
            raise CatalogError('keys add needs --tenant ID (repeatable), or --tenant "*" for any registered tenant')
        row = await cat.add_key(_actor(), args.name, hash_key(key), args.tenant, expiry(args.expires))
        print(f"added key {row['name']!r} for tenants {', '.join(row['tenants'])}; the catalog keeps only its "
              "SHA-256, so this is the only time the key is shown:")
    else:
        grace = duration_s(args.grace, "--grace")
        row = await cat.rotate_key(_actor(), args.name, hash_key(key), grace)
        print(f"rotated key {row['name']!r}: the previous key works until {row['previous_valid_until']}; "
              "the new key (shown this once):")
    sys.stdout.flush()
    print(key)
    return 0


def _command(args: argparse.Namespace) -> int:
    run = {"control": _init, "tenants": _tenants, "keys": _keys}[args.command]
    try:
        settings = load_config(args.config, os.environ)
        return asyncio.run(_with_catalog(settings, lambda cat: run(args, cat), init=args.command == "control"))
    except CatalogError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("control", help="create or upgrade the fleet's control catalog, importing the config's "
                                       "tenants and keys")
    p.add_argument("action", choices=("init",))
    p.add_argument("--config", required=True, help="YAML config with control.dsn")
    p.set_defaults(func=_command)

    p = sub.add_parser("tenants", help="register, list, show, suspend or resume tenants in the control catalog")
    p.add_argument("action", choices=("add", "list", "show", "suspend", "resume"))
    p.add_argument("--config", required=True)
    p.add_argument("--tenant", help="the tenant id (all but list)")
    p.add_argument("--cluster", help="add: the cluster its data lives on (default: defaults.cluster)")
    p.set_defaults(func=_command)

    p = sub.add_parser("keys", help="add, list, revoke or rotate API keys in the control catalog")
    p.add_argument("action", choices=("add", "list", "revoke", "rotate"))
    p.add_argument("--config", required=True)
    p.add_argument("--name", help="the key's name (all but list)")
    p.add_argument("--tenant", action="append", help='add: a tenant the key may act for (repeatable; "*": any)')
    p.add_argument("--expires", help="add: when the key stops working: a duration (30d) or an ISO date")
    p.add_argument("--grace", default="1h", help="rotate: how long the previous key keeps working (default 1h)")
    p.set_defaults(func=_command)
