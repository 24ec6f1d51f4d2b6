"""A tenant's data as a whole: which tables hold it, in which order, and the export format.

Shared by ``tenant-proxy export`` (proxy/tools/export.py), ``import`` (proxy/tools/restore.py) and
``purge`` (proxy/tools/purge.py).  Every one of them works as the gateway's own role inside a
transaction that has ``SET LOCAL <guc> = '<tenant>'``, so row-level security confines
them exactly as it confines the gateway; each statement also names the tenant
explicitly, so a table whose RLS was switched off would not widen them either.

A tenant table is a table or partitioned table in ``tenancy.schemas`` with the column
``tenancy.column`` (partitions are reached through their parent), less
``tenancy.global_tables``.  Connections are used duck-typed (asyncpg's interface).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..config import TenancyConfig

FORMAT = "pg-tenant-proxy-export"
FORMAT_VERSION = 1
DATA_FORMAT = "postgresql-copy-text"
MANIFEST = "manifest.json"
# Output settings the export runs under and the import reads back with: values in
# PostgreSQL's text form round-trip exactly through each type's own input function.
SESSION_SETTINGS = {
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}


class LifecycleError(Exception):
    """Bad input or a refusal: the CLI prints the message and exits non-zero."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str       # with its modifier, as format_type prints it: character varying(255)
    base_type: str  # without: what a text value is cast to (the column then applies the modifier)


@dataclass(frozen=True, slots=True)
class TenantTable:
    oid: int
    schema: str
    name: str
    columns: tuple[Column, ...]
    tenant_column: Column

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> str:
        return quote_ident(self.schema) + "." + quote_ident(self.name)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    def tenant_filter(self, tenant: str) -> str:
        """``"tenant_id" = '<id>'::text::uuid``: the tenant named in the statement itself
        (``tenant`` is canonical, so quoting it is all it needs)."""
        return f"{quote_ident(self.tenant_column.name)} = {quote_literal(tenant)}::text::{self.tenant_column.base_type}"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


_TABLES = """
SELECT c.oid, n.nspname, c.relname,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
             ORDER BY a.attnum) AS names,
       ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
             ORDER BY a.attnum) AS types,
       ARRAY(SELECT pg_catalog.format_type(a.atttypid, NULL) FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
             ORDER BY a.attnum) AS base_types
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = c.oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped)
ORDER BY n.nspname, c.relname
"""
# Foreign keys between tenant tables, each side mapped to its partition root (a key
# declared on a partitioned table also has one row per partition).
_FOREIGN_KEYS = """
SELECT DISTINCT pg_catalog.pg_partition_root(k.conrelid) AS child, pg_catalog.pg_partition_root(k.confrelid) AS parent
FROM pg_catalog.pg_constraint k
WHERE k.contype = 'f'
  AND pg_catalog.pg_partition_root(k.conrelid) = ANY($1::oid[])
  AND pg_catalog.pg_partition_root(k.confrelid) = ANY($1::oid[])
"""


async def tenant_tables(conn: Any, tenancy: TenancyConfig) -> list[TenantTable]:
    """The tenant tables, referenced tables before the tables that reference them."""
    rows = await conn.fetch(_TABLES, list(tenancy.schemas), tenancy.column)
    globals_ = set(tenancy.global_tables)
    tables = {}
    for r in rows:
        if r["relname"] in globals_ or f"{r['nspname']}.{r['relname']}" in globals_:
            continue
        columns = tuple(Column(*c) for c in zip(r["names"], r["types"], r["base_types"], strict=True))
        tenant_column = next(c for c in columns if c.name == tenancy.column)
        tables[r["oid"]] = TenantTable(r["oid"], r["nspname"], r["relname"], columns, tenant_column)
    edges = [(k["parent"], k["child"]) for k in await conn.fetch(_FOREIGN_KEYS, list(tables))]
    return [tables[oid] for oid in foreign_key_order(list(tables), edges)]


def foreign_key_order(nodes: Sequence[int], edges: Iterable[tuple[int, int]]) -> list[int]:
    """Nodes with every referenced one (edge parent -> child) before its referencers,
    otherwise in the given order.  A cycle (possible only with deferrable keys) keeps
    the given order among its members."""
    parents: dict[int, set[int]] = {n: set() for n in nodes}
    for parent, child in edges:
        if parent != child and parent in parents and child in parents:
            parents[child].add(parent)
    ordered: list[int] = []
    placed: set[int] = set()
    while len(ordered) < len(nodes):
        ready = [n for n in nodes if n not in placed and parents[n] <= placed]
        if not ready:  # a cycle: take the first remaining node
            ready = [next(n for n in nodes if n not in placed)]
        ordered.append(ready[0])
        placed.add(ready[0])
    return ordered


async def begin_tenant_tx(conn: Any, tenancy: TenancyConfig, tenant: str, *, read_only: bool) -> None:
    """BEGIN with the tenant set, as the gateway does, and the text settings of the format.

    ``tenant`` must already be canonical (proxy.config.canonical_tenant_id)."""
    begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if read_only else "BEGIN"
    settings = "; ".join(f"SET LOCAL {k} = {quote_literal(v)}" for k, v in SESSION_SETTINGS.items())
    await conn.execute(f"{begin}; SET LOCAL {tenancy.guc} = {quote_literal(tenant)}; {settings}")


