"""The SQL guard: an allow-list over PostgreSQL's own parse tree."""

from __future__ import annotations

import pytest

from proxy.config import GuardConfig
from proxy.errors import ApiError
from proxy.policy.guard import Guard

ALLOWED = {
    "SELECT 1": "SELECT",
    "select * from events where tenant_id = $1": "SELECT",
    "WITH x AS (SELECT 1) SELECT * FROM x": "SELECT",
    "VALUES (1), (2)": "SELECT",
    "TABLE events": "SELECT",
    "INSERT INTO events (event_type, data) VALUES ($1, $2) RETURNING id": "INSERT",
    "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a": "INSERT",
    "UPDATE events SET data = '{}' WHERE id = $1": "UPDATE",
    "DELETE FROM events WHERE id = $1 RETURNING *": "DELETE",
    "WITH d AS (DELETE FROM events RETURNING id) SELECT count(*) FROM d": "SELECT",
    "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = CASE WHEN t.a > 0 THEN 1 ELSE t.a END":
        "INSERT",
    "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO NOTHING": "INSERT",
    "SELECT * FROM pg_stats": "SELECT",  # RLS tables are left out of it by PostgreSQL
    "SELECT current_setting('app.tenant_id')": "SELECT",
    "SELECT 'set_config(1)' AS literal_is_fine": "SELECT",
    "SELECT * FROM events FOR UPDATE": "SELECT",
    "SELECT pg_sleep(0.1)": "SELECT",
    "SELECT e.id, (e).event_type FROM events e": "SELECT",
    "SELECT (data).x FROM t": "SELECT",
}

