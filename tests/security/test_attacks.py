"""The attacker's suite: every request tries to escape its tenant or leave state behind on
the one PostgreSQL backend that attacker and victim share (PgBouncer pool size 1).

Each attack must be refused with a 4xx (400 ``statement_rejected`` from the guard, 403
from the database's privileges or RLS), and right after it a victim on the same backend
must still see only its own tenant and no trace of the attacker (``assert_victim_isolated``).
``admin_db`` (superuser, outside RLS) checks that no row was written or changed.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from multidict import CIMultiDict

from ..fix_gateway import KEY_A, KEY_ANY, KEY_B, SEED, TENANT_A, TENANT_B, Api, Reply

A, B = TENANT_A, TENANT_B
KEYS = {A: KEY_A, B: KEY_B}
OTHER = {A: B, B: A}

GUARD = frozenset({(400, "statement_rejected")})
RLS = frozenset({(403, "rls_violation")})
# Either wall may stop it: the guard, or the database's grants/RLS behind it.
BLOCKED = GUARD | RLS
# Quoting that changes the name: the database finds no such function or relation.
NO_SUCH = GUARD | frozenset({(400, "sql_invalid")})
FORBIDDEN = frozenset({(403, "tenant_forbidden")})
BAD_REQUEST = frozenset({(400, "invalid_request")})

SC = f"set_config('app.tenant_id', '{B}', true)"  # set_config aimed at tenant B
READ_B = "(SELECT array_agg(event_type ORDER BY event_type) FROM events)"  # what it hopes to read
SEEDED_B = re.compile(r"(?<![0-9A-Za-z-])b-[12](?![0-9A-Za-z-])")


# ---------------------------------------------------------------- the victim check

VICTIM_PROBE = """
SELECT current_setting('app.tenant_id') AS tenant,
       pg_backend_pid() AS pid,
       current_user::text AS current_user_name,
       session_user::text AS session_user_name,
       current_setting('role') AS role,
       current_setting('search_path') AS search_path,
       current_setting('row_security') AS row_security,
       current_setting('statement_timeout') AS statement_timeout,
       'events'::regclass::oid = 'public.events'::regclass::oid AS events_is_public,
       pg_my_temp_schema()::int AS temp_schema,
       (SELECT coalesce(array_agg(DISTINCT tenant_id::text), '{}') FROM events) AS tenants,
       (SELECT coalesce(array_agg(event_type::text ORDER BY event_type), '{}') FROM events
         WHERE event_type ~ '^[ab]-[0-9]$') AS seeded,
       (SELECT count(*) FROM information_schema.tables WHERE table_type = 'LOCAL TEMPORARY')
         + (SELECT count(*) FROM information_schema.sequences WHERE sequence_schema LIKE 'pg\\_temp%')
         AS temp_relations,
       (SELECT count(*) FROM pg_listening_channels()) AS listening_channels,
       (SELECT count(*) FROM pg_prepared_statements) AS prepared_statements,
       (SELECT count(*) FROM pg_cursors WHERE name <> '') AS cursors,
       (SELECT count(*) FROM pg_largeobject_metadata) AS large_objects
"""


async def backend_pid(api: Api, key: str) -> int:
    """The attacker's backend, from a harmless request made just before the attack."""
    r = await api.query("SELECT pg_backend_pid() AS pid", key=key)
    assert r.status == 200, r.body
    pid: int = r.body["rows"][0]["pid"]
    return pid


async def assert_victim_isolated(api: Api, attacker_pid: int, victim: str = B) -> None:
    """The next request on the shared backend, as ``victim``, sees only itself and a clean session."""
    r = await api.query(VICTIM_PROBE, key=KEYS[victim])
    assert r.status == 200, r.body
    row = r.body["rows"][0]
    assert row["pid"] == attacker_pid, "the victim did not run on the attacker's backend (it was killed or changed)"
    assert row["tenant"] == victim
    assert row["tenants"] == [victim], f"victim sees rows of {row['tenants']}"
    assert row["seeded"] == SEED[victim]
    assert row["current_user_name"] == row["session_user_name"] == "app"
    assert row["role"] == "none"
    assert row["search_path"] == '"$user", public'
    assert row["row_security"] == "on"
    assert row["statement_timeout"] == "5s"
    assert row["events_is_public"] is True, "events resolves to a shadowing relation"
    # Advisory locks and prepared transactions are the cluster's, in views closed to the
    # gateway's role: the autouse fixture checks them as the superuser after each test.
    state = {k: row[k] for k in ("temp_schema", "temp_relations", "listening_channels",
                                 "prepared_statements", "cursors", "large_objects")}
    assert state == dict.fromkeys(state, 0), f"attacker state left on the backend: {state}"


# ---------------------------------------------------------------- what really happened

@dataclass(frozen=True)
class Snapshot:
    events: list[tuple[Any, ...]]
    typed: list[tuple[Any, ...]]

    def count(self, tenant: str) -> int:
        return sum(1 for row in self.events if row[1] == tenant)


async def snapshot(admin_db: asyncpg.Connection) -> Snapshot:
    events = await admin_db.fetch("SELECT id::text, tenant_id::text, event_type, data::text, metadata::text "
                                  "FROM events ORDER BY id")
    typed = await admin_db.fetch("SELECT id, tenant_id::text, t FROM typed ORDER BY id")
    return Snapshot([tuple(r) for r in events], [tuple(r) for r in typed])


async def assert_attack_failed(api: Api, r: Reply, expected: frozenset[tuple[int, str]], attacker_pid: int,
                               victim: str = B) -> None:
    """Both halves of every attack test: (a) refused with a 4xx, (b) the victim unaffected.
    Both are checked and reported together, so a failure shows the leak as well as the status."""
    problems: list[str] = []
    try:
        assert_refused(r, expected)
    except (AssertionError, pytest.fail.Exception) as exc:
        problems.append(f"(a) {exc}")
    try:
        await assert_victim_isolated(api, attacker_pid, victim)
    except AssertionError as exc:
        problems.append(f"(b) {exc}")
    if problems:
        pytest.fail("\n".join(problems))


def assert_refused(r: Reply, expected: frozenset[tuple[int, str]]) -> None:
    assert r.status < 500, f"server error {r.status}: {r.body}"
    if r.status == 200:
        pytest.fail(f"the attack was accepted: {str(r.body)[:600]}")
    assert (r.status, r.code) in expected, f"unexpected refusal {r.status}: {r.body}"
    assert not SEEDED_B.search(str(r.body)), f"the error carries tenant B's data: {r.body}"


