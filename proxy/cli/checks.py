"""`tenant-proxy audit`, `hash-key` and `new-key`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ..config import TenancyConfig
from ..policy.auth import hash_key
from .common import load as _load
from .control import new_key


def cmd_hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("hash-key: give the key on standard input", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def cmd_new_key(args: argparse.Namespace) -> int:
    key = new_key()
    print(f"key:    {key}\nsha256: {hash_key(key)}")
    return 0


async def _audit(args: argparse.Namespace) -> int:
    from ..pg.pool import connect_direct
    from ..tools.audit import exit_code, format_text, run_audit

    tenancy = _load(args.config).tenancy if args.config else TenancyConfig()
    conn = await connect_direct(args.dsn)
    try:
        role = args.role or await conn.fetchval("SELECT current_user")
        findings = await run_audit(conn, role=role, schemas=args.schema or tenancy.schemas, column=tenancy.column,
                                   guc=tenancy.guc, global_tables=tenancy.global_tables)
    finally:
        await conn.close()
    if args.format == "json":
        print(json.dumps({"role": role, "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        print(format_text(findings))
    return exit_code(findings)


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_audit(args))
    except (OSError, TimeoutError) as exc:
        print(f"audit: cannot connect: {exc}", file=sys.stderr)
        return 1


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("hash-key", help="read an API key on stdin, print its SHA-256 for the config")
    p.set_defaults(func=cmd_hash_key)

    p = sub.add_parser("new-key", help="print a fresh random API key and its SHA-256")
    p.set_defaults(func=cmd_new_key)

    p = sub.add_parser("audit", help="check the database's isolation walls; exit 0 clean, 1 errors, 2 warnings")
    p.add_argument("--dsn", required=True, help="connect as the gateway's role (or use --role)")
    p.add_argument("--role", help="audit this role instead of the connecting one")
    p.add_argument("--schema", action="append", help="schema holding tenant tables (repeatable)")
    p.add_argument("--config", help="take tenancy settings (column, schemas, global tables) from this config")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_audit)
