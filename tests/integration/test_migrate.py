"""`tenant-proxy migrate` on real databases of the test cluster: a fresh one gets every
file once, a second run applies nothing, a changed applied file is refused, a database set
up by psql before migrate existed is adopted, a failing file is named and rolled back,
two runs at once apply each file once, and a missing right or server is said plainly."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest_asyncio

from proxy.tools.devstack import free_port
from proxy.tools.migrate import LOCK_KEY, SQL_DIR, TABLE

from ..fix_stack import Stack

FILES = sorted(p.name for p in SQL_DIR.glob("*.sql"))
Fresh = Callable[[], Awaitable[str]]


def _with(dsn: str, *, db: str | None = None, user: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc if user is None else f"{user}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{db}" if db else parts.path))


def _cmd(dsn: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "migrate", "--dsn", dsn, *extra]


def _result(code: int, stdout: str, stderr: str) -> tuple[int, list[str], str]:
    assert "Traceback" not in stderr, stderr
    return code, stdout.splitlines(), stderr


def migrate(dsn: str, *extra: str) -> tuple[int, list[str], str]:
    proc = subprocess.run(_cmd(dsn, *extra), capture_output=True, text=True, timeout=120)
    return _result(proc.returncode, proc.stdout, proc.stderr)


async def recorded(dsn: str) -> dict[str, tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["name"]: (r["sha256"], r["how"]) for r in await conn.fetch(f"SELECT * FROM {TABLE}")}
    finally:
        await conn.close()


def copy_of_migrations(tmp_path: Path) -> Path:
    target = tmp_path / "sql"
    shutil.copytree(SQL_DIR, target)
    return target


@pytest_asyncio.fixture
async def fresh(stack: Stack) -> AsyncIterator[Fresh]:
    """Makes empty databases on the test cluster (as its superuser); dropped afterwards."""
    admin = await asyncpg.connect(stack.admin_dsn)
    made: list[str] = []

    async def make() -> str:
        name = f"migrate_test_{len(made)}"
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return _with(stack.admin_dsn, db=name)

    yield make
    for name in made:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.close()


async def test_a_fresh_database_gets_every_file_once_and_a_second_run_nothing(stack: Stack, fresh: Fresh) -> None:
    if stack.local is not None:
        # The dev/test stack migrates its brand-new cluster (no roles yet) with this same code.
        assert {how for _, how in (await recorded(stack.admin_dsn)).values()} == {"applied"}
        assert (await recorded(stack.admin_dsn)).keys() == set(FILES)
    dsn = await fresh()
    code, lines, _ = migrate(dsn)
    # The cluster already has the roles (appdb was set up): this database's objects decide, not adopted.
    assert code == 0
    assert [line.split(":")[0] for line in lines] == FILES
    assert all(line.split(": ")[1].startswith("applied") for line in lines), lines
    first = await recorded(dsn)
    assert first.keys() == set(FILES) and {how for _, how in first.values()} == {"applied"}

    code, lines, _ = migrate(dsn)
    assert code == 0
    assert lines == [f"{name}: already applied" for name in FILES] + \
        [f"nothing to apply: all {len(FILES)} files are recorded in {TABLE}"]
    assert await recorded(dsn) == first

    # The record's schema leaves the isolation walls as they were.
    audit = subprocess.run([sys.executable, "-m", "proxy", "audit", "--dsn", dsn, "--role", "app", "--format",
                            "json"], capture_output=True, text=True, timeout=60)
    assert (audit.returncode, json.loads(audit.stdout)["findings"]) == (0, [])


async def test_a_changed_applied_file_is_refused_naming_it(fresh: Fresh, tmp_path: Path) -> None:
    dsn, sql = await fresh(), copy_of_migrations(tmp_path)
    assert migrate(dsn, "--dir", str(sql))[0] == 0
    with (sql / "003_hardening.sql").open("a") as f:
        f.write("\nALTER ROLE app SET work_mem = '8MB';\n")
    (sql / "030_new.sql").write_text("CREATE TABLE public.migrate_new (id int);\n")

    code, lines, err = migrate(dsn, "--dir", str(sql))
    assert code == 1 and lines == []
    assert "003_hardening.sql has changed since it was applied" in err
    assert "Nothing was applied" in err
    assert "030_new.sql" not in await recorded(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.migrate_new')") is None
        # A file recorded that these migrations lack: a newer tenant-proxy migrated this database.
        await conn.execute(f"INSERT INTO {TABLE} (name, sha256, how) VALUES ('999_future.sql', $1, 'applied')",
                           "0" * 64)
    finally:
        await conn.close()
    code, lines, err = migrate(dsn)
    assert code == 1 and lines == []
    assert "this database has 999_future.sql recorded, which these migrations do not include" in err


async def test_a_new_version_that_supersedes_the_applied_one_is_recorded_not_run(fresh: Fresh,
                                                                                tmp_path: Path) -> None:
    """A file may replace its applied version when it says so (``-- migrate: supersedes``
    with that version's checksum, as 010_events.sql does for pg_partman 5): recorded, not
    run.  A line naming any other checksum changes nothing: still refused."""
    dsn, sql = await fresh(), copy_of_migrations(tmp_path)
    first = "CREATE TABLE public.migrate_note (id int);\n"
    (sql / "030_note.sql").write_text(first)
    assert migrate(dsn, "--dir", str(sql))[0] == 0
    old = hashlib.sha256(first.encode()).hexdigest()
    (sql / "030_note.sql").write_text(f"-- migrate: supersedes {'0' * 64}\n{first}")
    code, _, err = migrate(dsn, "--dir", str(sql))
    assert code == 1 and "030_note.sql has changed since it was applied" in err
    second = f"CREATE TABLE IF NOT EXISTS public.migrate_note (id int);\n-- migrate: supersedes {old}\n"
    (sql / "030_note.sql").write_text(second)
    code, lines, err = migrate(dsn, "--dir", str(sql))
    assert code == 0, err
    assert f"030_note.sql: superseded the version applied here (sha256 {old[:12]}...); recorded, not run again" \
        in lines
    assert (await recorded(dsn))["030_note.sql"] == (hashlib.sha256(second.encode()).hexdigest(), "applied")
    assert migrate(dsn, "--dir", str(sql))[1][-1].startswith("nothing to apply")


def test_010_declares_the_version_it_supersedes() -> None:
    text = (SQL_DIR / "010_events.sql").read_text()
    declared = re.findall(r"^-- migrate: supersedes ([0-9a-f]{64})$", text, re.MULTILINE)
    assert declared and hashlib.sha256(text.encode()).hexdigest() not in declared
    assert "'range' ELSE 'native'" in text  # pg_partman 5 and 4


async def test_a_database_set_up_before_migrate_existed_is_adopted(fresh: Fresh, tmp_path: Path) -> None:
    """Set up the old way (every file through one connection, as psql and the fixtures did),
    but before 020 existed; then migrate with 020 and a new 030."""
    dsn, sql = await fresh(), copy_of_migrations(tmp_path)
    conn = await asyncpg.connect(dsn)
    try:
        for name in FILES[:-1]:
            await conn.execute((SQL_DIR / name).read_text())
    finally:
        await conn.close()
    (sql / "030_new.sql").write_text("CREATE TABLE public.migrate_new (id int);\n")

    code, lines, _ = migrate(dsn, "--dir", str(sql))
    assert code == 0
    assert [line.split(" (")[0] for line in lines] == [f"{name}: adopted" for name in FILES[:-1]] + \
        [f"{FILES[-1]}: applied", "030_new.sql: applied"]
    assert "set up before migrate existed: found function pgbouncer.get_auth(text); not run" in lines[3]
    hows = {name: how for name, (_, how) in (await recorded(dsn)).items()}
    assert hows == {**dict.fromkeys(FILES[:-1], "adopted"), FILES[-1]: "applied", "030_new.sql": "applied"}
    assert migrate(dsn, "--dir", str(sql))[1][-1].startswith("nothing to apply")


async def test_a_failing_file_is_named_rolled_back_and_the_earlier_ones_stay(fresh: Fresh, tmp_path: Path) -> None:
    dsn, sql = await fresh(), copy_of_migrations(tmp_path)
    (sql / "030_bad.sql").write_text("CREATE TABLE public.migrate_bad (id int);\nSELECT 1 / 0;\n")
    (sql / "040_after.sql").write_text("CREATE TABLE public.migrate_after (id int);\n")

    code, lines, err = migrate(dsn, "--dir", str(sql))
    assert code == 1
    assert [line.split(":")[0] for line in lines] == FILES
    assert "migrate: 030_bad.sql failed: division by zero (SQLSTATE 22012)" in err
    assert "rolled back, the files before it stay applied" in err
    assert (await recorded(dsn)).keys() == set(FILES)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.migrate_bad')") is None
    finally:
        await conn.close()

    # Not recorded, so it may still be fixed in place; the next run picks up where this stopped.
    (sql / "030_bad.sql").write_text("CREATE TABLE public.migrate_bad (id int);\n")
    code, lines, _ = migrate(dsn, "--dir", str(sql))
    assert code == 0
    assert [line.split(" (")[0] for line in lines[-2:]] == ["030_bad.sql: applied", "040_after.sql: applied"]


async def test_a_file_that_cannot_run_in_a_transaction_needs_the_mark(fresh: Fresh, tmp_path: Path) -> None:
    dsn, sql = await fresh(), copy_of_migrations(tmp_path)
    index = "CREATE INDEX CONCURRENTLY IF NOT EXISTS migrate_idx ON public.idempotency_keys (key);\n"
    (sql / "030_index.sql").write_text(index)
    code, _, err = migrate(dsn, "--dir", str(sql))
    assert code == 1
    assert "030_index.sql failed: CREATE INDEX CONCURRENTLY cannot run inside a transaction block" in err
    assert "starts with `-- migrate: no-transaction`" in err

    (sql / "030_index.sql").write_text("-- migrate: no-transaction\n" + index + "ANALYZE public.idempotency_keys;\n")
    code, lines, _ = migrate(dsn, "--dir", str(sql))
    assert code == 0 and lines[-1].startswith("030_index.sql: applied")
    assert "030_index.sql" in await recorded(dsn)


async def test_two_runs_at_once_apply_each_file_once(fresh: Fresh) -> None:
    dsn = await fresh()
    holder = await asyncpg.connect(dsn)
    try:
        # Hold migrate's lock so both runs are certainly waiting at once, then let them race.
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        procs = [await asyncio.create_subprocess_exec(*_cmd(dsn), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        for _ in range(200):
            if await holder.fetchval(waiting) == 2:
                break
            await asyncio.sleep(0.05)
        assert await holder.fetchval(waiting) == 2
        await holder.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        outputs = [await p.communicate() for p in procs]
    finally:
        await holder.close()
    results = [_result(p.returncode or 0, out.decode(), err.decode()) for p, (out, err) in zip(procs, outputs,
                                                                                                strict=True)]
    assert [code for code, _, _ in results] == [0, 0]
    applied = sorted(line.split(":")[0] for _, lines, _ in results for line in lines if ": applied" in line)
    assert applied == FILES
    assert all(lines[0] == "waiting for another migrate run on this database to finish" for _, lines, _ in results)
    assert (await recorded(dsn)).keys() == set(FILES)


async def test_an_unreachable_server_and_a_missing_right_are_said_plainly(stack: Stack, fresh: Fresh) -> None:
    code, lines, err = migrate(f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/appdb")
    assert code == 1 and lines == []
    assert err.startswith("migrate: cannot connect to postgresql://postgres:<redacted>@127.0.0.1:")
    assert "s3cret-pw" not in err

    dsn = await fresh()
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("DROP ROLE IF EXISTS migrate_nosuper")
        await admin.execute("CREATE ROLE migrate_nosuper LOGIN PASSWORD 'pw'")
        plain = _with(dsn, user="migrate_nosuper:pw")
        code, _, err = migrate(plain)
        assert code == 1
        assert "cannot take the migration lock or create tenant_proxy_migrate.migrations: permission denied" in err
        assert "run migrate as a superuser" in err

        await admin.execute(f"GRANT CREATE ON DATABASE {urlsplit(dsn).path[1:]} TO migrate_nosuper")
        code, lines, err = migrate(plain)
        assert code == 1 and lines == []
        assert err.startswith("migrate: 001_roles.sql failed: must be superuser")
        assert "(SQLSTATE 42501)" in err
        assert "run migrate as a superuser" in err
        assert await admin.fetchval(f"SELECT count(*) FROM {TABLE}") == 0
    finally:
        await admin.execute("DROP OWNED BY migrate_nosuper")
        await admin.close()
    admin = await asyncpg.connect(stack.admin_dsn)
    try:
        await admin.execute("DROP ROLE IF EXISTS migrate_nosuper")
    finally:
        await admin.close()
