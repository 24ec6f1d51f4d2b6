"""A tenant's whole data life through the real CLI: export, purge, import (same and another
database), and every kind of bad input refused with a message, a non-zero exit and no
traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
import yaml

from proxy.tools.devstack import APP_PASSWORD, APP_USER, SQL_DIR
from proxy.tools.tenant_data import MANIFEST

from ..fix_gateway import SEED, TENANT_A, TENANT_B, TYPED_TABLE
from ..fix_stack import Stack

TENANT_E = "eeeeeeee-0000-4000-8000-00000000000e"
TARGET_DB = "lifecycle_target"
TABLES = ("events", "typed", "idempotency_keys")

SEED_E = """
INSERT INTO public.events (tenant_id, event_type, data, metadata, created_at) VALUES
  ($1, 'now', '{"k": "v"}', NULL, now()),
  ($1, 'tab', '{"t": "a\\tb", "n": "x\\ny"}', '{"back\\\\slash": "\\u00e9 ✓"}', now() - interval '1 month'),
  ($1, 'old', '{}', '[]', '2020-01-01T00:00:00Z'),
  ($1, 'future', '{"deep": {"er": [1, 2.50, null]}}', NULL, now() + interval '2 months');
INSERT INTO public.typed (tenant_id, u, t, i2, i4, i8, b, n, f8, ts, tsn, d, j, jb, by, ai, at, au, iv, m) VALUES
  ($1, '5f0c9b1e-7d2a-4c1b-9e3f-0a1b2c3d4e5f', E'tab\\there\\nnew line \\\\ back "q" \\r ✓ é', -32768, 2147483647,
   9223372036854775807, false, '-12345678901234567890.000000000000000000001', 0.30000000000000004,
   '2026-11-25 10:20:30.123456+05:30', '2026-11-25 10:20:30.123456', '0001-01-01 BC', '{"a":1,  "a":2}',
   '{"b": [true, null]}', '\\x00010a09ff5c', '{1,NULL,3}', ARRAY[E'a\\tb', 'c,d', '', 'NULL', E'\\\\', '"'],
   '{5f0c9b1e-7d2a-4c1b-9e3f-0a1b2c3d4e5f}', '1 year 2 mons -3 days 04:05:06.789', 'sad'),
  ($1, NULL, '', NULL, NULL, NULL, NULL, 'NaN', '-Infinity', 'infinity', '-infinity', 'infinity', 'null', '{}',
   '\\x', '{}', '{NULL}', NULL, '-00:00:00.000001', NULL),
  ($1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'NaN', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   'happy');
INSERT INTO public.idempotency_keys (tenant_id, key, request_hash, status, response) VALUES
  ($1, E'key\\twith tab', 'h1', 200, '\\x7b0a0900ff7d'),
  ($1, 'pending', 'h2', NULL, NULL);
"""


async def snapshot(conn: asyncpg.Connection, tenant: str = TENANT_E) -> dict[str, list[str]]:
    """Every row of the tenant, each as PostgreSQL's own text of the whole row."""
    return {t: [r["row"] for r in await conn.fetch(
        f"SELECT x::text AS row FROM public.{t} x WHERE tenant_id = $1 ORDER BY x::text", tenant)]
        for t in TABLES}


def cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def write_config(path: Path, dsn: str) -> str:
    path.write_text(yaml.safe_dump({
        "database": {"dsn": dsn},
        "auth": {"api_keys": [{"name": "ops", "sha256": "0" * 64, "tenants": ["*"]}]},
    }))
    return str(path)


@pytest.fixture
def config(stack: Stack, tmp_path: Path) -> str:
    return write_config(tmp_path / "gateway.yaml", stack.gateway_dsn)


@pytest_asyncio.fixture
async def tenant_e(admin_db: asyncpg.Connection) -> AsyncIterator[dict[str, list[str]]]:
    """Tenant E's rows in every tenant table (values chosen to trip any lossy encoding)."""
    await admin_db.execute(SEED_E.replace("$1", f"'{TENANT_E}'"))
    try:
        yield await snapshot(admin_db)
    finally:
        for t in TABLES:
            await admin_db.execute(f"DELETE FROM public.{t} WHERE tenant_id = $1", TENANT_E)


@pytest.fixture
def exported(config: str, tenant_e: dict[str, list[str]], tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "export"
    cli("export", "--config", config, "--tenant", TENANT_E, "--out", str(out))
    yield out


async def seed_counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval("SELECT count(*) FROM public.events WHERE tenant_id = $1", t) for t in SEED}


