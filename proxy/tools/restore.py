"""``tenant-proxy import``: load one tenant's export into the same or another database, all or nothing.

Order of work:
1. the export is checked before the database is touched: manifest format and version,
   the tenant it was made for, every file's SHA-256 and row count (:func:`check_export`);
2. one transaction as the gateway's role with the tenant set; the target's tenant
   tables are read from its catalog: every exported table and column must exist there;
3. the tenant must have no rows in any tenant table there, unless ``--replace``, which
   deletes them first (children before parents), in the same transaction;
4. tables load parents first (foreign keys from the target's catalog); every row's
   tenant column must be the tenant, or the whole import is refused;
5. COMMIT, and per-table counts.

The loading path.  PostgreSQL refuses ``COPY FROM`` into a table with row-level
security for a role subject to it, and the gateway's role may not create the TEMP
staging table a superuser-free COPY would need (003_hardening.sql revokes TEMPORARY).
So rows go in as batched INSERTs through the gateway's role with the tenant set, which
keeps RLS the wall here too (each row passes the policies' WITH CHECK):
``INSERT ... SELECT c1::type1, ... FROM ROWS FROM (unnest($1::text[]), ...)``, one
statement per :data:`BATCH_ROWS` rows.  Each value travels as the text COPY wrote and
is cast by the column type's own input function, as COPY itself would, so every type
round-trips exactly; casting to the type without its modifier lets the column's own
assignment check lengths (an explicit ``::varchar(5)`` would silently truncate).
One statement per batch beat asyncpg's ``executemany`` (one pipelined INSERT per row)
on the same rows, and the server runs 5,000 times fewer executions; figures in
benchmarks/RESULTS.md and docs/lifecycle.md.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import TenancyConfig, canonical_tenant_id
from ..pg.classify import DATABASE_ERRORS
from .tenant_data import (
    LifecycleError,
    Manifest,
    Progress,
    TableEntry,
    TenantTable,
    begin_tenant_tx,
    quote_ident,
    read_manifest,
    row_counts,
    tenant_tables,
    verify_files,
)

BATCH_ROWS = 5000
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.S)
_SIMPLE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def check_export(src: Path, tenant: str, id_format: str, progress: Progress) -> Manifest:
    """Read the manifest and verify every file, touching no database."""
    manifest = read_manifest(src)
    if canonical_tenant_id(manifest.tenant, id_format) != tenant:
        raise LifecycleError(f"{src}: this export is of tenant {manifest.tenant}, not {tenant}")
    verify_files(src, manifest, progress)
    return manifest


def _unescape(m: re.Match[bytes]) -> bytes:
    if m.group(1):
        return bytes([int(m.group(1), 8) & 0xFF])
    if m.group(2):
        return bytes([int(m.group(2), 16)])
    char = m.group(3)
    return _SIMPLE.get(char, char)


def decode_copy_line(line: bytes) -> list[str | None]:
    """One row of COPY's text format: tab-separated, ``\\N`` for NULL, backslash escapes."""
    fields: list[str | None] = []
    for raw in line.split(b"\t"):
        if raw == b"\\N":
            fields.append(None)
        else:
            fields.append((_ESCAPE.sub(_unescape, raw) if b"\\" in raw else raw).decode("utf-8"))
    return fields


def read_rows(path: Path) -> Iterator[list[str | None]]:
    """Stream a COPY text file row by row."""
    rest = b""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield decode_copy_line(line)
    if rest:
        raise LifecycleError(f"{path}: ends in the middle of a row")


def _match_target(manifest: Manifest, tables: Sequence[TenantTable], tenancy: TenancyConfig) -> None:
    if manifest.tenant_column != tenancy.column:
        raise LifecycleError(f"the export's tenant column is {manifest.tenant_column}, "
                             f"the target's (tenancy.column) is {tenancy.column}")
    by_name = {t.qualified: t for t in tables}
    problems = []
    for entry in manifest.tables:
        target = by_name.get(entry.qualified)
        if target is None:
            problems.append(f"the target database has no tenant table {entry.qualified}")
            continue
        problems += [f"target table {entry.qualified} has no column {c.name} ({c.type})"
                     for c in entry.columns if target.column(c.name) is None]
    if problems:
        raise LifecycleError("the target schema does not match the export:\n  " + "\n  ".join(problems))


