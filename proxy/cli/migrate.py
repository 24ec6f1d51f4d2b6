"""`tenant-proxy migrate`'s subcommand: its arguments, and one line per file on stdout or
one line saying what stopped it on stderr (proxy/tools/migrate.py does the work)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any


def command(args: argparse.Namespace) -> int:
    from ..tools.migrate import SQL_DIR, MigrateError, migrate

    try:
        asyncio.run(migrate(args.dsn, Path(args.dir) if args.dir else SQL_DIR, lambda line: print(line, flush=True)))
    except MigrateError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("migrate", help="apply the SQL migrations not yet applied, each once, recorded with its "
                       "checksum; exit 1 naming the file that failed or changed")
    p.add_argument("--dsn", required=True, help="a superuser, straight to PostgreSQL (not through PgBouncer)")
    p.add_argument("--dir", help="the migrations' directory (default: the ones this tenant-proxy ships, "
                   "deploy/sql in a checkout)")
    p.set_defaults(func=command)
