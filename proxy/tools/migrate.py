"""``tenant-proxy migrate``: apply the SQL migrations (proxy/sql, linked as deploy/sql) to
one database, each file once, and record them.

* Files run in name order.  Each runs in its own transaction with the row that records
  it, so a failing file leaves nothing of itself behind and every earlier file recorded.
  A file whose first line is ``-- migrate: no-transaction`` (for CREATE INDEX
  CONCURRENTLY and the like, which PostgreSQL refuses inside a transaction block) runs
  statement by statement instead, and is recorded once all of them succeeded: write it so
  it can run again.
* The record is ``tenant_proxy_migrate.migrations``: name, sha256 of the file, when, and
  whether it was applied or adopted.  Its own schema: ``tenant_proxy`` is the control
  catalog's, created and owned by its role.  Nothing in it is granted to PUBLIC.
* An applied file that has changed since is refused, naming it, before anything runs;
  unless the new version says, in a line ``-- migrate: supersedes <sha256>``, that it
  replaces the version applied (a change that only makes the file run where the old one
  could not, such as another version of an extension).  Then the new checksum is
  recorded and the file is not run again.
* A database set up before this command existed (by psql or compose's initdb) has no
  record: the files whose objects are all there are adopted (recorded, not run), from the
  first file on, stopping at the first whose objects are missing (ADOPTION_EVIDENCE).
* Two runs at once: a session advisory lock on the migrating connection serialises them;
  the second waits, then finds everything applied.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from pglast import split

from ..config import redact_dsn

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
SCHEMA = "tenant_proxy_migrate"
TABLE = f"{SCHEMA}.migrations"
NO_TRANSACTION = "-- migrate: no-transaction"
_SUPERSEDES = re.compile(r"^-- migrate: supersedes ([0-9a-f]{64})\s*$", re.MULTILINE)
# pg_advisory_lock's key: the bytes of "tpmigrat" as a bigint, so no other lock collides by accident.
LOCK_KEY = int.from_bytes(b"tpmigrat", "big")
_SUPERUSER_HINT = ("the migrations create roles, event triggers and a function that reads pg_shadow: "
                   "run migrate as a superuser (docs/deploy.md)")

_BOOTSTRAP = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {TABLE} (
  name        text PRIMARY KEY,
  sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{{64}}$'),
  applied_at  timestamptz NOT NULL DEFAULT now(),
  how         text NOT NULL CHECK (how IN ('applied', 'adopted'))
);
REVOKE ALL ON {TABLE} FROM PUBLIC;
"""

# The files that predate this command, and what each leaves in a database that only it
# creates there (checked in this database, not cluster-wide: roles exist once per cluster,
# so a role alone proves nothing about this database; to_regrole, never ::regrole, which
# fails on a cluster without the role).  Files added after migrate existed are never
# adopted: migrate itself applies them.
ADOPTION_EVIDENCE: dict[str, tuple[str, str]] = {
    "001_roles.sql": ("roles app and app_owner, app_owner granted CREATE on schema public", """
        SELECT to_regrole('app') IS NOT NULL AND to_regrole('app_owner') IS NOT NULL AND EXISTS (
          SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a
          WHERE n.nspname = 'public' AND a.grantee = to_regrole('app_owner') AND a.privilege_type = 'CREATE')"""),
    "002_tenant_context.sql": ("function public.current_tenant_id()",
                               "SELECT to_regprocedure('public.current_tenant_id()') IS NOT NULL"),
    "003_hardening.sql": ("set_config() not executable by PUBLIC", """
        SELECT NOT has_function_privilege('public', 'pg_catalog.set_config(text, text, boolean)', 'EXECUTE')"""),
    "004_pgbouncer_auth.sql": ("function pgbouncer.get_auth(text)",
                               "SELECT to_regprocedure('pgbouncer.get_auth(text)') IS NOT NULL"),
    "005_partitions.sql": ("event trigger confine_partitions",
                           "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'confine_partitions')"),
    "006_control.sql": ("role tenant_proxy_control granted CREATE on this database", """
        SELECT to_regrole('tenant_proxy_control') IS NOT NULL AND EXISTS (
          SELECT 1 FROM pg_database d, aclexplode(d.datacl) a
          WHERE d.datname = current_database() AND a.grantee = to_regrole('tenant_proxy_control')
            AND a.privilege_type = 'CREATE')"""),
    "010_events.sql": ("partitioned table public.events", """
        SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass('public.events') AND relkind = 'p')"""),
    "020_idempotency.sql": ("table public.idempotency_keys",
                            "SELECT to_regclass('public.idempotency_keys') IS NOT NULL"),
}


class MigrateError(Exception):
    """Migrating stopped; the message names the file or the connection and what to do."""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str
    sha256: str

    @property
    def transactional(self) -> bool:
        return not self.sql.startswith(NO_TRANSACTION)

    @property
    def supersedes(self) -> frozenset[str]:
        """The checksums of the earlier versions of this file it may replace where they were applied."""
        return frozenset(_SUPERSEDES.findall(self.sql))


def load(directory: Path) -> list[Migration]:
    """The directory's ``*.sql`` files in name order, with their checksums."""
    paths = sorted(directory.glob("*.sql"))
    if not paths:
        raise MigrateError(f"no *.sql files in {directory}")
    out = []
    for path in paths:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MigrateError(f"{path.name}: not UTF-8 ({exc})") from None
        out.append(Migration(path.name, text, hashlib.sha256(data).hexdigest()))
    return out


def _pg_message(exc: BaseException) -> str:
    """PostgreSQL's error as psql would show its essentials: message, SQLSTATE, detail, hint."""
    if not isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__}: {exc}"
    text = f"{exc.args[0] if exc.args else exc} (SQLSTATE {exc.sqlstate})"
    for label in ("detail", "hint"):
        value = getattr(exc, label, None)
        if value:
            text += f"; {label}: {value}"
    return text


