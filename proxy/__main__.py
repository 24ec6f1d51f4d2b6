"""Command line: ``tenant-proxy serve|check-config|hash-key|new-key|audit|migrate|export|import|purge|move|dev``,
and the control catalog's ``control|tenants|keys`` (proxy/control/cli.py).

``serve --workers N`` (default 1: this process serves) starts N worker processes sharing
the ports (proxy/http/workers.py); SIGTERM drains them all, SIGHUP reloads them all.  A
refused ``--workers`` (below 1, above four per CPU, with port 0) exits 2.

The only module that reads argv or the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import IO, Any, cast

from . import __version__
from .config import ConfigError, Settings, TenancyConfig, load_config
from .http.worker_peers import WorkerSlot
from .observe.access_log import LineBatchHandler
from .policy.auth import hash_key

# The admin token `move` (without a control catalog) and `purge` send to the gateway's admin API.
ADMIN_TOKEN_ENV = "TENANT_PROXY_ADMIN_TOKEN"


def _load(path: str) -> Settings:
    return load_config(path, os.environ)


class _TextOut:
    """A binary write/flush over a text stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, data: bytes) -> int:
        return int(self.stream.write(data.decode()))

    def flush(self) -> None:
        self.stream.flush()


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    # The access log is one JSON object per line on stdout, for log shippers.
    # Written in batches by proxy/observe/access_log.py's thread, in whole lines.
    access = logging.getLogger("tenant_proxy.access")
    # A text stream without a binary buffer (stdout captured by a test or an embedding
    # program) gets the lines decoded.
    handler = LineBatchHandler(getattr(sys.stdout, "buffer", None) or cast(IO[bytes], _TextOut(sys.stdout)))
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False
    access.setLevel(logging.INFO)