REJECTED = {
    "SELECT 1; SELECT 2": "exactly one statement",
    "": "exactly one statement",
    "selec 1": "syntax error",
    "SET app.tenant_id = 'x'": "SET/RESET is not allowed",
    "SET LOCAL app.tenant_id = 'x'": "SET/RESET",
    "RESET ALL": "SET/RESET",
    "SET ROLE postgres": "SET/RESET",
    "SET SESSION AUTHORIZATION postgres": "SET/RESET",
    "COMMIT": "transaction control",
    "BEGIN": "transaction control",
    "SAVEPOINT a": "transaction control",
    "DO $$ BEGIN END $$": "DO is not allowed",
    "COPY events TO STDOUT": "COPY",
    "LISTEN x": "LISTEN",
    "NOTIFY x": "NOTIFY",
    "PREPARE p AS SELECT 1": "PREPARE",
    "EXECUTE p": "EXECUTE",
    "DECLARE c CURSOR FOR SELECT 1": "DECLARE CURSOR",
    "LOCK events": "LOCK",
    "CREATE TABLE x (a int)": "CreateStmt",
    "CREATE TEMP TABLE events (a int)": "CreateStmt",
    "DROP TABLE events": "DropStmt",
    "ALTER TABLE events DISABLE ROW LEVEL SECURITY": "AlterTableStmt",
    "CREATE TABLE x AS SELECT 1": "CREATE TABLE AS",
    "SELECT * INTO x FROM events": "SELECT INTO",
    "EXPLAIN ANALYZE SELECT 1": "EXPLAIN is not allowed",
    "EXPLAIN (ANALYZE) DELETE FROM events": "EXPLAIN is not allowed",
    "EXPLAIN SELECT * FROM events WHERE id < $1": "EXPLAIN is not allowed",
    "EXPLAIN (COSTS off) SELECT * FROM events": "EXPLAIN is not allowed",
    "INSERT INTO events (id, created_at, event_type, data) VALUES ($1, $2, 'x', '{}') ON CONFLICT (id, created_at) "
    "DO UPDATE SET data = excluded.data WHERE row_to_json(events)::text::int = 0":
        "ON CONFLICT ... DO UPDATE ... WHERE",
    "WITH x AS (INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = 2 WHERE t.a = 1 RETURNING 1) "
    "SELECT * FROM x": "ON CONFLICT ... DO UPDATE ... WHERE",
    "SELECT pg_advisory_xact_lock(1)": "function pg_advisory_xact_lock",
    "SELECT pg_try_advisory_xact_lock_shared(1, 2)": "function pg_try_advisory_xact_lock_shared",
    "SELECT count(pg_advisory_xact_lock(g)) FROM generate_series(1, 30000) g": "function pg_advisory_xact_lock",
    "SELECT query FROM pg_stat_activity": "pg_stat_activity is not allowed",
    "SELECT * FROM pg_catalog.pg_locks": "pg_locks is not allowed",
    "SELECT n_live_tup FROM pg_stat_user_tables": "pg_stat_user_tables is not allowed",
    "SELECT * FROM pg_statio_user_tables": "pg_statio_user_tables is not allowed",
    "SELECT pg_stat_get_activity(NULL)": "function pg_stat_get_activity",
    "SELECT txid_current()": "function txid_current",
    "SELECT pg_current_wal_lsn()": "function pg_current_wal_lsn",
    "SELECT pg_current_xact_id()": "function pg_current_xact_id",
    "SELECT pg_relation_size('events')": "function pg_relation_size",
    "SELECT reltuples FROM pg_class": "pg_class is not allowed",
    "SELECT c.relpages FROM pg_catalog.pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace":
        "pg_class is not allowed",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a": "MERGE is not allowed",
    "MERGE INTO events t USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE": "MERGE is not allowed",
    "SELECT mxid_age('1'::xid)": "function mxid_age",
    "SELECT * FROM pg_control_checkpoint()": "function pg_control_checkpoint",
    "SELECT pg_xact_commit_timestamp('3'::xid)": "function pg_xact_commit_timestamp",
    # called as a field, the denied prefixes hold too (dblink_*, pg_stat_get_*, pg_advisory*)
    "SELECT ('x'::text).dblink_exec": "function dblink_exec is not allowed (called as a field)",
    "SELECT (NULL::int).pg_stat_get_activity": "function pg_stat_get_activity is not allowed (called as a field)",
    "SELECT (1::bigint).pg_advisory_xact_lock": "function pg_advisory_xact_lock is not allowed (called as a field)",
    "CALL p()": "CALL p is not allowed",
    "SELECT set_config('app.tenant_id', 'x', true)": "function set_config",
    "SELECT pg_catalog.set_config('a', 'b', false)": "function set_config",
    'SELECT "set_config"(\'a\', \'b\', false)': "function set_config",
    "SELECT U&\"set\\005fconfig\"('a', 'b', false)": "function set_config",
    "SELECT * FROM events WHERE (SELECT set_config('a','b',true)) IS NOT NULL": "function set_config",
    "WITH x AS (SELECT set_config('a','b',true)) SELECT * FROM x": "function set_config",
    "SELECT * FROM set_config('a','b',true)": "function set_config",
    "SELECT query_to_xml('select 1', true, true, '')": "function query_to_xml",
    "SELECT ts_stat('select 1')": "function ts_stat",
    "SELECT dblink_exec('x', 'y')": "function dblink_exec",
    "SELECT pg_advisory_lock(1)": "function pg_advisory_lock",
    "SELECT pg_read_file('/etc/passwd')": "function pg_read_file",
    "SELECT lo_import('/etc/passwd')": "function lo_import",
    "SELECT pg_terminate_backend(1)": "function pg_terminate_backend",
    "SELECT * FROM pg_temp.events": "pg_temp",
    "SELECT pg_temp.f()": "pg_temp",
    "SELECT 1::pg_temp.t": "pg_temp",
    "UPDATE pg_settings SET setting = 'x' WHERE name = 'app.tenant_id'": "writes to catalog relation pg_settings",
    "UPDATE pg_catalog.pg_settings SET setting = 'x'": "writes to catalog relation",
    "WITH u AS (UPDATE pg_settings SET setting = 'x' RETURNING 1) SELECT * FROM u": "catalog relation",
    "DELETE FROM information_schema.tables": "catalog relation",
    "INSERT INTO events VALUES ((SELECT set_config('a','b',true)))": "function set_config",
    "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = set_config('a','b',true)::int":
        "function set_config",
    "DELETE FROM events RETURNING set_config('a','b',true)": "function set_config",
    "SELECT 1\x00": "NUL",
    "SELECT (1::bigint).pg_advisory_lock": "function pg_advisory_lock is not allowed (called as a field)",
    "SELECT n.pg_advisory_lock_shared FROM int8(3) AS n": "function pg_advisory_lock_shared",
    "SELECT (x.n).pg_try_advisory_lock FROM (SELECT 2::bigint AS n) x": "function pg_try_advisory_lock",
    "SELECT ('select 1'::text).ts_stat": "function ts_stat",
    "SELECT (0::oid).lo_create": "function lo_create",
    "SELECT (pg_backend_pid()).pg_terminate_backend": "function pg_terminate_backend",
    "SELECT setseed(0.5)": "function setseed",
    "SELECT lastval()": "function lastval",
    "SELECT loread(0, 1)": "function loread",
}


