"""``tenant-proxy export``: one tenant's rows, every tenant table, one consistent snapshot.

One ``REPEATABLE READ READ ONLY`` transaction as the gateway's role with the tenant set
(proxy/tools/tenant_data.py), so every table is read at the same instant and row-level security
confines the export as it confines the gateway.  Each table is streamed with
``COPY (SELECT ...) TO STDOUT`` in PostgreSQL's text format straight into its file:
memory stays flat however large the tenant, and every type round-trips exactly (the
text is what the type's own output function prints, read back by its input function).
The manifest, written last, records per table its file, columns, row count and SHA-256.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import re
from pathlib import Path
from typing import Any

from ..config import TenancyConfig
from ..pg.classify import DATABASE_ERRORS
from .tenant_data import (
    LifecycleError,
    Manifest,
    Progress,
    TableEntry,
    TenantTable,
    begin_tenant_tx,
    quote_ident,
    row_counts,
    tenant_tables,
    write_manifest,
)


def _prepare_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LifecycleError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise LifecycleError(f"{out}: not empty: export into a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)  # one tenant's whole data


def _file_name(index: int, table: TenantTable) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", table.qualified)
    return f"{index:03d}_{safe}.copy"


async def export_tenant(conn: Any, *, tenant: str, tenancy: TenancyConfig, out: Path,
                        progress: Progress, source: dict[str, str] | None = None) -> Manifest:
    """Write ``tenant``'s rows of every tenant table and the manifest into ``out``.

    ``tenant`` must be canonical.  Raises LifecycleError when the tenant has no rows at
    all (an unknown tenant) or ``out`` is not a new or empty directory."""
    _prepare_dir(out)
    written: list[Path] = []
    try:
        await begin_tenant_tx(conn, tenancy, tenant, read_only=True)
        try:
            tables = await tenant_tables(conn, tenancy)
            if not tables:
                raise LifecycleError(f"no tenant tables (tables with a {tenancy.column} column) in schemas "
                                     f"{', '.join(tenancy.schemas)}")
            counts = await row_counts(conn, tables, tenant)
            if not any(n for _, n in counts):
                raise LifecycleError(f"unknown tenant {tenant}: it has no rows in any tenant table")
            info = await conn.fetchrow("SELECT pg_catalog.current_database() AS db, "
                                       "pg_catalog.current_setting('server_version') AS version")
            entries = []
            for index, (table, expected) in enumerate(counts, 1):
                path = out / _file_name(index, table)
                written.append(path)
                entries.append(await _copy_table(conn, table, tenant, path, expected, progress))
        except BaseException:
            with contextlib.suppress(*DATABASE_ERRORS):
                await conn.execute("ROLLBACK")
            raise
        await conn.execute("ROLLBACK")  # read only: nothing to commit
        manifest = Manifest(
            tenant=tenant, tenant_column=tenancy.column,
            source={"database": info["db"], "server_version": info["version"], **(source or {})},
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            tables=tuple(entries))
        write_manifest(out, manifest)
        return manifest
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


async def _copy_table(conn: Any, table: TenantTable, tenant: str, path: Path, expected: int,
                      progress: Progress) -> TableEntry:
    digest = hashlib.sha256()
    progress.start(table.qualified, expected)
    columns = ", ".join(quote_ident(c.name) for c in table.columns)
    with path.open("wb") as f:
        path.chmod(0o600)

        async def sink(chunk: bytes) -> None:
            f.write(chunk)
            digest.update(chunk)
            progress.advance(chunk.count(b"\n"))

        status = await conn.copy_from_query(
            f"SELECT {columns} FROM {table.ident} WHERE {table.tenant_filter(tenant)}", output=sink)
    rows = int(status.rsplit(" ", 1)[-1])
    progress.done(rows)
    return TableEntry(table.schema, table.name, path.name, table.columns, rows, digest.hexdigest())
