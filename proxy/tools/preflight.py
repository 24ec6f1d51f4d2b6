"""Before an online move creates anything: can the source publish the tenant's rows, and
can the target subscribe to them?  Every problem is named with how to fix it.

Checked: the source's settings (``wal_level = logical``, free replication slots
and WAL senders), the target's (logical replication workers), the admin roles (a
publication FOR TABLE needs the tables' owner or a superuser; a subscription in
PostgreSQL 15 needs a superuser), every tenant table's replica identity (a row filter on
UPDATE and DELETE needs the tenant column in it: a primary key that includes the column,
or REPLICA IDENTITY FULL), and that the target holds none of the tenant's rows.
Connections are the clusters' ``admin_dsn`` (direct, not through PgBouncer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_CLUSTER, Settings, TenancyConfig
from ..control.schema import SCHEMA, CatalogError, connect
from .tenant_data import LifecycleError, TenantTable, tenant_tables

OFFLINE_HINT = ("or run `tenant-proxy move --offline`, which pauses the tenant's writes for the whole copy "
                "but needs none of this")


@dataclass(frozen=True, slots=True)
class Problem:
    where: str  # "source", "target" or a table name
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}; fix: {self.fix}"


async def _setting(conn: Any, name: str) -> str:
    return str(await conn.fetchval("SELECT current_setting($1)", name))


async def source_settings(conn: Any) -> list[Problem]:
    out = []
    if (level := await _setting(conn, "wal_level")) != "logical":
        out.append(Problem("source", f"wal_level is {level}",
                           "ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL"))
    slots = int(await _setting(conn, "max_replication_slots"))
    used = int(await conn.fetchval("SELECT count(*) FROM pg_replication_slots"))
    if slots - used < 1:
        out.append(Problem("source", f"max_replication_slots is {slots} and {used} are in use",
                           "raise max_replication_slots (one more per concurrent move), then restart"))
    senders = int(await _setting(conn, "max_wal_senders"))
    busy = int(await conn.fetchval("SELECT count(*) FROM pg_stat_replication"))
    if senders - busy < 1:
        out.append(Problem("source", f"max_wal_senders is {senders} and {busy} are in use",
                           "raise max_wal_senders (one more per concurrent move), then restart"))
    return out


async def target_settings(conn: Any) -> list[Problem]:
    workers = int(await _setting(conn, "max_logical_replication_workers"))
    if workers < 2:  # the apply worker, and one table-sync worker for the initial copy
        return [Problem("target", f"max_logical_replication_workers is {workers}",
                        "set it to at least 2 (and max_worker_processes above it), then restart")]
    return []


async def roles(source: Any, target: Any, tables: list[TenantTable]) -> list[Problem]:
    out = []
    if not await target.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        out.append(Problem("target", f"the admin role {await target.fetchval('SELECT current_user')} is not a "
                           "superuser (PostgreSQL 15 lets only superusers create subscriptions)",
                           "point clusters.<target>.admin_dsn at a superuser"))
    if not await source.fetchval("SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user"):
        out.append(Problem("source", "the admin role has neither SUPERUSER nor REPLICATION",
                           "ALTER ROLE <admin role> REPLICATION, or use a superuser in admin_dsn"))
    not_owned = [t.qualified for t in tables if not await source.fetchval(
        "SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = $1", t.oid)]
    if not_owned and not await source.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        out.append(Problem("source", f"the admin role does not own {', '.join(not_owned)} (a publication FOR "
                           "TABLE needs the owner)", "GRANT app_owner TO <admin role>, or use a superuser"))
    return out


_IDENTITY = """
SELECT c.relreplident::text AS ident,
       (SELECT array_agg(a.attname::text) FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary)
                                       OR (c.relreplident = 'i' AND i.indisreplident))) AS columns
  FROM pg_class c WHERE c.oid = $1
"""


async def replica_identities(source: Any, tables: list[TenantTable], column: str) -> list[Problem]:
    out = []
    for t in tables:
        r = await source.fetchrow(_IDENTITY, t.oid)
        if r["ident"] == "f" or column in (r["columns"] or []):
            continue
        what = "has no replica identity" if r["ident"] == "n" or not r["columns"] else \
            f"has replica identity ({', '.join(r['columns'])}), without {column}"
        out.append(Problem(t.qualified, what + ": a row filter cannot follow its UPDATEs and DELETEs",
                           f"a primary key that starts with {column}, or ALTER TABLE {t.qualified} "
                           "REPLICA IDENTITY FULL"))
    return out


async def target_is_empty(target: Any, tables: list[TenantTable], tenant: str, column: str) -> list[Problem]:
    found = [t.qualified for t in tables if await target.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {t.ident} WHERE {t.tenant_filter(tenant)})")]
    if found:
        return [Problem("target", f"already holds rows of tenant {tenant} in {', '.join(found)}",
                        "purge them there first (`tenant-proxy purge --cluster ...`), if they are a leftover")]
    return []


async def check(source: Any, target: Any, tenancy: TenancyConfig, tenant: str) -> list[Problem]:
    """Every problem found, in the order they would bite; empty when the move can go online."""
    tables = await tenant_tables(source, tenancy)
    return [*await source_settings(source), *await target_settings(target),
            *await roles(source, target, tables), *await replica_identities(source, tables, tenancy.column),
            *await target_is_empty(target, await tenant_tables(target, tenancy), tenant, tenancy.column)]


async def report(settings: Settings, tenant: str, target: str) -> list[str]:
    """`tenant-proxy move --check`: the problems as lines (empty: ready), through the
    clusters' admin_dsn; the tenant's cluster from the control catalog when there is one."""
    if target not in settings.clusters:
        raise LifecycleError(f"--to {target!r}: no such cluster in the config (known: "
                             f"{', '.join(sorted(settings.clusters))})")
    source = await placement(settings, tenant)
    if source == target:
        raise LifecycleError(f"tenant {tenant} is already on cluster {target}")
    src, dst = await open_admin(settings, source, target)
    try:
        problems = await check(src, dst, settings.tenancy, tenant)
    finally:
        await src.close()
        await dst.close()
    return [str(p) for p in problems] + ([f"({OFFLINE_HINT})"] if problems else [])


async def open_admin(settings: Settings, source: str, target: str) -> tuple[Any, Any]:
    """Direct connections to both clusters as their ``admin_dsn`` says."""
    import asyncpg

    dsns = []
    for role, name in (("source", source), ("target", target)):
        dsn = settings.clusters[name].admin_dsn
        if dsn is None:
            where = "database" if name == DEFAULT_CLUSTER else f"clusters.{name}"
            raise LifecycleError(f"{where}.admin_dsn is not set: the {role} cluster {name!r} needs a direct "
                                 f"connection as an admin role ({OFFLINE_HINT})")
        dsns.append(dsn)
    src = await asyncpg.connect(dsns[0], timeout=10)
    try:
        return src, await asyncpg.connect(dsns[1], timeout=10)
    except BaseException:
        await src.close()
        raise


async def placement(settings: Settings, tenant: str) -> str:
    """The tenant's cluster: the control catalog's, or the config's without one."""
    if settings.control.dsn is None:
        return settings.limits_for(tenant).cluster
    try:
        conn = await connect(settings.control.dsn)
    except CatalogError as exc:
        raise LifecycleError(str(exc)) from None
    try:
        cluster = await conn.fetchval(f"SELECT cluster FROM {SCHEMA}.tenants WHERE id = $1", tenant)
    finally:
        await conn.close()
    if cluster is None:
        raise LifecycleError(f"tenant {tenant} is not registered in the control catalog")
    return str(cluster)
