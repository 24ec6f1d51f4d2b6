"""The command line: ``tenant-proxy serve|check-config|hash-key|new-key|audit|migrate|export|import|purge|move|dev``,
and the control catalog's ``control|tenants|keys`` (control.py).

The only package that reads argv or the environment; each module holds a group of
subcommands, their arguments and their output.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..config import ConfigError
from . import checks, control, data, migrate, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenant-proxy", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_parsers(sub)
    checks.add_parsers(sub)
    migrate.add_parser(sub)
    data.add_parsers(sub)
    control.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config {getattr(args, 'config', '')} has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from ..control.schema import CatalogError
        from ..pg.classify import DATABASE_ERRORS
        from ..pg.connection import RoleCanBypassRls

        if isinstance(exc, (RoleCanBypassRls, CatalogError)):
            print(f"refusing to start: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, DATABASE_ERRORS):
            print(f"{args.command}: database error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        raise
