"""``tenant-proxy purge``: erase one tenant's rows from every tenant table (GDPR erasure).

Without ``--yes`` it only counts.  With it, one transaction as the gateway's role with
the tenant set deletes the tenant's rows table by table, tables that reference others
first, so foreign keys between tenant tables hold at every step; row-level security
confines every DELETE, and each also names the tenant.  Idempotency records
(``idempotency_keys``) are a tenant table like any other and go too.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..config import TenancyConfig
from ..pg.classify import DATABASE_ERRORS
from .tenant_data import LifecycleError, begin_tenant_tx, row_counts, tenant_tables


async def purge_tenant(conn: Any, *, tenant: str, tenancy: TenancyConfig, yes: bool) -> list[tuple[str, int]]:
    """Per-table row counts of ``tenant`` (``yes=False``), or the rows deleted (``yes=True``).

    Raises LifecycleError when the tenant has no rows at all."""
    await begin_tenant_tx(conn, tenancy, tenant, read_only=not yes)
    try:
        tables = await tenant_tables(conn, tenancy)
        counts = await row_counts(conn, tables, tenant)
        if not any(n for _, n in counts):
            raise LifecycleError(f"unknown tenant {tenant}: it has no rows in any tenant table, nothing to purge")
        if not yes:
            await conn.execute("ROLLBACK")
            return [(t.qualified, n) for t, n in counts]
        deleted = []
        for table, n in reversed(counts):
            if n:
                status = await conn.execute(f"DELETE FROM {table.ident} WHERE {table.tenant_filter(tenant)}")
                deleted.append((table.qualified, int(status.rsplit(" ", 1)[-1])))
        await conn.execute("COMMIT")
        return deleted
    except BaseException:
        with contextlib.suppress(*DATABASE_ERRORS):
            await conn.execute("ROLLBACK")
        raise