async def row_counts(conn: Any, tables: Sequence[TenantTable], tenant: str) -> list[tuple[TenantTable, int]]:
    """The tenant's row count in each table (inside the caller's tenant transaction)."""
    return [(t, int(await conn.fetchval(f"SELECT count(*) FROM {t.ident} WHERE {t.tenant_filter(tenant)}")))
            for t in tables]


# -- the manifest -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableEntry:
    schema: str
    name: str
    file: str
    columns: tuple[Column, ...]
    rows: int
    sha256: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Manifest:
    tenant: str
    tenant_column: str
    source: dict[str, str]
    created_at: str
    tables: tuple[TableEntry, ...]

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "format_version": FORMAT_VERSION, "data_format": DATA_FORMAT,
            "tenant": self.tenant, "tenant_column": self.tenant_column, "source": self.source,
            "created_at": self.created_at, "settings": SESSION_SETTINGS,
            "tables": [{"schema": t.schema, "name": t.name, "file": t.file,
                        "columns": [{"name": c.name, "type": c.type, "base_type": c.base_type} for c in t.columns],
                        "rows": t.rows, "sha256": t.sha256} for t in self.tables],
        }, indent=2) + "\n"


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Written last, atomically: a directory without a manifest is no export."""
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    tmp.chmod(0o600)
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> Manifest:
    """Parse and check the manifest's shape (not yet the data files: see verify_files)."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise LifecycleError(f"{directory}: no such directory")
    if not path.is_file():
        raise LifecycleError(f"{path}: missing: not an export, or an export that did not finish")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LifecycleError(f"{path}: not valid JSON ({exc})") from None
    try:
        if raw.get("format") != FORMAT:
            raise LifecycleError(f"{path}: not a {FORMAT} manifest")
        if raw.get("format_version") != FORMAT_VERSION:
            raise LifecycleError(f"{path}: format version {raw.get('format_version')!r}; "
                                 f"this tenant-proxy reads version {FORMAT_VERSION}")
        if raw.get("data_format") != DATA_FORMAT:
            raise LifecycleError(f"{path}: data format {raw.get('data_format')!r}; expected {DATA_FORMAT}")
        tables = []
        for t in raw["tables"]:
            file = str(t["file"])
            if Path(file).name != file or file in ("", ".", "..", MANIFEST):
                raise LifecycleError(f"{path}: table {t['schema']}.{t['name']}: bad file name {file!r}")
            columns = tuple(Column(str(c["name"]), str(c["type"]), str(c["base_type"])) for c in t["columns"])
            tables.append(TableEntry(str(t["schema"]), str(t["name"]), file, columns, int(t["rows"]),
                                     str(t["sha256"])))
        return Manifest(str(raw["tenant"]), str(raw["tenant_column"]), dict(raw.get("source") or {}),
                        str(raw.get("created_at", "")), tuple(tables))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LifecycleError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None


def verify_files(directory: Path, manifest: Manifest, progress: Progress) -> None:
    """Every data file is there, with the manifest's SHA-256 and row count."""
    for t in manifest.tables:
        path = directory / t.file
        if not path.is_file():
            raise LifecycleError(f"{path}: missing (table {t.qualified})")
        progress.start(f"verify {t.qualified}", t.rows)
        digest, rows, tail = hashlib.sha256(), 0, b"\n"
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                n = chunk.count(b"\n")
                rows += n
                progress.advance(n)
                tail = chunk[-1:]
        progress.done(rows)
        if digest.hexdigest() != t.sha256:
            raise LifecycleError(f"{path}: SHA-256 does not match the manifest: the file was changed or truncated")
        if rows != t.rows or tail != b"\n":
            raise LifecycleError(f"{path}: {rows} rows, the manifest says {t.rows}")


# -- progress ---------------------------------------------------------------------------


class Progress:
    """One bar per table on a terminal; plain log lines otherwise (and never both)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, prefix: str = "") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.prefix = prefix
        self.label, self.total, self.count = "", 0, 0
        self.started = self.drawn = 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.count = label, total, 0
        self.started = self.drawn = time.monotonic()
        if not self.tty:
            self._line(f"{label}: {total:,} rows ...")
        else:
            self._draw()

    def advance(self, rows: int) -> None:
        self.count += rows
        if self.tty and time.monotonic() - self.drawn >= 0.1:
            self._draw()

    def done(self, rows: int) -> None:
        self.count = rows
        elapsed = time.monotonic() - self.started
        if self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._line(f"{self.label}: {rows:,} rows in {elapsed:.1f} s")

    def _line(self, text: str) -> None:
        self.stream.write(f"{self.prefix}{text}\n")
        self.stream.flush()

    def _draw(self) -> None:
        self.drawn = now = time.monotonic()
        share = min(1.0, self.count / self.total) if self.total else 1.0
        width = 30
        bar = "#" * int(share * width) + "." * (width - int(share * width))
        rate = self.count / max(now - self.started, 1e-6)
        self.stream.write(f"\r{self.prefix}{self.label[:40]:40} [{bar}] {share:4.0%} "
                          f"{self.count:,}/{self.total:,} rows {rate:,.0f}/s\x1b[K")
        self.stream.flush()