async def test_export_purge_import_round_trip(config: str, tenant_e: dict[str, list[str]],
                                              admin_db: asyncpg.Connection, tmp_path: Path) -> None:
    seeds = await seed_counts(admin_db)
    out = tmp_path / "export"
    proc = cli("export", "--config", config, "--tenant", TENANT_E.upper(), "--out", str(out))
    assert f"exported tenant {TENANT_E}: 9 rows from " in proc.stdout
    assert "export: public.events: 4 rows in" in proc.stderr  # not a terminal: plain lines, no bar
    assert "\r" not in proc.stderr

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["tenant"] == TENANT_E
    assert manifest["source"]["database"] == "appdb" and manifest["source"]["server_version"].startswith("15")
    tables = {f"{t['schema']}.{t['name']}": t for t in manifest["tables"]}
    assert {name: t["rows"] for name, t in tables.items() if name.removeprefix("public.") in TABLES} == {
        "public.events": 4, "public.typed": 3, "public.idempotency_keys": 2}
    assert [c["name"] for c in tables["public.events"]["columns"]] == [
        "id", "tenant_id", "event_type", "data", "metadata", "created_at"]
    for t in manifest["tables"]:
        data = (out / t["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == t["sha256"]
        assert data.count(b"\n") == t["rows"]
        for other in (TENANT_A, TENANT_B):  # RLS and the statement both confine it to the tenant
            assert other.encode() not in data

    proc = cli("purge", "--config", config, "--tenant", TENANT_E)
    assert "public.typed: has 3 rows" in proc.stdout and "nothing was deleted" in proc.stdout
    assert await snapshot(admin_db) == tenant_e
    proc = cli("purge", "--config", config, "--tenant", TENANT_E, "--yes")
    assert "public.events: deleted 4 rows" in proc.stdout and "public.idempotency_keys: deleted 2 rows" in proc.stdout
    assert "purged tenant" in proc.stdout and "9 rows deleted" in proc.stdout
    assert await snapshot(admin_db) == {t: [] for t in TABLES}
    assert await seed_counts(admin_db) == seeds
    proc = cli("purge", "--config", config, "--tenant", TENANT_E, "--yes", expect=1)
    assert "unknown tenant" in proc.stderr

    proc = cli("import", "--config", config, "--tenant", TENANT_E, "--in", str(out))
    assert "public.typed: loaded 3 rows" in proc.stdout and "9 rows" in proc.stdout
    assert await snapshot(admin_db) == tenant_e  # every value exactly as it was
    proc = cli("import", "--config", config, "--tenant", TENANT_E, "--in", str(out), expect=1)
    assert "already has rows here" in proc.stderr and "--replace" in proc.stderr
    proc = cli("import", "--config", config, "--tenant", TENANT_E, "--in", str(out), "--replace",
               "--cluster", "default")
    assert "public.events: deleted 4 existing rows" in proc.stdout and "public.events: loaded 4 rows" in proc.stdout
    assert await snapshot(admin_db) == tenant_e
    assert await seed_counts(admin_db) == seeds


def _edit_manifest(directory: Path, **changes: Any) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _table(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in manifest["tables"] if t["name"] == name)


async def test_bad_input_is_refused_with_a_message(config: str, exported: Path, tmp_path: Path,
                                                   admin_db: asyncpg.Connection,
                                                   tenant_e: dict[str, list[str]]) -> None:
    def refused(*args: str, message: str) -> None:
        proc = cli(*args, expect=1)
        assert message in proc.stderr, proc.stderr

    def copy(name: str) -> Path:
        return Path(shutil.copytree(exported, tmp_path / name))

    unknown = "0f0f0f0f-0000-4000-8000-000000000000"
    refused("export", "--config", config, "--tenant", "not-a-tenant", "--out", str(tmp_path / "x"),
            message="'not-a-tenant' is not a valid uuid tenant id")
    refused("export", "--config", config, "--tenant", unknown, "--out", str(tmp_path / "x"),
            message=f"unknown tenant {unknown}")
    assert not any((tmp_path / "x").iterdir())  # nothing left behind
    refused("purge", "--config", config, "--tenant", unknown, message=f"unknown tenant {unknown}")
    refused("purge", "--config", config, "--tenant", "1234", message="not a valid uuid tenant id")
    refused("export", "--config", config, "--tenant", TENANT_E, "--out", str(exported), message="not empty")

    imp = ("import", "--config", config, "--tenant", TENANT_E, "--replace", "--in")
    refused(*imp, str(tmp_path / "nowhere"), message="no such directory")
    refused(*imp, str(tmp_path / "x"), message="manifest.json: missing")
    refused("import", "--config", config, "--tenant", TENANT_A, "--in", str(exported),
            message=f"this export is of tenant {TENANT_E}, not {TENANT_A}")
    refused(*imp, str(exported), "--cluster", "eu", message="--cluster 'eu': no such cluster")

    events = _table(json.loads((exported / MANIFEST).read_text()), "events")
    tampered = copy("tampered")
    path = tampered / str(events["file"])
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01
    path.write_bytes(bytes(data))
    refused(*imp, str(tampered), message="SHA-256 does not match the manifest")

    truncated = copy("truncated")
    path = truncated / str(events["file"])
    path.write_bytes(path.read_bytes()[:-30])
    refused(*imp, str(truncated), message="SHA-256 does not match the manifest")

    miscounted = copy("miscounted")
    manifest = json.loads((miscounted / MANIFEST).read_text())
    _table(manifest, "events")["rows"] = 5
    (miscounted / MANIFEST).write_text(json.dumps(manifest))
    refused(*imp, str(miscounted), message="4 rows, the manifest says 5")

    future = copy("future")
    _edit_manifest(future, format_version=2)
    refused(*imp, str(future), message="format version 2; this tenant-proxy reads version 1")
    broken = copy("broken")
    (broken / MANIFEST).write_text('{"format": ')
    refused(*imp, str(broken), message="not valid JSON")
    hollow = copy("hollow")
    _edit_manifest(hollow, tables=[{"schema": "public"}])
    refused(*imp, str(hollow), message="malformed manifest")

    # A row of another tenant, with the manifest's checksum made to match: refused row by
    # row, and the whole import rolled back (--replace had already deleted E's rows).
    foreign = copy("foreign")
    path = foreign / str(events["file"])
    path.write_bytes(path.read_bytes().replace(TENANT_E.encode(), TENANT_B.encode(), 1))
    manifest = json.loads((foreign / MANIFEST).read_text())
    _table(manifest, "events")["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (foreign / MANIFEST).write_text(json.dumps(manifest))
    refused(*imp, str(foreign), message=f"tenant_id is '{TENANT_B}', not tenant {TENANT_E}: refusing the whole import")
    assert await snapshot(admin_db) == tenant_e


def _direct_dsn(stack: Stack, database: str) -> str:
    """The gateway's role straight to PostgreSQL (PgBouncer only serves the main database)."""
    parts = urlsplit(stack.admin_dsn)
    return urlunsplit(parts._replace(netloc=f"{APP_USER}:{APP_PASSWORD}@{parts.hostname}:{parts.port}",
                                     path=f"/{database}"))


async def test_import_into_another_database_checks_its_schema(stack: Stack, exported: Path, tmp_path: Path,
                                                              admin_db: asyncpg.Connection,
                                                              tenant_e: dict[str, list[str]]) -> None:
    await admin_db.execute(f"DROP DATABASE IF EXISTS {TARGET_DB} WITH (FORCE)")
    await admin_db.execute(f"CREATE DATABASE {TARGET_DB}")
    admin_dsn = urlunsplit(urlsplit(stack.admin_dsn)._replace(path=f"/{TARGET_DB}"))
    target = await asyncpg.connect(admin_dsn)
    try:
        for path in sorted(SQL_DIR.glob("*.sql")):
            await target.execute(path.read_text())
        config = write_config(tmp_path / "target.yaml", _direct_dsn(stack, TARGET_DB))
        imp = ("import", "--config", config, "--tenant", TENANT_E, "--in", str(exported))

        proc = cli(*imp, expect=1)
        assert "the target schema does not match the export" in proc.stderr
        assert "no tenant table public.typed" in proc.stderr
        await target.execute(TYPED_TABLE)
        await target.execute("ALTER TABLE public.typed DROP COLUMN m")
        proc = cli(*imp, expect=1)
        assert "target table public.typed has no column m (mood)" in proc.stderr
        await target.execute("ALTER TABLE public.typed ADD COLUMN m public.mood")

        proc = cli(*imp)
        assert "imported tenant" in proc.stdout
        assert await snapshot(target) == tenant_e
        assert await target.fetchval("SELECT count(*) FROM public.events WHERE tenant_id <> $1", TENANT_E) == 0
    finally:
        await target.close()
        await admin_db.execute(f"DROP DATABASE IF EXISTS {TARGET_DB} WITH (FORCE)")