async def _serve(settings: Settings, config_path: str, banner: str | None = None,
                 worker: WorkerSlot | None = None) -> None:
    from .http.app import start_gateway

    running = await start_gateway(settings, Path(config_path), os.environ, worker=worker)
    logging.getLogger("tenant_proxy").info(
        "serving on %s:%d (admin %s:%d)", settings.server.host, running.port,
        settings.server.admin_host, running.admin_port)
    if banner:
        print(banner, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[list[str]]] = set()

    def reload() -> None:
        task = asyncio.ensure_future(running.gateway.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    if worker is not None:
        orphan = asyncio.create_task(_stop_if_orphaned(os.getppid(), stop))
    await stop.wait()
    if worker is not None:
        orphan.cancel()
    # Graceful: report not-ready while load balancers notice, then stop accepting, let
    # in-flight requests finish (up to server.shutdown_timeout_s), then close the pools.
    running.gateway.draining = True
    await asyncio.sleep(settings.server.drain_s)
    await running.stop()


async def _stop_if_orphaned(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL, no chance to stop it) stops itself."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logging.getLogger("tenant_proxy").error("the supervisor (pid %d) is gone: stopping", parent)
    stop.set()


def _run(coro_factory: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship
        asyncio.run(coro_factory)  # type: ignore[arg-type]
    else:
        uvloop.run(coro_factory)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from .http.workers import check_count, check_ports, supervise

    if args.worker_slot:  # one of the workers a supervisor started
        settings = _load(args.config)
        _setup_logging(settings.logging.level)
        _run(_serve(settings, args.config, worker=WorkerSlot.parse(args.worker_slot)))
        return 0
    problem = check_count(args.workers, os.cpu_count() or 1)
    if problem is None:
        settings = _load(args.config)
        problem = check_ports(settings, args.workers)
    if problem is not None:
        print(f"serve: {problem}", file=sys.stderr)
        return 2
    _setup_logging(settings.logging.level)
    if args.workers > 1:
        return supervise(args.config, settings, args.workers)
    _run(_serve(settings, args.config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    _load(args.config)
    print(f"{args.config}: ok")
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("hash-key: give the key on standard input", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def cmd_new_key(args: argparse.Namespace) -> int:
    key = "tp_" + secrets.token_urlsafe(32)
    print(f"key:    {key}\nsha256: {hash_key(key)}")
    return 0


async def _audit(args: argparse.Namespace) -> int:
    from .pg.pool import connect_direct
    from .tools.audit import exit_code, format_text, run_audit

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


def _tenant(value: str, settings: Settings) -> str:
    from .config import canonical_tenant_id
    from .tools.tenant_data import LifecycleError

    tenant = canonical_tenant_id(value.strip(), settings.tenancy.id_format)
    if tenant is None:
        raise LifecycleError(f"--tenant {value!r} is not a valid {settings.tenancy.id_format} tenant id "
                             "(tenancy.id_format)")
    return tenant


async def _export(args: argparse.Namespace, settings: Settings) -> int:
    from .pg.pool import connect_direct
    from .tools.export import export_tenant
    from .tools.tenant_data import Progress

    tenant = _tenant(args.tenant, settings)
    conn = await connect_direct(settings.database.dsn)
    try:
        manifest = await export_tenant(conn, tenant=tenant, tenancy=settings.tenancy, out=Path(args.out),
                                       progress=Progress(prefix="export: "))
    finally:
        await conn.close()
    for t in manifest.tables:
        print(f"{t.qualified}: {t.rows} rows -> {t.file}")
    print(f"exported tenant {tenant}: {sum(t.rows for t in manifest.tables)} rows from {len(manifest.tables)} "
          f"tables into {args.out}")
    return 0


async def _import(args: argparse.Namespace, settings: Settings) -> int:
    from .config import DEFAULT_CLUSTER
    from .pg.pool import connect_direct
    from .tools.restore import check_export, load_export
    from .tools.tenant_data import LifecycleError, Progress

    tenant = _tenant(args.tenant, settings)
    cluster = settings.clusters.get(args.cluster)
    if cluster is None and args.cluster != DEFAULT_CLUSTER:
        known = ", ".join(sorted({DEFAULT_CLUSTER, *settings.clusters}))
        raise LifecycleError(f"--cluster {args.cluster!r}: no such cluster in {args.config} (known: {known})")
    dsn = cluster.dsn if cluster is not None else settings.database.dsn
    progress = Progress(prefix="import: ")
    src = Path(args.in_dir)
    manifest = check_export(src, tenant, settings.tenancy.id_format, progress)  # before touching the database
    conn = await connect_direct(dsn)
    try:
        deleted, loaded = await load_export(conn, manifest=manifest, src=src, tenant=tenant,
                                            tenancy=settings.tenancy, replace=args.replace, progress=progress)
    finally:
        await conn.close()
    for name, n in deleted:
        print(f"{name}: deleted {n} existing rows")
    for name, n in loaded:
        print(f"{name}: loaded {n} rows")
    print(f"imported tenant {tenant} into cluster {args.cluster}: {sum(n for _, n in loaded)} rows")
    return 0


async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    from .pg.pool import connect_direct
    from .tools.purge import purge_tenant

    tenant = _tenant(args.tenant, settings)
    conn = await connect_direct(settings.database.dsn)
    try:
        counts = await purge_tenant(conn, tenant=tenant, tenancy=settings.tenancy, yes=args.yes)
    finally:
        await conn.close()
    total = sum(n for _, n in counts)
    verb = "deleted" if args.yes else "has"
    for name, n in counts:
        print(f"{name}: {verb} {n} rows")
    if args.yes:
        print(f"purged tenant {tenant}: {total} rows deleted")
        admin = args.admin_url or f"http://{settings.server.admin_host}:{settings.server.admin_port}"
        print(await _forget_metrics(admin, tenant))
    else:
        print(f"tenant {tenant} has {total} rows; nothing was deleted: run again with --yes to delete them")
    return 0


async def _forget_metrics(admin_url: str, tenant: str) -> str:
    """Ask the running gateway to drop the tenant's metrics series (best effort)."""
    import aiohttp

    try:
        token = os.environ.get(ADMIN_TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                http.delete(f"{admin_url.rstrip('/')}/admin/tenants/{tenant}/metrics", headers=headers) as r:
            if r.status == 200:
                return f"the gateway at {admin_url} dropped the tenant's metrics series"
            return f"note: the gateway at {admin_url} answered {r.status} to dropping the metrics series"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"note: could not reach the gateway at {admin_url} to drop the metrics series ({exc})"


async def _move(args: argparse.Namespace, settings: Settings) -> int:
    from .tools.move import move_tenant

    tenant = _tenant(args.tenant, settings)
    if args.check:
        from .tools.preflight import report

        problems = await report(settings, tenant, args.to)
        for line in problems or ["ready: the online move's requirements hold"]:
            print(line)
        return 1 if problems else 0
    moved = await move_tenant(settings, tenant, args.to, args.admin_url,
                              admin_token=os.environ.get(ADMIN_TOKEN_ENV), offline=args.offline)
    print(f"moved tenant {tenant} to cluster {args.to}: {sum(moved.rows.values())} rows in {moved.total_s:.1f} s, "
          f"writes paused {moved.pause_ms:.0f} ms")
    return 0


def _lifecycle_command(args: argparse.Namespace) -> int:
    from .tools.tenant_data import LifecycleError

    settings = _load(args.config)
    run = {"export": _export, "import": _import, "purge": _purge, "move": _move}[args.command]
    try:
        return asyncio.run(run(args, settings))
    except LifecycleError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"{args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def cmd_dev(args: argparse.Namespace) -> int:
    from .tools.devstack import DEMO_BANNER, LocalStack, StackError, default_dev_dir

    root = Path(args.dir).resolve() if args.dir else default_dev_dir()
    stack = LocalStack(root, pg_port=args.pg_port, bouncer_port=args.bouncer_port, pool_size=args.pool_size)
    try:
        stack.start()
    except StackError as exc:
        print(f"dev: {exc}", file=sys.stderr)
        return 1
    try:
        stack.load_demo()
        settings = _load(args.config)
        _setup_logging(settings.logging.level)
        _run(_serve(settings, args.config, banner=DEMO_BANNER.format(port=settings.server.port,
                                                                      admin_port=settings.server.admin_port)))
    finally:
        stack.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenant-proxy", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the ports (SO_REUSEPORT), each an "
                   "instance of the fleet; /metrics adds them up (default 1: this process serves, no other)")
    p.add_argument("--worker-slot", help=argparse.SUPPRESS)  # index/count/dir, from the supervisor
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file; exit 1 listing every problem")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check_config)

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
    from .tools.migrate_cli import add_parser as add_migrate_parser

    add_migrate_parser(sub)

    p = sub.add_parser("export", help="write one tenant's rows of every tenant table, one consistent snapshot")
    p.add_argument("--config", required=True, help="YAML config: database.dsn (the gateway's role), tenancy.*")
    p.add_argument("--tenant", required=True)
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.set_defaults(func=_lifecycle_command)

    p = sub.add_parser("import", help="load a tenant's export, all or nothing, verified before anything is touched")
    p.add_argument("--config", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--in", dest="in_dir", required=True, help="the export's directory")
    p.add_argument("--cluster", default="default", help="the cluster to load into (default: database.dsn)")
    p.add_argument("--replace", action="store_true", help="delete the tenant's existing rows there first")
    p.set_defaults(func=_lifecycle_command)

    p = sub.add_parser("purge", help="count a tenant's rows; with --yes delete them all (erasure)")
    p.add_argument("--config", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--yes", action="store_true", help="really delete")
    p.add_argument("--admin-url", help="the running gateway's admin API, to drop the tenant's metrics series "
                                       "(default: server.admin_host:admin_port)")
    p.set_defaults(func=_lifecycle_command)

    p = sub.add_parser("move", help="move a tenant to another cluster while the gateway keeps serving")
    p.add_argument("--config", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--to", required=True, help="a cluster name under `clusters:` (`default` is `database`)")
    p.add_argument("--check", action="store_true", help="only check the online move's requirements (logical "
                   "replication, admin roles, replica identities, an empty target) and name what to fix")
    p.add_argument("--offline", action="store_true", help="copy by export and import with the tenant's writes "
                   "paused throughout, for sources without logical replication (wal_level = logical)")
    p.add_argument("--admin-url", help="without control.dsn: the running gateway's admin API (default: "
                                       "server.admin_host:admin_port; token from $TENANT_PROXY_ADMIN_TOKEN)")
    p.set_defaults(func=_lifecycle_command)

    p = sub.add_parser("dev", help="start a throwaway PostgreSQL + PgBouncer with demo data, then serve")
    p.add_argument("--config", default="config/dev.yaml")
    p.add_argument("--dir", help="where the throwaway cluster lives (default: a directory under the temp dir, "
                   "kept between runs)")
    p.add_argument("--pg-port", type=int, default=55432)
    p.add_argument("--bouncer-port", type=int, default=6432)
    p.add_argument("--pool-size", type=int, default=20)
    p.set_defaults(func=cmd_dev)

    from .control.cli import add_parsers

    add_parsers(sub)
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
        from .control.schema import CatalogError
        from .pg.classify import DATABASE_ERRORS
        from .pg.connection import RoleCanBypassRls

        if isinstance(exc, (RoleCanBypassRls, CatalogError)):
            print(f"refusing to start: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, DATABASE_ERRORS):
            print(f"{args.command}: database error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