async def load_export(conn: Any, *, manifest: Manifest, src: Path, tenant: str, tenancy: TenancyConfig,
                      replace: bool, progress: Progress) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Load a checked export (see :func:`check_export`) in one transaction.

    Returns (deleted, loaded): per-table counts of the rows ``--replace`` deleted and of
    the rows loaded."""
    await begin_tenant_tx(conn, tenancy, tenant, read_only=False)
    try:
        tables = await tenant_tables(conn, tenancy)
        _match_target(manifest, tables, tenancy)
        existing = [(t, n) for t, n in await row_counts(conn, tables, tenant) if n]
        if existing and not replace:
            listing = ", ".join(f"{t.qualified} ({n:,})" for t, n in existing)
            raise LifecycleError(f"tenant {tenant} already has rows here: {listing}; "
                                 "--replace deletes them first (in the same transaction)")
        deleted = []
        for table, _ in reversed(existing):
            status = await conn.execute(f"DELETE FROM {table.ident} WHERE {table.tenant_filter(tenant)}")
            deleted.append((table.qualified, int(status.rsplit(" ", 1)[-1])))
        entries = {e.qualified: e for e in manifest.tables}
        loaded = []
        for table in tables:
            entry = entries.get(table.qualified)
            if entry is not None:
                rows = await _load_table(conn, table, entry, src, tenant, tenancy, progress)
                loaded.append((table.qualified, rows))
        await conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(*DATABASE_ERRORS):
            await conn.execute("ROLLBACK")
        raise
    return deleted, loaded


async def _load_table(conn: Any, table: TenantTable, entry: TableEntry, src: Path, tenant: str,
                      tenancy: TenancyConfig, progress: Progress) -> int:
    targets = [table.column(c.name) for c in entry.columns]
    columns = ", ".join(quote_ident(c.name) for c in entry.columns)
    casts = ", ".join(f"u.c{i}::{c.base_type}" for i, c in enumerate(targets, 1) if c is not None)
    unnests = ", ".join(f"pg_catalog.unnest(${i}::text[])" for i in range(1, len(targets) + 1))
    aliases = ", ".join(f"c{i}" for i in range(1, len(targets) + 1))
    sql = (f"INSERT INTO {table.ident} ({columns}) OVERRIDING SYSTEM VALUE "
           f"SELECT {casts} FROM ROWS FROM ({unnests}) AS u({aliases})")
    tenant_at = next(i for i, c in enumerate(entry.columns) if c.name == tenancy.column)
    path = src / entry.file
    progress.start(f"load {table.qualified}", entry.rows)
    loaded, batch = 0, []
    for number, row in enumerate(read_rows(path), 1):
        if len(row) != len(entry.columns):
            raise LifecycleError(f"{path}: row {number} has {len(row)} fields, the manifest lists "
                                 f"{len(entry.columns)} columns")
        value = row[tenant_at]
        if value is None or canonical_tenant_id(value, tenancy.id_format) != tenant:
            raise LifecycleError(f"{path}: row {number}: {tenancy.column} is {value!r}, not tenant {tenant}: "
                                 "refusing the whole import")
        batch.append(row)
        if len(batch) == BATCH_ROWS:
            loaded += await _insert(conn, sql, batch, table)
            progress.advance(len(batch))
            batch = []
    if batch:
        loaded += await _insert(conn, sql, batch, table)
        progress.advance(len(batch))
    progress.done(loaded)
    if loaded != entry.rows:
        raise LifecycleError(f"{table.qualified}: loaded {loaded} rows, the manifest says {entry.rows}")
    return loaded


async def _insert(conn: Any, sql: str, batch: list[list[str | None]], table: TenantTable) -> int:
    try:
        status = await conn.execute(sql, *(list(column) for column in zip(*batch, strict=True)))
    except DATABASE_ERRORS as exc:
        raise LifecycleError(f"loading {table.qualified} failed: {type(exc).__name__}: {exc}") from None
    return int(status.rsplit(" ", 1)[-1])