@pytest.fixture
def guard() -> Guard:
    return Guard(GuardConfig())


@pytest.mark.parametrize(("sql", "command"), ALLOWED.items())
def test_allowed(guard: Guard, sql: str, command: str) -> None:
    assert guard.check(sql).command == command


@pytest.mark.parametrize(("sql", "reason"), REJECTED.items())
def test_rejected(guard: Guard, sql: str, reason: str) -> None:
    with pytest.raises(ApiError) as info:
        guard.check(sql)
    assert info.value.kind.code == "statement_rejected"
    assert reason in info.value.message


def test_operator_lists() -> None:
    g = Guard(GuardConfig(deny_functions=frozenset({"pg_sleep"}), allow_call=frozenset({"refresh"}),
                          allow_functions=frozenset({"pg_advisory_lock"})))
    with pytest.raises(ApiError, match="function pg_sleep is not allowed"):
        g.check("SELECT pg_sleep(1)")
    assert g.check("CALL refresh()").command == "CALL"
    assert g.check("SELECT pg_advisory_lock(1)").command == "SELECT"


def test_cache_is_bounded_and_keeps_verdicts() -> None:
    g = Guard(GuardConfig(cache_size=3))
    for i in range(10):
        g.check(f"SELECT {i}")
    assert len(g._cache) == 3
    g.check("SELECT 7")  # used again: now the most recent
    g.check("SELECT 10")
    assert list(g._cache) == ["SELECT 9", "SELECT 7", "SELECT 10"]  # least recently used went first
    with pytest.raises(ApiError):
        g.check("COMMIT")
    with pytest.raises(ApiError):  # served from the cache, same verdict
        g.check("COMMIT")


def test_fingerprint_ignores_constants(guard: Guard) -> None:
    assert guard.check("SELECT * FROM events WHERE id = 1").fingerprint == \
        guard.check("SELECT * FROM events WHERE id = 2").fingerprint


@pytest.mark.parametrize(("sql", "params", "bound"), [
    ("SELECT * FROM events LIMIT 10", [], 10),
    ("SELECT * FROM events FETCH FIRST 3 ROWS ONLY", [], 3),
    ("(SELECT 1 UNION SELECT 2) LIMIT 1", [], 1),
    ("WITH e AS (SELECT * FROM events) SELECT * FROM e ORDER BY 1 LIMIT 0", [], 0),
    ("SELECT * FROM events WHERE event_type = $1 LIMIT $2", ["a", 25], 25),
    ("SELECT * FROM events LIMIT $1::int", [7], 7),
    # no bound the gateway can rely on
    ("SELECT * FROM events", [], None),
    ("SELECT * FROM events LIMIT ALL", [], None),
    ("SELECT * FROM events LIMIT 2 + 3", [], None),
    ("SELECT * FROM events LIMIT 99999999999", [], None),  # parsed as a float
    ("SELECT * FROM events ORDER BY 1 FETCH FIRST 3 ROWS WITH TIES", [], None),  # ties can add rows
    ("SELECT * FROM events LIMIT $1", ["10"], None),
    ("SELECT * FROM events LIMIT $1", [True], None),
    ("SELECT * FROM events LIMIT $1", [-1], None),
    ("SELECT * FROM events LIMIT $2", [1], None),  # a parameter that was not sent
    ("SELECT * FROM events LIMIT 5::numeric(1,-1)", [], None),  # rounds up to 10
    ("SELECT * FROM events LIMIT $1::numeric(1,-1)", [5], None),
    ("SELECT * FROM events LIMIT 5::bigint", [], 5),
    ("SELECT * FROM (SELECT * FROM events LIMIT 1) e", [], None),  # only the top level counts
    ("INSERT INTO events (event_type) SELECT 'x' LIMIT 1 RETURNING id", [], None),
])
def test_the_verdict_knows_the_most_rows_a_statement_returns(guard: Guard, sql: str, params: list[object],
                                                              bound: int | None) -> None:
    assert guard.check(sql).row_bound(params) == bound