@pytest_asyncio.fixture(autouse=True)
async def _reset_backend_after_a_leak(admin_db: asyncpg.Connection) -> AsyncIterator[None]:
    """Fail a test that left advisory locks or prepared transactions of the gateway's role
    behind (views the role itself may not read), and keep one successful attack from
    failing every later test: drop what it left and end the gateway role's backends."""
    yield
    leaked = await admin_db.fetchrow(
        "SELECT (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "        WHERE l.locktype = 'advisory' AND a.usename = 'app') AS advisory_locks, "
        "       (SELECT count(*) FROM pg_prepared_xacts) AS prepared_xacts")
    await admin_db.execute("SELECT lo_unlink(oid) FROM pg_largeobject_metadata")
    await admin_db.execute(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND a.usename = 'app'")
    assert dict(leaked) == {"advisory_locks": 0, "prepared_xacts": 0}, f"attacker state left behind: {dict(leaked)}"


async def row_ids(admin_db: asyncpg.Connection) -> dict[str, str]:
    rows = await admin_db.fetch("SELECT event_type, id::text, created_at::text FROM events "
                                "WHERE event_type IN ('a-1', 'b-1')")
    ids = {r["event_type"]: r for r in rows}
    # events is partitioned on created_at, so its key is (id, created_at)
    return {"<A1_ID>": ids["a-1"]["id"], "<B1_ID>": ids["b-1"]["id"],
            "<A1_AT>": ids["a-1"]["created_at"], "<B1_AT>": ids["b-1"]["created_at"]}


def fill(sql: str, ids: Mapping[str, str]) -> str:
    for placeholder, value in ids.items():
        sql = sql.replace(placeholder, value)
    return sql


# ---------------------------------------------------------------- attacks on /v1/query

def atk(id_: str, sql: str, expected: frozenset[tuple[int, str]] = GUARD, *params: Any,
        attacker: str = A) -> Any:
    return pytest.param(sql, list(params), expected, attacker, id=id_)


SET_CONFIG = [
    atk("sc-plain", f"SELECT {SC}, {READ_B}"),
    atk("sc-double-quoted", f"SELECT \"set_config\"('app.tenant_id', '{B}', true), {READ_B}"),
    atk("sc-mixed-case", f"SELECT SeT_CoNfIg('app.tenant_id', '{B}', true), {READ_B}"),
    atk("sc-unicode-escape", f"SELECT U&\"set\\005fconfig\"('app.tenant_id', '{B}', true), {READ_B}"),
    atk("sc-unicode-uescape", f"SELECT U&\"set!005fconfig\" UESCAPE '!' ('app.tenant_id', '{B}', true), {READ_B}"),
    atk("sc-schema", f"SELECT pg_catalog.set_config('app.tenant_id', '{B}', true), {READ_B}"),
    atk("sc-schema-unicode", f"SELECT U&\"pg\\005fcatalog\".\"set_config\"('app.tenant_id', '{B}', true)"),
    atk("sc-block-comments", f"SELECT /* harmless */ set_config /* x */ ('app.tenant_id', '{B}', true), {READ_B}"),
    atk("sc-line-comment", f"SELECT 1 -- nothing to see\n, {SC}, {READ_B}"),
    atk("sc-comment-markers-in-literals", f"SELECT '/*' || {SC} || '*/', {READ_B}"),
    atk("sc-cte", f"WITH s AS (SELECT {SC} AS t) SELECT s.t, {READ_B} FROM s"),
    atk("sc-cte-materialized", f"WITH s AS MATERIALIZED (SELECT {SC} AS t) SELECT e.* FROM s, events e"),
    atk("sc-cte-recursive", f"WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r "
                            f"WHERE n < 2 AND {SC} IS NOT NULL) SELECT n, {READ_B} FROM r"),
    atk("sc-subquery-where", f"SELECT event_type FROM events WHERE (SELECT {SC}) IS NOT NULL"),
    atk("sc-lateral", f"SELECT e.event_type FROM (SELECT {SC}) s(t), LATERAL (SELECT event_type FROM events) e"),
    atk("sc-function-in-from", f"SELECT * FROM set_config('app.tenant_id', '{B}', true) s, events"),
    atk("sc-rows-from", f"SELECT * FROM ROWS FROM (set_config('app.tenant_id', '{B}', true)) AS r(t)"),
    atk("sc-explain", f"EXPLAIN SELECT {SC}"),
    atk("sc-explain-json", f"EXPLAIN (VERBOSE, FORMAT JSON) SELECT * FROM events WHERE event_type = {SC}"),
    atk("sc-values", f"VALUES ({SC}, {READ_B})"),
    atk("sc-values-in-from", f"SELECT * FROM (VALUES ({SC})) v(t), events"),
    atk("sc-returning", f"INSERT INTO events (event_type, data) VALUES ('sc-ret', '{{}}') RETURNING {SC}"),
    atk("sc-on-conflict-do-update", "INSERT INTO events (id, event_type, data) VALUES ('<A1_ID>', 'x', '{}') "
                                    f"ON CONFLICT (id) DO UPDATE SET event_type = {SC}"),
    atk("sc-update-set", f"UPDATE events SET metadata = to_jsonb({SC})"),
    atk("sc-delete-where", f"DELETE FROM events WHERE {SC} IS NULL"),
    atk("sc-merge", f"MERGE INTO events e USING (SELECT {SC} AS t) s ON false WHEN NOT MATCHED THEN DO NOTHING"),
    atk("sc-order-by", f"SELECT event_type FROM events ORDER BY {SC}"),
    atk("sc-aggregate-filter", f"SELECT count(*) FILTER (WHERE {SC} IS NOT NULL) FROM events"),
    atk("sc-window", f"SELECT row_number() OVER (ORDER BY {SC}) FROM events"),
    atk("sc-union", f"SELECT 'x' UNION ALL SELECT {SC}"),
    atk("sc-array-case", f"SELECT ARRAY[CASE WHEN true THEN {SC} END], {READ_B}"),
    atk("sc-having", f"SELECT 1 HAVING {SC} IS NOT NULL"),
    atk("sc-session-level", f"SELECT set_config('app.tenant_id', '{B}', false)"),
    atk("sc-params", "SELECT set_config($1, $2, false)", GUARD, "app.tenant_id", B),
    atk("sc-row-security-off", "SELECT set_config('row_security', 'off', false)"),
    atk("sc-role", "SELECT set_config('role', 'app_owner', false)"),
    atk("sc-search-path", "SELECT set_config('search_path', 'pg_temp, public', false)"),
    atk("sc-uppercase-quoted-is-another-name", f"SELECT \"SET_CONFIG\"('app.tenant_id', '{B}', true)", NO_SUCH),
    atk("sc-from-b-to-a", f"SELECT set_config('app.tenant_id', '{A}', true), {READ_B}", attacker=B),
]

HIDDEN_SQL = [
    atk("qx-set-config", f"SELECT query_to_xml('select set_config(''app.tenant_id'', ''{B}'', true)', "
                         "true, false, '')"),
    atk("qx-read-events", "SELECT query_to_xml('select * from events', true, false, '')"),
    atk("qx-and-xmlschema", f"SELECT query_to_xml_and_xmlschema('select {SC.replace(chr(39), chr(39) * 2)}', "
                            "true, false, '')"),
    atk("qx-xmlschema", "SELECT query_to_xmlschema('select * from events', true, false, '')"),
    atk("qx-quoted-schema", "SELECT \"pg_catalog\".\"query_to_xml\"('select * from events', true, false, '')"),
    atk("qx-in-cte-xpath", "WITH x AS (SELECT query_to_xml('select 1', true, false, '') AS d) "
                           "SELECT xpath('//text()', d) FROM x"),
    atk("qx-dollar-quoted", f"SELECT query_to_xml($q$select set_config('app.tenant_id', '{B}', true)$q$, "
                            "true, false, '')"),
    atk("ts-stat", f"SELECT * FROM ts_stat('select to_tsvector({SC.replace(chr(39), chr(39) * 2)})')"),
    atk("ts-stat-dollar-quoted", f"SELECT * FROM ts_stat($q$select to_tsvector({SC})$q$)"),
    atk("ts-stat-two-args", "SELECT * FROM pg_catalog.ts_stat('select to_tsvector(event_type) from events', 'a')"),
    atk("ts-rewrite", "SELECT ts_rewrite('a'::tsquery, 'select ''a''::tsquery, "
                      f"to_tsquery({SC.replace(chr(39), chr(39) * 2)})')"),
    atk("table-to-xml", "SELECT table_to_xml('events', true, false, '')"),
    atk("cursor-to-xml", "SELECT cursor_to_xml('c', 1, false, false, '')"),
    atk("schema-to-xml", "SELECT schema_to_xml('public', true, false, '')"),
    atk("database-to-xml", "SELECT database_to_xml(true, false, '')"),
]

# Field-selection syntax: PostgreSQL reads ``(x).f`` and ``rel.f`` as ``f(x)`` / ``f(rel)``
# when f is a one-argument function, so these calls have no FuncCall node.
ATTRIBUTE_NOTATION = [
    atk("attr-advisory-lock", "SELECT (1::bigint).pg_advisory_lock", BLOCKED),
    atk("attr-try-advisory-lock-column", "SELECT (x.n).pg_try_advisory_lock FROM (SELECT 2::bigint AS n) x",
        BLOCKED),
    atk("attr-advisory-lock-shared-whole-row", "SELECT n.pg_advisory_lock_shared FROM int8(3) AS n", BLOCKED),
    atk("attr-try-advisory-lock-shared-quoted", "SELECT (4::bigint).\"pg_try_advisory_lock_shared\"", BLOCKED),
    atk("attr-advisory-lock-unicode", "SELECT (5::bigint).U&\"pg\\005fadvisory\\005flock\"", BLOCKED),
    atk("attr-ts-stat-set-config", f"SELECT ('select to_tsvector({SC.replace(chr(39), chr(39) * 2)})'::text)"
                                   ".ts_stat", BLOCKED),
    atk("attr-ts-stat-advisory-lock", "SELECT ('select to_tsvector(x::text) from (select pg_advisory_lock(11)) "
                                      "s(x)'::text).ts_stat", BLOCKED),
    atk("attr-ts-stat-notify", "SELECT ('select to_tsvector(x::text) from (select pg_notify(''tenant_b'', "
                               "''hi'')) s(x)'::text).ts_stat", BLOCKED),
    atk("attr-ts-stat-large-object", "SELECT ('select to_tsvector(x::text) from "
                                     "(select lo_from_bytea(0, ''exfil'')) s(x)'::text).ts_stat", BLOCKED),
    atk("attr-ts-stat-read-events", "SELECT (q.s).ts_stat FROM (SELECT 'select to_tsvector(event_type) "
                                    "from events'::text AS s) q", BLOCKED),
    atk("attr-lo-create", "SELECT (0::oid).lo_create", BLOCKED),
    atk("attr-lo-import", "SELECT ('/etc/passwd'::text).lo_import", BLOCKED),
    atk("attr-pg-read-file", "SELECT ('/etc/passwd'::text).pg_read_file", BLOCKED),
    atk("attr-cancel-backend", "SELECT (pg_backend_pid()).pg_cancel_backend", BLOCKED),
    atk("attr-terminate-backend", "SELECT (pg_backend_pid()).pg_terminate_backend", BLOCKED),
]

PG_SETTINGS = [
    atk("pgs-update", f"UPDATE pg_settings SET setting = '{B}' WHERE name = 'app.tenant_id'"),
    atk("pgs-update-qualified", f"UPDATE pg_catalog.pg_settings SET setting = '{B}' WHERE name = 'app.tenant_id'"),
    atk("pgs-update-quoted", f"UPDATE \"pg_settings\" SET setting = '{B}' WHERE name = 'app.tenant_id'"),
    atk("pgs-update-upper", f"UPDATE PG_CATALOG.PG_SETTINGS SET SETTING = '{B}' WHERE NAME = 'app.tenant_id'"),
    atk("pgs-update-unicode", f"UPDATE U&\"pg\\005fsettings\" SET setting = '{B}' WHERE name = 'app.tenant_id'"),
    atk("pgs-update-cte", f"WITH u AS (UPDATE pg_settings SET setting = '{B}' WHERE name = 'app.tenant_id' "
                          "RETURNING setting) SELECT * FROM events, u"),
    atk("pgs-update-row-security", "UPDATE pg_settings SET setting = 'off' WHERE name = 'row_security'"),
    atk("pgs-insert", f"INSERT INTO pg_settings (name, setting) VALUES ('app.tenant_id', '{B}')"),
    atk("pgs-delete", "DELETE FROM pg_settings WHERE name = 'app.tenant_id'"),
    atk("pgs-merge", f"MERGE INTO pg_settings s USING (SELECT 1) x ON s.name = 'app.tenant_id' "
                     f"WHEN MATCHED THEN UPDATE SET setting = '{B}'"),
    atk("pgs-update-via-ts-stat", f"SELECT ('with u as (update pg_settings set setting = ''{B}'' where name = "
                                  "''app.tenant_id'' returning setting) select to_tsvector(setting) from u'::text)"
                                  ".ts_stat", BLOCKED | NO_SUCH),
]

SESSION_SET = [
    atk("set", f"SET app.tenant_id = '{B}'"),
    atk("set-session", f"SET SESSION app.tenant_id = '{B}'"),
    atk("set-local", f"SET LOCAL app.tenant_id TO '{B}'"),
    atk("set-comment-case", f"sEt /* x */ app.tenant_id = '{B}'"),
    atk("set-after-line-comment", f"-- a comment\nSET app.tenant_id = '{B}'"),
    atk("set-quoted-name", f"SET \"app\".\"tenant_id\" = '{B}'"),
    atk("reset", "RESET app.tenant_id"),
    atk("reset-all", "RESET ALL"),
    atk("set-role", "SET ROLE app_owner"),
    atk("set-role-postgres", "SET ROLE postgres"),
    atk("set-session-authorization", "SET SESSION AUTHORIZATION app_owner"),
    atk("set-session-authorization-default", "SET SESSION AUTHORIZATION DEFAULT"),
    atk("set-search-path", "SET search_path = pg_temp, public"),
    atk("set-search-path-session", "SET SESSION search_path TO pg_catalog"),
    atk("set-row-security", "SET row_security = off"),
    atk("set-statement-timeout", "SET statement_timeout = 0"),
    atk("set-session-characteristics", "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
    atk("discard-all", "DISCARD ALL"),
    atk("set-from-b", f"SET app.tenant_id = '{A}'", attacker=B),
]

TEMP_OBJECTS = [
    atk("temp-table-events", "CREATE TEMP TABLE events (tenant_id uuid, event_type text, data jsonb)"),
    atk("temp-table-as", f"CREATE TEMPORARY TABLE events AS SELECT '{B}'::uuid AS tenant_id, 'x' AS event_type"),
    atk("temp-view", f"CREATE TEMPORARY VIEW events AS SELECT '{B}'::uuid AS tenant_id, 'x' AS event_type"),
    atk("select-into-temp", "SELECT * INTO TEMP events FROM events"),
    atk("select-into-temporary-table", "SELECT * INTO TEMPORARY TABLE shadow FROM events"),
    atk("temp-sequence", "CREATE TEMP SEQUENCE s"),
    atk("pg-temp-select", "SELECT * FROM pg_temp.events"),
    atk("pg-temp-quoted", "SELECT * FROM \"pg_temp\".events"),
    atk("pg-temp-numbered", "SELECT * FROM pg_temp_3.events"),
    atk("pg-temp-unicode", "SELECT * FROM U&\"pg\\005ftemp\".events"),
    atk("pg-temp-insert", "INSERT INTO pg_temp.events (event_type) VALUES ('x')"),
    atk("pg-temp-function", "SELECT pg_temp.f()"),
    atk("pg-temp-type", "SELECT NULL::pg_temp.t"),
    atk("pg-temp-column-ref", "SELECT pg_temp.events.event_type FROM events"),
    atk("pg-temp-in-cte", "WITH x AS (SELECT * FROM pg_temp.events) SELECT * FROM x"),
]

PROCEDURAL = [
    atk("temp-plpgsql-set-local", "CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plpgsql AS "
                                  f"$$ BEGIN SET LOCAL app.tenant_id = '{B}'; END $$"),
    atk("public-sql-function", "CREATE OR REPLACE FUNCTION public.pwn() RETURNS text LANGUAGE sql AS "
                               f"$$ SELECT {SC} $$"),
    atk("procedure-commit", "CREATE PROCEDURE public.p() LANGUAGE plpgsql AS $$ BEGIN COMMIT; END $$"),
    atk("do-perform", f"DO $$ BEGIN PERFORM {SC}; END $$"),
    atk("do-execute-set", f"DO LANGUAGE plpgsql $body$ BEGIN EXECUTE 'SET app.tenant_id = ''{B}'''; END $body$"),
    atk("do-lowercase", "do $$ begin perform pg_advisory_lock(1); end $$"),
]

ADVISORY = [
    atk("adv-lock", "SELECT pg_advisory_lock(1)"),
    atk("adv-try-lock", "SELECT pg_try_advisory_lock(1)"),
    atk("adv-lock-shared", "SELECT pg_advisory_lock_shared(1)"),
    atk("adv-try-lock-shared", "SELECT pg_try_advisory_lock_shared(1)"),
    atk("adv-lock-two-keys", "SELECT pg_advisory_lock(1, 2)"),
    atk("adv-lock-quoted", "SELECT \"pg_advisory_lock\"(3)"),
    atk("adv-lock-upper-schema", "SELECT PG_CATALOG.PG_ADVISORY_LOCK(4)"),
    atk("adv-lock-unicode", "SELECT U&\"pg\\005fadvisory\\005flock\"(7)"),
    atk("adv-try-lock-in-from", "SELECT * FROM pg_try_advisory_lock(5)"),
    atk("adv-lock-in-cte", "WITH l AS (SELECT pg_advisory_lock(6)) SELECT * FROM l, events"),
    atk("adv-lock-in-where", "SELECT * FROM events WHERE pg_try_advisory_lock(8)"),
    atk("adv-unlock-all", "SELECT pg_advisory_unlock_all()"),
]

TRANSACTION_CONTROL = [
    atk("commit", "COMMIT"),
    atk("commit-and-chain", "COMMIT AND CHAIN"),
    atk("rollback", "ROLLBACK"),
    atk("abort", "ABORT"),
    atk("end", "END"),
    atk("begin", "BEGIN"),
    atk("start-transaction", "START TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
    atk("savepoint", "SAVEPOINT s"),
    atk("release-savepoint", "RELEASE SAVEPOINT s"),
    atk("rollback-to-savepoint", "ROLLBACK TO SAVEPOINT s"),
    atk("prepare-transaction", "PREPARE TRANSACTION 'evil'"),
    atk("commit-prepared", "COMMIT PREPARED 'evil'"),
]

VIEWS_AND_DDL = [
    atk("create-view", "CREATE VIEW v AS SELECT * FROM events"),
    atk("create-view-security-barrier",
        "CREATE VIEW public.all_events WITH (security_barrier) AS SELECT * FROM events"),
    atk("create-or-replace-view", "CREATE OR REPLACE VIEW public.events_v AS SELECT * FROM events"),
    atk("create-recursive-view", "CREATE RECURSIVE VIEW public.r (n) AS SELECT 1 UNION ALL SELECT n + 1 FROM r"),
    atk("create-materialized-view", "CREATE MATERIALIZED VIEW public.mv AS SELECT * FROM events"),
    atk("disable-rls", "ALTER TABLE events DISABLE ROW LEVEL SECURITY"),
    atk("no-force-rls", "ALTER TABLE events NO FORCE ROW LEVEL SECURITY"),
    atk("drop-policy", "DROP POLICY tenant_isolation ON events"),
    atk("create-policy", "CREATE POLICY open_door ON events USING (true)"),
    atk("alter-policy", "ALTER POLICY tenant_isolation ON events USING (true)"),
    atk("create-function", "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'select 1'"),
    atk("grant", "GRANT ALL ON events TO PUBLIC"),
    atk("alter-role-bypassrls", "ALTER ROLE app BYPASSRLS"),
    atk("truncate", "TRUNCATE events"),
    atk("drop-table", "DROP TABLE events"),
    atk("create-table-as", "CREATE TABLE public.loot AS SELECT * FROM events"),
    atk("alter-system", "ALTER SYSTEM SET row_security = off"),
    atk("create-extension-dblink", "CREATE EXTENSION dblink"),
    atk("comment-on", "COMMENT ON TABLE events IS 'x'"),
    atk("vacuum", "VACUUM events"),
    atk("analyze", "ANALYZE events"),
    atk("checkpoint", "CHECKPOINT"),
    atk("load", "LOAD 'plpgsql'"),
]

UTILITY = [
    atk("copy-to-stdout", "COPY events TO STDOUT"),
    atk("copy-from-stdin", "COPY events FROM STDIN"),
    atk("copy-query-to-file", "COPY (SELECT * FROM events) TO '/tmp/loot'"),
    atk("copy-to-program", "COPY events TO PROGRAM 'cat'"),
    atk("listen", "LISTEN tenant_b"),
    atk("notify", "NOTIFY tenant_b, 'x'"),
    atk("unlisten", "UNLISTEN *"),
    atk("pg-notify", "SELECT pg_notify('tenant_b', 'x')"),
    atk("pg-notify-in-cte", "WITH n AS (SELECT pg_notify('tenant_b', 'x')) SELECT * FROM n"),
    atk("prepare", "PREPARE p AS SELECT * FROM events"),
    atk("execute", "EXECUTE p"),
    atk("deallocate", "DEALLOCATE ALL"),
    atk("declare-with-hold", "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM events"),
    atk("fetch", "FETCH ALL FROM c"),
    atk("move", "MOVE NEXT IN c"),
    atk("close", "CLOSE ALL"),
    atk("lock-table", "LOCK TABLE events IN ACCESS EXCLUSIVE MODE"),
    atk("select-into", "SELECT * INTO loot FROM events"),
    atk("select-into-table", "SELECT * INTO TABLE public.loot FROM events"),
    atk("select-into-in-cte", "WITH x AS (SELECT 1) SELECT * INTO loot FROM x"),
    atk("explain-analyze-set-config", f"EXPLAIN ANALYZE SELECT {SC}"),
    atk("explain-analyze-parens", "EXPLAIN (ANALYZE) SELECT pg_advisory_lock(1)"),
    atk("explain-analyze-true-json", "EXPLAIN (ANALYZE true, FORMAT JSON) DELETE FROM events"),
    atk("explain-analyze-1", "EXPLAIN (ANALYZE 1) DELETE FROM events"),
    atk("explain-analyse-on", "EXPLAIN (ANALYSE on) DELETE FROM events"),
    atk("explain-analyze-string", "EXPLAIN (ANALYZE 'yes') DELETE FROM events"),
    atk("explain-analyze-last-wins", "EXPLAIN (ANALYZE false, ANALYZE true) DELETE FROM events"),
    atk("explain-analyze-insert-b", "EXPLAIN ANALYZE INSERT INTO events (tenant_id, event_type, data) "
                                    f"VALUES ('{B}', 'explain', '{{}}')"),
    atk("explain-execute", "EXPLAIN EXECUTE p"),
    atk("explain-create-table-as", "EXPLAIN CREATE TABLE public.loot AS SELECT * FROM events"),
    atk("call", "CALL p()"),
    atk("call-set-config", f"CALL set_config('app.tenant_id', '{B}', false)"),
]

SERVER_ACCESS = [
    atk("pg-read-file", "SELECT pg_read_file('/etc/passwd')"),
    atk("pg-read-file-quoted", "SELECT \"pg_catalog\".\"pg_read_file\"('postgresql.conf', 0, 100)"),
    atk("pg-read-binary-file", "SELECT pg_read_binary_file('/etc/passwd')"),
    atk("pg-ls-dir", "SELECT * FROM pg_ls_dir('.')"),
    atk("pg-ls-waldir", "SELECT * FROM pg_ls_waldir()"),
    atk("pg-stat-file", "SELECT pg_stat_file('postgresql.conf')"),
    atk("lo-import", "SELECT lo_import('/etc/passwd')"),
    atk("lo-export", "SELECT lo_export(1, '/tmp/loot')"),
    atk("lo-create", "SELECT lo_create(0)"),
    atk("lo-from-bytea", "SELECT lo_from_bytea(0, 'exfil')"),
    atk("lo-get", "SELECT lo_get(oid) FROM pg_largeobject_metadata"),
    atk("terminate-backend", "SELECT pg_terminate_backend(pg_backend_pid())"),
    atk("terminate-all-app-backends", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'"),
    atk("cancel-backend", "SELECT pg_cancel_backend(pg_backend_pid())"),
    atk("reload-conf", "SELECT pg_reload_conf()"),
    atk("dblink", "SELECT * FROM dblink('dbname=postgres', 'select 1') AS t(x int)"),
    atk("dblink-exec", f"SELECT dblink_exec('dbname=postgres', 'SET app.tenant_id = ''{B}''')"),
    atk("dblink-connect", "SELECT dblink_connect('c', 'dbname=postgres')"),
]

MULTI_STATEMENT = [
    atk("select-then-set", f"SELECT 1; SET app.tenant_id = '{B}'"),
    atk("select-then-set-config", f"SELECT 1; SELECT {SC}"),
    atk("set-then-select", f"SET app.tenant_id = '{B}'; SELECT * FROM events"),
    atk("commit-in-the-middle", "SELECT 1; COMMIT; SELECT * FROM events"),
    atk("semicolon-in-comment", "SELECT 1 /* ; */; RESET ALL"),
    atk("semicolon-in-literal", "SELECT ';'; SET ROLE app_owner"),
    atk("newline-separated", "SELECT 1\n;\nLISTEN tenant_b"),
    atk("nul-byte", f"SELECT 1\x00; SET app.tenant_id = '{B}'"),
]

FOREIGN_WRITES = [
    atk("insert-b", f"INSERT INTO events (tenant_id, event_type, data) VALUES ('{B}', 'forged-1', '{{}}')", RLS),
    atk("insert-b-param", "INSERT INTO events (tenant_id, event_type, data) VALUES ($1, 'forged-2', '{}')", RLS, B),
    atk("insert-select-b", f"INSERT INTO events (tenant_id, event_type, data) SELECT '{B}'::uuid, 'forged-3', "
                           "'{}'::jsonb", RLS),
    atk("insert-b-in-cte", f"WITH w AS (INSERT INTO events (tenant_id, event_type, data) VALUES ('{B}', "
                           "'forged-4', '{}') RETURNING *) SELECT * FROM w", RLS),
    atk("insert-own-and-b", f"INSERT INTO events (tenant_id, event_type, data) VALUES ('{A}', 'forged-5', '{{}}'), "
                            f"('{B}', 'forged-5', '{{}}')", RLS),
    atk("insert-typed-b", f"INSERT INTO typed (tenant_id, t) VALUES ('{B}', 'forged-6')", RLS),
    atk("update-row-to-b", f"UPDATE events SET tenant_id = '{B}' WHERE event_type = 'a-1'", RLS),
    atk("update-all-to-b", f"UPDATE events SET tenant_id = '{B}' RETURNING *", RLS),
    atk("update-to-b-in-cte", f"WITH u AS (UPDATE events SET tenant_id = '{B}' RETURNING id) "
                              "SELECT count(*) FROM u", RLS),
    atk("on-conflict-move-own-row-to-b", "INSERT INTO events (id, event_type, data, created_at) "
                                         "VALUES ('<A1_ID>', 'x', '{}', '<A1_AT>') "
                                         f"ON CONFLICT (tenant_id, id, created_at) DO UPDATE SET tenant_id = '{B}'",
        RLS),
    atk("on-conflict-excluded-b", "INSERT INTO events (id, tenant_id, event_type, data, created_at) "
                                  f"VALUES ('<A1_ID>', '{B}', 'x', '{{}}', '<A1_AT>') "
                                  "ON CONFLICT (tenant_id, id, created_at) "
                                  "DO UPDATE SET tenant_id = excluded.tenant_id", RLS),
    atk("on-conflict-update-b-row", "INSERT INTO events (id, tenant_id, event_type, data, created_at) "
                                    f"VALUES ('<B1_ID>', '{A}', 'x', '{{}}', '<B1_AT>') "
                                    "ON CONFLICT (id, created_at) DO UPDATE SET event_type = 'pwned'",
        # every unique key of events starts with tenant_id: there is none to aim at B's row
        frozenset({(400, "sql_invalid")})),
    atk("merge-move-own-row-to-b", "MERGE INTO events e USING (SELECT 'a-1' AS t) s ON e.event_type = s.t "
                                   f"WHEN MATCHED THEN UPDATE SET tenant_id = '{B}'", GUARD),
    atk("merge-insert-b", "MERGE INTO events e USING (SELECT 'nope' AS t) s ON e.event_type = s.t "
                          "WHEN NOT MATCHED THEN INSERT (tenant_id, event_type, data) "
                          f"VALUES ('{B}', 'forged-7', '{{}}')", GUARD),  # MERGE is refused
    atk("insert-a-from-b", f"INSERT INTO events (tenant_id, event_type, data) VALUES ('{A}', 'forged-8', '{{}}')",
        RLS, attacker=B),
    atk("update-b-row-to-a", f"UPDATE events SET tenant_id = '{A}' WHERE event_type = 'b-1'", RLS, attacker=B),
]

ATTACKS = (SET_CONFIG + HIDDEN_SQL + ATTRIBUTE_NOTATION + PG_SETTINGS + SESSION_SET + TEMP_OBJECTS + PROCEDURAL
           + ADVISORY + TRANSACTION_CONTROL + VIEWS_AND_DDL + UTILITY + SERVER_ACCESS + MULTI_STATEMENT
           + FOREIGN_WRITES)


@pytest.mark.parametrize(("sql", "params", "expected", "attacker"), ATTACKS)
async def test_query_attack(api: Api, admin_db: asyncpg.Connection, sql: str, params: list[Any],
                            expected: frozenset[tuple[int, str]], attacker: str) -> None:
    sql = fill(sql, await row_ids(admin_db))
    before = await snapshot(admin_db)
    pid = await backend_pid(api, KEYS[attacker])

    r = await api.query(sql, *params, key=KEYS[attacker])

    await assert_attack_failed(api, r, expected, pid, victim=OTHER[attacker])
    after = await snapshot(admin_db)
    assert after.count(OTHER[attacker]) == before.count(OTHER[attacker])
    assert after == before, "the attack wrote or changed rows"


# ---------------------------------------------------------------- attacks on /v1/transaction

def tx(id_: str, statements: Sequence[str | tuple[str, list[Any]]],
       expected: frozenset[tuple[int, str]] = GUARD) -> Any:
    items = [{"sql": s} if isinstance(s, str) else {"sql": s[0], "params": s[1]} for s in statements]
    return pytest.param(items, expected, id=id_)


OWN_ROW = "INSERT INTO events (event_type, data) VALUES ('tx-own-marker', '{}')"

TX_ATTACKS = [
    tx("select-then-set", ["SELECT 1", f"SET app.tenant_id = '{B}'", "SELECT * FROM events"]),
    tx("own-write-then-commit", [OWN_ROW, "COMMIT", "SELECT * FROM events"]),
    tx("own-write-then-set-config", [OWN_ROW, f"SELECT {SC}", "SELECT * FROM events"]),
    tx("savepoint-dance", ["SAVEPOINT s", "ROLLBACK TO SAVEPOINT s"]),
    tx("temp-then-insert", ["CREATE TEMP TABLE events (event_type text)", "INSERT INTO events VALUES ('x')"]),
    tx("pg-settings-then-read", [f"UPDATE pg_settings SET setting = '{B}' WHERE name = 'app.tenant_id'",
                                 "SELECT * FROM events"]),
    tx("listen-then-select", ["LISTEN tenant_b", "SELECT 1"]),
    tx("advisory-attribute-notation", ["SELECT 1", "SELECT (12::bigint).pg_advisory_lock"], BLOCKED),
    tx("own-write-then-insert-b", [OWN_ROW, ("INSERT INTO events (tenant_id, event_type, data) VALUES "
                                             "($1, 'tx-forged', '{}')", [B])], RLS),
    tx("own-write-then-move-to-b", [OWN_ROW, (f"UPDATE events SET tenant_id = '{B}' "
                                              "WHERE event_type = 'tx-own-marker'", [])], RLS),
    tx("own-write-then-upsert-to-b", [
        "INSERT INTO events (id, event_type, data, created_at) "
        "VALUES ('00000000-0000-4000-8000-0000000000f1', 'tx-up', '{}', '2026-11-01T00:00:00Z')",
        "INSERT INTO events (id, event_type, data, created_at) "
        "VALUES ('00000000-0000-4000-8000-0000000000f1', 'tx-up', '{}', '2026-11-01T00:00:00Z') "
        f"ON CONFLICT (tenant_id, id, created_at) DO UPDATE SET tenant_id = '{B}'"], RLS),
]


@pytest.mark.parametrize(("statements", "expected"), TX_ATTACKS)
async def test_transaction_attack(api: Api, admin_db: asyncpg.Connection, statements: list[dict[str, Any]],
                                  expected: frozenset[tuple[int, str]]) -> None:
    before = await snapshot(admin_db)
    pid = await backend_pid(api, KEY_A)

    r = await api.transaction(statements, key=KEY_A)

    await assert_attack_failed(api, r, expected, pid)
    after = await snapshot(admin_db)
    assert after.count(B) == before.count(B)
    assert after == before, "all or nothing: an earlier statement of the refused transaction was kept"


# ---------------------------------------------------------------- the tenant header and body

async def raw_query(api: Api, key: str, tenant_headers: Sequence[tuple[str, str]], body: Mapping[str, Any]) -> Reply:
    """POST /v1/query with any headers, repeated ones included."""
    headers = CIMultiDict([("Authorization", f"Bearer {key}"), *tenant_headers])
    async with api.session.post(api.base + "/v1/query", json=body, headers=headers) as resp:
        payload = await resp.json(content_type=None)
        return Reply(resp.status, payload, resp.headers)


def hdr(id_: str, key: str, values: Sequence[str], expected: frozenset[tuple[int, str]],
        name: str = "X-Tenant-Id") -> Any:
    return pytest.param(key, [(name, v) for v in values], expected, id=id_)


_HEX_B = B.replace("-", "")
HEADER_ATTACKS = [
    hdr("bound-key-names-b", KEY_A, [B], FORBIDDEN),
    hdr("bound-key-b-upper-case", KEY_A, [B.upper()], FORBIDDEN),
    hdr("bound-key-b-braces", KEY_A, ["{" + B + "}"], FORBIDDEN),
    hdr("bound-key-b-urn", KEY_A, ["urn:uuid:" + B], FORBIDDEN),
    hdr("bound-key-b-no-hyphens", KEY_A, [B.replace("-", "")], FORBIDDEN),
    hdr("bound-key-b-moved-hyphens", KEY_A, [f"{_HEX_B[:4]}-{_HEX_B[4:12]}-{_HEX_B[12:20]}-{_HEX_B[20:]}"], FORBIDDEN),
    hdr("bound-key-b-lower-case-header-name", KEY_A, [B], FORBIDDEN, name="x-tenant-id"),
    hdr("bound-key-duplicate-b-first", KEY_A, [B, A], BAD_REQUEST),  # a repeated tenant header is refused
    hdr("bound-key-duplicate-b-twice", KEY_A, [B, B], BAD_REQUEST),
    hdr("bound-key-list", KEY_A, [f"{A}, {B}"], BAD_REQUEST),
    hdr("bound-key-b-underscores", KEY_A, [B.replace("-", "_")], BAD_REQUEST),
    hdr("b-key-names-a", KEY_B, [A], FORBIDDEN),
    hdr("sqli-close-quote", KEY_ANY, [f"{A}'; SET app.tenant_id = '{B}"], BAD_REQUEST),
    hdr("sqli-or-true", KEY_ANY, ["' OR '1'='1"], BAD_REQUEST),
    hdr("sqli-comment", KEY_ANY, [f"{B}'--"], BAD_REQUEST),
    hdr("sqli-backslash", KEY_ANY, [f"{B}\\'"], BAD_REQUEST),
    hdr("wildcard", KEY_ANY, ["*"], BAD_REQUEST),
    hdr("empty", KEY_ANY, [""], BAD_REQUEST),
    hdr("too-long", KEY_ANY, [B + "0" * 64], BAD_REQUEST),
]


@pytest.mark.parametrize(("key", "headers", "expected"), HEADER_ATTACKS)
async def test_tenant_header_attack(api: Api, key: str, headers: list[tuple[str, str]],
                                    expected: frozenset[tuple[int, str]]) -> None:
    attacker = B if key == KEY_B else A
    pid = await backend_pid(api, KEYS[attacker])
    r = await raw_query(api, key, headers, {"sql": "SELECT current_setting('app.tenant_id') AS t, "
                                                   "array_agg(event_type) AS types FROM events"})
    await assert_attack_failed(api, r, expected, pid, victim=OTHER[attacker])


async def test_bound_key_with_own_id_first_acts_only_for_its_tenant(api: Api) -> None:
    """A repeated tenant header is refused outright, whatever order the ids come in."""
    r = await raw_query(api, KEY_A, [("X-Tenant-Id", A), ("X-Tenant-Id", B)],
                        {"sql": "SELECT current_setting('app.tenant_id') AS t, "
                                "(SELECT array_agg(DISTINCT tenant_id::text) FROM events) AS tenants"})
    assert (r.status, r.code) in BAD_REQUEST, r.body


BODY_ATTACKS = [
    pytest.param({"sql": "SELECT * FROM events", "tenant": B}, id="tenant-field"),
    pytest.param({"sql": "SELECT * FROM events", "tenant_id": B}, id="tenant-id-field"),
    pytest.param({"sql": "SELECT * FROM events", "isolation": f"serializable; SET app.tenant_id = '{B}'"},
                 id="isolation-injection"),
    pytest.param({"sql": "SELECT * FROM events", "timeout_ms": "0; RESET ALL"}, id="timeout-injection"),
    pytest.param({"sql": "SELECT * FROM events", "timeout_ms": 0}, id="timeout-zero"),
    pytest.param({"sql": "SELECT * FROM events", "read_only": "false; SET ROLE app_owner"}, id="read-only-injection"),
    pytest.param({"sql": ["SELECT 1", f"SET app.tenant_id = '{B}'"]}, id="sql-as-list"),
    pytest.param({"statements": [{"sql": "SELECT 1"}], "sql": "SELECT 1"}, id="transaction-field-on-query"),
]


@pytest.mark.parametrize("body", BODY_ATTACKS)
async def test_request_body_attack(api: Api, body: dict[str, Any]) -> None:
    pid = await backend_pid(api, KEY_A)
    r = await raw_query(api, KEY_A, [], body)
    await assert_attack_failed(api, r, BAD_REQUEST, pid)


# ---------------------------------------------------------------- session state that allowed calls leave behind

async def test_setseed_does_not_reach_the_next_tenant(api: Api, admin_db: asyncpg.Connection) -> None:
    """A seed set by A must not make B's random() predictable on the shared backend."""
    await admin_db.execute("SELECT setseed(0.25)")
    predicted = await admin_db.fetchval("SELECT random()")
    pid = await backend_pid(api, KEY_A)
    attack = await api.query("SELECT setseed(0.25)", key=KEY_A)
    assert attack.status < 500, attack.body
    r = await api.query("SELECT random() AS r, pg_backend_pid() AS pid", key=KEY_B)
    assert r.status == 200 and r.body["rows"][0]["pid"] == pid
    assert r.body["rows"][0]["r"] != predicted, "tenant B's random() follows the seed tenant A chose"
    await assert_victim_isolated(api, pid)


async def test_sequence_session_values_do_not_reach_the_next_tenant(api: Api, admin_db: asyncpg.Connection) -> None:
    """lastval()/currval() are per session: B must not learn the id A's insert just drew."""
    pid = await backend_pid(api, KEY_A)
    ins = await api.query("INSERT INTO typed (t) VALUES ('seq-probe') RETURNING id", key=KEY_A)
    assert ins.status == 200, ins.body
    drawn = ins.body["rows"][0]["id"]
    try:
        for sql in ("SELECT lastval() AS v, pg_backend_pid() AS pid",
                    "SELECT currval('typed_id_seq') AS v, pg_backend_pid() AS pid"):
            r = await api.query(sql, key=KEY_B)
            assert r.status < 500, r.body
            if r.status == 200:
                assert r.body["rows"][0]["pid"] == pid
                assert r.body["rows"][0]["v"] != drawn, f"{sql!r} gave tenant B the id tenant A just drew"
        await assert_victim_isolated(api, pid)
    finally:
        await admin_db.execute("DELETE FROM typed WHERE t = 'seq-probe'")


async def test_large_object_written_by_one_tenant_is_not_readable_by_another(
        api: Api, admin_db: asyncpg.Connection) -> None:
    """Large objects sit outside RLS: one tenant's must not be another's to read."""
    pid = await backend_pid(api, KEY_A)
    w = await api.query("SELECT ('select to_tsvector(x::text) from (select lo_from_bytea(0, ''tenant-a-secret'')) "
                        "s(x)'::text).ts_stat", key=KEY_A)
    assert w.status < 500, w.body
    r = await api.query("SELECT encode((oid).lo_get, 'escape') AS content FROM pg_largeobject_metadata", key=KEY_B)
    assert r.status < 500, r.body
    assert "tenant-a-secret" not in str(r.body), f"tenant B read tenant A's large object: {r.body}"
    await assert_victim_isolated(api, pid)


# ---------------------------------------------------------------- the walls behind the guard

DB_WALL = [
    pytest.param(f"SELECT {SC}, {READ_B}", id="set-config-local"),
    pytest.param(f"SELECT set_config('app.tenant_id', '{B}', false)", id="set-config-session"),
    pytest.param(f"SELECT {SC}, {READ_B} AS x, set_config('app.tenant_id', '{A}', true)", id="set-and-restore"),
    pytest.param(f"SELECT query_to_xml('select {SC.replace(chr(39), chr(39) * 2)}', true, false, '')",
                 id="query-to-xml"),
    pytest.param(f"SELECT * FROM ts_stat('select to_tsvector({SC.replace(chr(39), chr(39) * 2)})')", id="ts-stat"),
]


@pytest.mark.parametrize("sql", DB_WALL)
async def test_database_refuses_set_config_when_the_guard_lets_it_through(
        api: Api, admin_db: asyncpg.Connection, gateway_with: Any, sql: str) -> None:
    """An operator allow-listing set_config (or a guard bug) still meets the REVOKE."""
    allow = {"allow_functions": ["set_config", "query_to_xml", "ts_stat"]}
    async with gateway_with(guard=allow) as relaxed:
        pid = await backend_pid(relaxed, KEY_A)
        r = await relaxed.query(sql, key=KEY_A)
    assert_refused(r, RLS)
    # refused at set_config itself, or already at the wrapper that would run the hidden SQL
    assert re.search(r"permission denied for function (set_config|query_to_xml|ts_stat)",
                     r.body["error"]["message"])
    await assert_victim_isolated(api, pid)


async def test_pool_wall_catches_a_tenant_change_left_at_commit(
        api: Api, admin_db: asyncpg.Connection, gateway_with: Any) -> None:
    """With both the guard and the REVOKE out of the way, a changed tenant setting is still
    caught before COMMIT and never reaches the next tenant."""
    await admin_db.execute("GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO app")
    try:
        async with gateway_with(guard={"allow_functions": ["set_config"]}) as relaxed:
            pid = await backend_pid(relaxed, KEY_A)
            r = await relaxed.query(f"SELECT set_config('app.tenant_id', '{B}', false), {READ_B}", key=KEY_A)
    finally:
        await admin_db.execute("REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM app")
    assert_refused(r, GUARD)
    assert "tenant setting" in r.body["error"]["message"]
    await assert_victim_isolated(api, pid)


# ---------------------------------------------------------------- controls: allowed, and still confined

ALLOWED = [
    pytest.param("SELECT 'set_config(''app.tenant_id'', ''x'', true)' AS v", id="set-config-in-a-literal"),
    pytest.param(f"SELECT 1 AS v /* ; SET app.tenant_id = '{B}' */", id="set-in-a-comment"),
    pytest.param("SELECT 1 AS set_config", id="column-named-set-config"),
    pytest.param("SELECT current_setting('app.tenant_id') AS v", id="read-own-tenant"),
    pytest.param("SELECT count(*) AS v FROM events WHERE event_type LIKE 'a-%'", id="read-own-rows"),
]


@pytest.mark.parametrize("sql", ALLOWED)
async def test_allowed_statement_runs_and_leaves_nothing(api: Api, sql: str) -> None:
    pid = await backend_pid(api, KEY_A)
    r = await api.query(sql, key=KEY_A)
    assert r.status == 200, r.body
    assert B not in str(r.body)
    await assert_victim_isolated(api, pid)


CONFINED = [
    pytest.param(f"SELECT * FROM events WHERE tenant_id = '{B}'", id="where-tenant-b"),
    pytest.param(f"UPDATE events SET event_type = 'pwned' WHERE tenant_id = '{B}' RETURNING *", id="update-b-rows"),
    pytest.param(f"DELETE FROM events WHERE tenant_id = '{B}' RETURNING *", id="delete-b-rows"),
    pytest.param("MERGE INTO events e USING (SELECT '<B1_ID>'::uuid AS id) s ON e.id = s.id "
                 "WHEN MATCHED THEN DELETE", id="merge-delete-b-row"),
    pytest.param("SELECT e.row_to_json FROM events e", id="whole-row-function"),
    pytest.param("SELECT e FROM events e", id="whole-row-composite"),
    pytest.param("SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'events'", id="pg-stats"),
    pytest.param(f"SELECT event_type FROM events WHERE 1 / (CASE WHEN tenant_id = '{B}' THEN 0 ELSE 1 END) = 1",
                 id="division-by-zero-oracle"),
    pytest.param("SELECT * FROM events FOR UPDATE", id="for-update"),
    pytest.param("SELECT t.* FROM typed t", id="typed-table"),
    pytest.param("SELECT xmlparse(document '<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]><x>&e;</x>')",
                 id="xml-external-entity"),
]


@pytest.mark.parametrize("sql", CONFINED)
async def test_probe_stays_inside_the_tenant(api: Api, admin_db: asyncpg.Connection, sql: str) -> None:
    """Statements the guard allows: they run, but see and touch only the caller's own rows."""
    sql = fill(sql, await row_ids(admin_db))
    before = await snapshot(admin_db)
    pid = await backend_pid(api, KEY_A)
    r = await api.query(sql, key=KEY_A)
    problems: list[str] = []
    if r.status >= 500:
        problems.append(f"server error {r.status}: {r.body}")
    text = str(r.body.get("rows")) if r.status == 200 else str(r.body)
    if B in text or B.upper() in text or SEEDED_B.search(text) or "root:" in text:
        problems.append(f"foreign data in the answer: {r.body}")
    try:
        await assert_victim_isolated(api, pid)
    except AssertionError as exc:
        problems.append(f"victim: {exc}")
    if await snapshot(admin_db) != before:
        problems.append("rows were written or changed")
    if problems:
        pytest.fail("\n".join(problems))
