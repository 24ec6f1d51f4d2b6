"""`tenant-proxy export`, `import`, `purge` and `move`: one tenant's data as a whole (the
work is in tools/)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from ..config import Settings
from .common import ADMIN_TOKEN_ENV
from .common import load as _load


def _tenant(value: str, settings: Settings) -> str:
    from ..config import canonical_tenant_id
    from ..tools.tenant_data import LifecycleError

    tenant = canonical_tenant_id(value.strip(), settings.tenancy.id_format)
    if tenant is None:
        raise LifecycleError(f"--tenant {value!r} is not a valid {settings.tenancy.id_format} tenant id "
                             "(tenancy.id_format)")
    return tenant


async def _export(args: argparse.Namespace, settings: Settings) -> int:
    from ..pg.pool import connect_direct
    from ..tools.export import export_tenant
    from ..tools.tenant_data import Progress

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
    from ..config import DEFAULT_CLUSTER
    from ..pg.pool import connect_direct
    from ..tools.restore import check_export, load_export
    from ..tools.tenant_data import LifecycleError, Progress

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
    from ..pg.pool import connect_direct
    from ..tools.purge import purge_tenant

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
    from ..tools.move import move_tenant

    tenant = _tenant(args.tenant, settings)
    if args.check:
        from ..tools.preflight import report

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
    from ..tools.tenant_data import LifecycleError

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


def add_parsers(sub: Any) -> None:
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