async def connect(dsn: str, timeout_s: float = 10.0) -> asyncpg.Connection:
    """A direct connection (not through PgBouncer: the lock is a session's)."""
    try:
        return await asyncpg.connect(dsn, statement_cache_size=0, timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise MigrateError(f"cannot connect to {redact_dsn(dsn)}: {_pg_message(exc)}") from None


async def _lock(conn: Any, say: Callable[[str], None]) -> None:
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            say("waiting for another migrate run on this database to finish")
            await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        async with conn.transaction():
            await conn.execute(_BOOTSTRAP)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise MigrateError(f"cannot take the migration lock or create {TABLE}: {_pg_message(exc)}; "
                           f"{_SUPERUSER_HINT}") from None


async def _recorded(conn: Any) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(f"SELECT name, sha256, applied_at, how FROM {TABLE} ORDER BY name")
    return {row["name"]: row for row in rows}


def check_unchanged(files: list[Migration], recorded: dict[str, Any]) -> None:
    """Refuse when a recorded file changed or is gone, before anything runs."""
    by_name = {m.name: m for m in files}
    changed = [name for name, row in recorded.items() if name in by_name and by_name[name].sha256 != row["sha256"]
               and row["sha256"] not in by_name[name].supersedes]
    if changed:
        row = recorded[changed[0]]
        also = f", and so have {', '.join(changed[1:])}" if changed[1:] else ""
        raise MigrateError(
            f"{changed[0]} has changed since it was {row['how']} on {row['applied_at']:%Y-%m-%d %H:%M:%S%z} "
            f"(sha256 {row['sha256'][:12]}..., the file now {by_name[changed[0]].sha256[:12]}...){also}: "
            "an applied migration must not change; put the change in a new file. Nothing was applied")
    unknown = sorted(set(recorded) - set(by_name))
    if unknown:
        raise MigrateError(f"this database has {', '.join(unknown)} recorded, which these migrations do not include "
                           "(a newer tenant-proxy migrated it?): use that version. Nothing was applied")


async def adopt(conn: Any, files: list[Migration], say: Callable[[str], None]) -> set[str]:
    """Record, without running them, the leading files whose objects are already here."""
    adopted: list[Migration] = []
    for m in files:
        evidence = ADOPTION_EVIDENCE.get(m.name)
        if evidence is None or not await conn.fetchval(evidence[1]):
            break
        adopted.append(m)
    if adopted:
        async with conn.transaction():
            await conn.executemany(f"INSERT INTO {TABLE} (name, sha256, how) VALUES ($1, $2, 'adopted')",
                                   [(m.name, m.sha256) for m in adopted])
        for m in adopted:
            say(f"{m.name}: adopted (set up before migrate existed: found {ADOPTION_EVIDENCE[m.name][0]}; not run)")
    return {m.name for m in adopted}


async def _apply(conn: Any, m: Migration) -> None:
    record = f"INSERT INTO {TABLE} (name, sha256, how) VALUES ($1, $2, 'applied')"
    if m.transactional:
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute(record, m.name, m.sha256)
        return
    statements = list(split(m.sql, with_parser=False))
    for number, statement in enumerate(statements, 1):
        try:
            await conn.execute(statement)
        except asyncpg.PostgresError as exc:
            exc.add_note(f"statement {number} of {len(statements)}; the ones before it stay applied "
                         "(no transaction), the file is not recorded and runs whole next time")
            raise
    await conn.execute(record, m.name, m.sha256)


def _failure(m: Migration, exc: BaseException) -> MigrateError:
    what = _pg_message(exc)
    notes = "; ".join(getattr(exc, "__notes__", []))
    if m.transactional:
        what += "; its transaction was rolled back, the files before it stay applied"
    else:
        what += f"; {notes}"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        what += f"; {_SUPERUSER_HINT}"
    elif isinstance(exc, asyncpg.ActiveSQLTransactionError):
        what += f"; a file with statements that cannot run in a transaction block starts with `{NO_TRANSACTION}`"
    return MigrateError(f"{m.name} failed: {what}")


async def migrate(dsn: str, directory: Path, say: Callable[[str], None]) -> int:
    """Apply the directory's pending files to the database; the number applied.  Prints one
    line per file through ``say``; raises MigrateError (nothing traced back) on failure."""
    files = load(directory)
    conn = await connect(dsn)
    try:
        await _lock(conn, say)
        recorded = await _recorded(conn)
        check_unchanged(files, recorded)
        done = set(recorded) or await adopt(conn, files, say)
        applied = 0
        for m in files:
            if m.name in recorded and recorded[m.name]["sha256"] != m.sha256:
                await conn.execute(f"UPDATE {TABLE} SET sha256 = $2 WHERE name = $1", m.name, m.sha256)
                say(f"{m.name}: superseded the version {recorded[m.name]['how']} here "
                    f"(sha256 {recorded[m.name]['sha256'][:12]}...); recorded, not run again")
            elif m.name in recorded:
                say(f"{m.name}: already applied")
            elif m.name not in done:
                started = time.monotonic()
                try:
                    await _apply(conn, m)
                except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    raise _failure(m, exc) from None
                applied += 1
                say(f"{m.name}: applied ({time.monotonic() - started:.2f} s)")
        if not applied:
            say(f"nothing to apply: all {len(files)} files are recorded in {TABLE}")
        return applied
    except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError) as exc:
        raise MigrateError(f"{redact_dsn(dsn)}: {_pg_message(exc)}") from None
    finally:
        try:
            await conn.close(timeout=5)
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError):
            conn.terminate()
