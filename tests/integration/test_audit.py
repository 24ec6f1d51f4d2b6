"""`tenant-proxy audit` on a real database: each weakness is found, and its fix SQL fixes it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from proxy.tools.devstack import SQL_DIR

from ..fix_gateway import KEY_B, TENANT_A, TENANT_B, Api
from ..fix_stack import Stack

AUDIT_DB = "audit_target"


def _dsn(stack: Stack, db: str) -> str:
    return stack.admin_dsn.rsplit("/", 1)[0] + "/" + db


@pytest_asyncio.fixture
async def target(stack: Stack, admin_db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A fresh database with deploy/sql applied, audited for the gateway role `app`."""
    await admin_db.execute(f"DROP DATABASE IF EXISTS {AUDIT_DB} WITH (FORCE)")
    await admin_db.execute(f"CREATE DATABASE {AUDIT_DB}")
    conn = await asyncpg.connect(_dsn(stack, AUDIT_DB))
    for path in sorted(SQL_DIR.glob("*.sql")):
        await conn.execute(path.read_text())
    yield conn
    await conn.close()
    await admin_db.execute(f"DROP DATABASE IF EXISTS {AUDIT_DB} WITH (FORCE)")


def audit(stack: Stack, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    proc = subprocess.run([sys.executable, "-m", "proxy", "audit", "--dsn", _dsn(stack, AUDIT_DB), "--role", "app",
                           "--format", "json", *extra], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)["findings"]


async def test_migrations_pass_the_audit(stack: Stack, target: asyncpg.Connection) -> None:
    assert audit(stack) == (0, [])


WEAKNESSES = [
    ("ALTER ROLE app BYPASSRLS", "fatal", "role_bypassrls", "app"),
    ("ALTER ROLE app SUPERUSER", "fatal", "role_superuser", "app"),
    ("ALTER TABLE events OWNER TO app", "error", "role_owns_table", "public.events"),
    ("CREATE TABLE plain (id int)", "error", "no_tenant_column", "public.plain"),
    ("ALTER TABLE events DISABLE ROW LEVEL SECURITY", "error", "rls_disabled", "public.events"),
    ("ALTER TABLE events NO FORCE ROW LEVEL SECURITY", "error", "rls_not_forced", "public.events"),
    ("DROP POLICY tenant_isolation ON events", "error", "no_policy", "public.events"),
    ("CREATE POLICY open ON events USING (true)", "error", "policy_permissive_true", "public.events policy open"),
    ("CREATE POLICY mine ON events USING (tenant_id IS NOT NULL) WITH CHECK (true)", "error", "policy_not_tenant",
     "public.events policy mine"),
    ("CREATE POLICY ins ON events FOR UPDATE USING (tenant_id = current_tenant_id())", "warning",
     "policy_no_with_check", "public.events policy ins"),
    ("GRANT EXECUTE ON FUNCTION set_config(text, text, boolean) TO PUBLIC", "error", "public_set_config",
     "set_config"),
    ("GRANT EXECUTE ON FUNCTION set_config(text, text, boolean) TO app", "error", "role_set_config", "set_config"),
    (f"GRANT TEMPORARY ON DATABASE {AUDIT_DB} TO PUBLIC", "error", "public_temp", AUDIT_DB),
    ("GRANT CREATE ON SCHEMA public TO app", "error", "role_create", "public"),
    ("CREATE VIEW leaky AS SELECT * FROM events; GRANT SELECT ON leaky TO app", "error",
     "view_not_security_invoker", "public.leaky"),
    ("CREATE MATERIALIZED VIEW snap AS SELECT * FROM events; GRANT SELECT ON snap TO app", "error",
     "materialized_view", "public.snap"),
    ("GRANT EXECUTE ON FUNCTION pg_advisory_lock(bigint) TO PUBLIC", "error", "role_dangerous_function",
     "pg_advisory_lock(bigint)"),
    ("GRANT EXECUTE ON FUNCTION lo_get(oid) TO app", "error", "role_dangerous_function", "lo_get(oid)"),
    ("CREATE FUNCTION definer() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'", "warning",
     "security_definer", "public.definer()"),
    # issue 18: keys another tenant's row can collide with, advisory and activity functions, role limits
    ("ALTER TABLE events DROP CONSTRAINT events_pkey, ADD PRIMARY KEY (id, created_at)", "error",
     "unique_key_without_tenant", "public.events constraint events_pkey"),
    ("ALTER TABLE events ADD CONSTRAINT events_id_key UNIQUE (id, created_at)", "error",
     "unique_key_without_tenant", "public.events constraint events_id_key"),
    ("CREATE UNIQUE INDEX events_type_once ON events (event_type, created_at) WHERE data ? 'once'", "error",
     "unique_key_without_tenant", "public.events index events_type_once"),
    ("CREATE TABLE keyed (id int PRIMARY KEY, tenant_id uuid NOT NULL); ALTER TABLE keyed ENABLE ROW LEVEL SECURITY;"
     " ALTER TABLE keyed FORCE ROW LEVEL SECURITY; CREATE POLICY p ON keyed USING (tenant_id = current_tenant_id())"
     " WITH CHECK (tenant_id = current_tenant_id())", "error", "unique_key_without_tenant",
     "public.keyed constraint keyed_pkey"),
    ("GRANT EXECUTE ON FUNCTION pg_advisory_xact_lock(bigint) TO app", "error", "role_dangerous_function",
     "pg_advisory_xact_lock(bigint)"),
    ("GRANT EXECUTE ON FUNCTION pg_stat_get_activity(integer) TO PUBLIC", "error", "role_activity_function",
     "pg_stat_get_activity(integer)"),
    ("GRANT EXECUTE ON FUNCTION txid_current() TO app", "error", "role_activity_function", "txid_current()"),
    ("ALTER ROLE app RESET temp_file_limit", "warning", "role_limit_missing", "app temp_file_limit"),
]


async def test_each_weakness_is_found_and_its_fix_clears_it(stack: Stack, target: asyncpg.Connection) -> None:
    for sql, severity, check, obj in WEAKNESSES:
        await target.execute(sql)
        code, findings = audit(stack)
        match = [f for f in findings if f["check"] == check and f["object"] == obj]
        assert match, (sql, findings)
        assert match[0]["severity"] == severity
        assert code == (2 if all(f["severity"] == "warning" for f in findings) else 1)
        if check == "no_tenant_column":  # its "fix" is advice (add the column, or declare the table global)
            assert match[0]["fix"].startswith("--")
            continue
        await target.execute(match[0]["fix"])
        code, findings = audit(stack)
        assert not [f for f in findings if f["check"] == check and f["object"] == obj], (sql, findings)
    # every fix applied: clean again, except the table deliberately left without a tenant column
    code, findings = audit(stack)
    assert [f["check"] for f in findings] == ["no_tenant_column"]
    assert audit(stack, "--schema", "public")[1] == findings
    assert audit(stack, "--schema", "elsewhere") == (0, [])
    await target.execute("DROP TABLE plain")
    assert audit(stack) == (0, [])
    # the fixes are real: the keys start with the tenant column now
    assert await target.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'events_pkey'") \
        == "PRIMARY KEY (tenant_id, id, created_at)"
    assert "(tenant_id, event_type, created_at) WHERE" in await target.fetchval(
        "SELECT pg_get_indexdef('events_type_once'::regclass)")


TENANT_FUNCTIONS = """
CREATE SCHEMA app_fn;
CREATE FUNCTION app_fn.tenant() RETURNS uuid LANGUAGE sql STABLE
  AS $$ SELECT nullif(pg_catalog.current_setting('app.tenant_id', true), '')::uuid $$;
CREATE FUNCTION app_fn.tenant_pl() RETURNS uuid LANGUAGE plpgsql STABLE
  AS $$ BEGIN RETURN nullif(pg_catalog.current_setting('app.tenant_id', true), '')::uuid; END $$;
CREATE FUNCTION app_fn.tenant_via() RETURNS uuid LANGUAGE sql STABLE AS $$ SELECT app_fn.tenant_pl() $$;
CREATE FUNCTION app_fn.fixed() RETURNS uuid LANGUAGE sql STABLE
  AS $$ SELECT 'aaaaaaaa-0000-4000-8000-00000000000a'::uuid $$;
"""


@pytest.mark.parametrize(("function", "flagged"), [
    ("app_fn.tenant()", False), ("app_fn.tenant_pl()", False), ("app_fn.tenant_via()", False),
    ("app_fn.fixed()", True)])
async def test_a_policy_reading_the_tenant_through_a_function(stack: Stack, target: asyncpg.Connection,
                                                              function: str, flagged: bool) -> None:
    """SQL and PL/pgSQL bodies are followed to the setting (one call deep, and two); a
    function that does not read it is still a policy that ignores the tenant."""
    await target.execute(TENANT_FUNCTIONS)
    await target.execute(f"DROP POLICY tenant_isolation ON events; CREATE POLICY tenant_isolation ON events "
                         f"USING (tenant_id = {function}) WITH CHECK (tenant_id = {function})")
    code, findings = audit(stack)
    found = [f for f in findings if f["check"] == "policy_not_tenant"]
    assert bool(found) == flagged, findings
    assert code == (1 if flagged else 0), findings


async def test_text_format_and_bad_dsn(stack: Stack, target: asyncpg.Connection) -> None:
    await target.execute("ALTER TABLE events NO FORCE ROW LEVEL SECURITY")
    proc = subprocess.run([sys.executable, "-m", "proxy", "audit", "--dsn", _dsn(stack, AUDIT_DB), "--role", "app"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert 'fix: ALTER TABLE "public"."events" FORCE ROW LEVEL SECURITY;' in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "proxy", "audit", "--dsn", "postgresql://x:y@127.0.0.1:1/db"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot connect" in proc.stderr and "Traceback" not in proc.stderr


async def test_a_weakened_partition_is_found_and_its_fix_restores_it(stack: Stack, target: asyncpg.Connection) -> None:
    partitions = [r["name"] for r in await target.fetch(
        "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'public.events'::regclass ORDER BY 1")]
    assert len(partitions) >= 9 and "events_default" in partitions  # pg_partman: 4 back, 4 ahead, default
    weak = partitions[0]
    # The event trigger refuses it...
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="refused"):
        await target.execute(f"ALTER TABLE {weak} DISABLE ROW LEVEL SECURITY")
    # ...but not on a replica-role session (event triggers do not fire), nor on a database
    # whose trigger was dropped: the audit is the net under it.
    await target.execute("SET session_replication_role = replica")
    await target.execute(f"ALTER TABLE {weak} DISABLE ROW LEVEL SECURITY, NO FORCE ROW LEVEL SECURITY")
    await target.execute(f"CREATE POLICY wide ON {weak} USING (true)")
    await target.execute("RESET session_replication_role")
    code, findings = audit(stack)
    assert code == 1
    assert [(f["severity"], f["check"], f["object"]) for f in findings] == [
        ("error", "partition_weaker_than_parent", f"public.{weak}")]
    message, fix = findings[0]["message"], findings[0]["fix"]
    assert "public.events" in message and "not enabled" in message and "not forced" in message
    assert "wide" in message
    assert fix == (f'DROP POLICY "wide" ON "public"."{weak}"; '
                   f'ALTER TABLE "public"."{weak}" ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;')
    await target.execute(fix)  # with the event trigger on: the fix leaves it no weaker at every step
    assert audit(stack) == (0, [])

    # a missing restrictive policy of the parent is a weakness too; its fix recreates it
    await target.execute("CREATE POLICY no_x ON events AS RESTRICTIVE "
                         "USING (tenant_id = current_tenant_id() AND event_type <> 'x') "
                         "WITH CHECK (tenant_id = current_tenant_id() AND event_type <> 'x')")
    await target.execute("SET session_replication_role = replica")
    await target.execute(f"DROP POLICY no_x ON {weak}")
    await target.execute("RESET session_replication_role")
    code, findings = audit(stack)
    assert [f["object"] for f in findings] == [f"public.{weak}"]
    assert "restrictive policy no_x of its parent is missing" in findings[0]["message"]
    await target.execute(findings[0]["fix"])
    assert audit(stack) == (0, [])


# ---------------------------------------------------------------- tenant_ddl.enable_isolation (issue 23 item 2)

NOTES = """
CREATE TABLE public.notes (tenant_id uuid NOT NULL DEFAULT public.current_tenant_id(), id bigserial,
                           body text, PRIMARY KEY (tenant_id, id));
ALTER TABLE public.notes OWNER TO app_owner;
"""


async def test_one_call_makes_a_tenant_table_the_audit_passes(stack: Stack, target: asyncpg.Connection) -> None:
    await target.execute(NOTES)
    code, findings = audit(stack)
    assert code == 1 and "public.notes" in {f["object"] for f in findings}, findings
    said = await target.fetchval("SELECT tenant_ddl.enable_isolation('public.notes')")
    assert "notes is a tenant table" in said and "replica identity its primary key" in said
    assert await target.fetchval("SELECT tenant_ddl.enable_isolation('public.notes')") == said  # idempotent
    assert audit(stack) == (0, [])
    # partitioned: every partition gets the same; a key without the tenant column gets FULL
    await target.execute(
        "CREATE TABLE public.logs (tenant_id uuid NOT NULL, at date NOT NULL, line text) PARTITION BY RANGE (at);"
        "CREATE TABLE public.logs_2026 PARTITION OF public.logs FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
        "ALTER TABLE public.logs OWNER TO app_owner; ALTER TABLE public.logs_2026 OWNER TO app_owner")
    said = await target.fetchval("SELECT tenant_ddl.enable_isolation('public.logs')")
    assert "replica identity FULL" in said
    rows = await target.fetch("SELECT relname, relrowsecurity, relforcerowsecurity, relreplident::text AS ident, "
                              "(SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies "
                              "FROM pg_class c WHERE relname IN ('logs', 'logs_2026') ORDER BY 1")
    assert [tuple(r) for r in rows] == [("logs", True, True, "d", 1), ("logs_2026", True, True, "f", 1)]
    assert audit(stack) == (0, [])


async def test_what_it_cannot_make_safe_is_refused_unchanged(target: asyncpg.Connection) -> None:
    await target.execute("CREATE TABLE public.plain (id int PRIMARY KEY, body text);"
                         "CREATE TABLE public.keyed (tenant_id uuid NOT NULL, id int PRIMARY KEY)")
    with pytest.raises(asyncpg.UndefinedColumnError, match="has no column tenant_id"):
        await target.execute("SELECT tenant_ddl.enable_isolation('public.plain')")
    with pytest.raises(asyncpg.InvalidObjectDefinitionError, match="keyed_pkey of keyed lacks tenant_id"):
        await target.execute("SELECT tenant_ddl.enable_isolation('public.keyed')")
    rows = await target.fetch("SELECT relrowsecurity FROM pg_class WHERE relname IN ('plain', 'keyed')")
    assert [r[0] for r in rows] == [False, False]


async def test_the_gateway_confines_a_table_made_so(api: Api, admin_db: asyncpg.Connection) -> None:
    await admin_db.execute("DROP TABLE IF EXISTS public.notes; " + NOTES)
    try:
        await admin_db.execute("SELECT tenant_ddl.enable_isolation('public.notes')")
        for key, tenant in ((None, TENANT_A), (KEY_B, TENANT_B)):
            r = await (api.query("INSERT INTO notes (body) VALUES ($1) RETURNING tenant_id", tenant) if key is None
                       else api.query("INSERT INTO notes (body) VALUES ($1) RETURNING tenant_id", tenant, key=key))
            assert r.status == 200 and r.body["rows"] == [{"tenant_id": tenant}], r.body
        r = await api.query("SELECT body FROM notes")
        assert r.body["rows"] == [{"body": TENANT_A}]
        r = await api.query("INSERT INTO notes (tenant_id, body) VALUES ($1, 'forged')", TENANT_B)
        assert (r.status, r.code) == (403, "rls_violation"), r.body
    finally:
        await admin_db.execute("DROP TABLE IF EXISTS public.notes")
