"""The database and pool walls hold even when the guard is told to let a call through."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from proxy.errors import ApiError
from proxy.http.app import start_gateway
from proxy.observe.trace import RequestTrace
from proxy.pg._asyncpg import pool_has_connected_idle as _connected_holder_free
from proxy.pg._asyncpg import prepare_unnamed as _prepare
from proxy.pg._asyncpg import release as _release
from proxy.pg._asyncpg import releases_at_once as _releases_at_once
from proxy.pg.connection import RoleCanBypassRls
from proxy.pg.pool import Pool as Database
from proxy.pg.statement import Statement, pipelined
from proxy.pg.transaction import TxRequest

from ..fix_gateway import KEY_A, KEY_B, TENANT_A, TENANT_B, base_config, make_settings, merge
from ..fix_stack import Stack, stack_of, temporary_stack


async def test_hardened_role_cannot_call_set_config_even_past_the_guard(gateway_with: Any) -> None:
    async with gateway_with(guard={"allow_functions": ["set_config"]}) as api:
        r = await api.query("SELECT set_config('app.tenant_id', $1, true), count(*) FROM events", TENANT_B)
        assert r.status == 403 and r.code == "rls_violation"
        assert "set_config" in r.body["error"]["message"]


async def test_pool_wall_closes_a_connection_whose_tenant_changed(gateway_with: Any,
                                                                 admin_db: asyncpg.Connection) -> None:
    # Take down the other two walls on purpose: the guard allows set_config, the role may run it.
    await admin_db.execute("GRANT EXECUTE ON FUNCTION set_config(text, text, boolean) TO app")
    try:
        async with gateway_with(guard={"allow_functions": ["set_config"]},
                                database={"pool_min_size": 1, "pool_max_size": 1}) as api:
            before = await api.query("SELECT pg_backend_pid() AS pid")
            for read_only in (False, True):  # True: the wall and COMMIT travel with the statement
                r = await api.query("SELECT set_config('app.tenant_id', $1, true) AS t", TENANT_B, read_only=read_only)
                assert r.status == 400 and r.code == "statement_rejected"
                assert "changed the tenant setting" in r.body["error"]["message"]
            # the write in the same transaction never committed
            r = await api.transaction([
                {"sql": "INSERT INTO events (event_type, data) VALUES ('wall', '{}')"},
                {"sql": "SELECT set_config('app.tenant_id', $1, true)", "params": [TENANT_B]},
            ])
            assert r.code == "statement_rejected"
            assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = 'wall'") == 0
            # the connection was closed, not reused; the next request works, for the right tenant
            after = await api.query("SELECT current_setting('app.tenant_id') AS t")
            assert after.status == 200 and after.body["rows"] == [{"t": TENANT_A}]
            assert before.status == 200
            pool = api.running.gateway.database.pool
            assert pool is not None and pool.get_size() == 1
    finally:
        await admin_db.execute("REVOKE EXECUTE ON FUNCTION set_config(text, text, boolean) FROM app")


async def test_release_rolls_back_a_pipelined_begin_asyncpg_never_saw(gateway_with: Any,
                                                                     admin_db: asyncpg.Connection) -> None:
    """A request cancelled right after its first Parse+Describe returned: the BEGIN that
    travelled with it has no ReadyForQuery yet, so asyncpg thinks the connection is idle.
    The pool's reset must roll it back, or the next request would run inside it."""
    open_transactions = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND xact_start IS NOT NULL"
    async with gateway_with(database={"pool_min_size": 1, "pool_max_size": 1}) as api:
        pool = api.running.gateway.database.pool
        assert pool is not None
        async with pool.acquire() as conn:
            conn._transport.write(pipelined(["BEGIN", f"SET LOCAL app.tenant_id = '{TENANT_B}'"]))
            conn.set_gateway_tx_open(True)
            await conn.prepare("SELECT count(*) FROM events")
            assert not conn.is_in_transaction()  # asyncpg's view: stale
            assert await admin_db.fetchval(open_transactions) == 1  # the server's view
        assert await admin_db.fetchval(open_transactions) == 0
        r = await api.query("SELECT current_setting('transaction_isolation') AS iso, "
                            "current_setting('app.tenant_id') AS t", isolation="serializable")
        assert r.status == 200 and r.body["rows"] == [{"iso": "serializable", "t": TENANT_A}], r.body


async def test_release_goes_straight_back_only_when_clean(gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    """`_release` skips asyncpg's shielded task only for a connection with nothing to undo;
    one with the gateway's BEGIN still open takes the pool's own release, which rolls back."""
    open_transactions = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND xact_start IS NOT NULL"
    async with gateway_with(database={"pool_min_size": 1, "pool_max_size": 1}) as api:
        pool = api.running.gateway.database.pool
        assert pool is not None
        conn = await pool.acquire()
        assert await conn.fetchval("SELECT 1") == 1
        assert _releases_at_once(conn) and _connected_holder_free(pool) is False  # the only one is out
        await _release(pool, conn, 5)
        assert pool.get_idle_size() == 1 and _connected_holder_free(pool)
        conn = await pool.acquire()
        conn._transport.write(pipelined(["BEGIN", f"SET LOCAL app.tenant_id = '{TENANT_B}'"]))
        conn.set_gateway_tx_open(True)
        await conn.prepare("SELECT 1")
        assert not _releases_at_once(conn)
        assert await admin_db.fetchval(open_transactions) == 1
        await _release(pool, conn, 5)
        assert await admin_db.fetchval(open_transactions) == 0 and pool.get_idle_size() == 1
        for _ in range(20):  # the request path, released straight back each time, on the one connection
            r = await api.query("SELECT current_setting('app.tenant_id') AS t")
            assert r.status == 200 and r.body["rows"] == [{"t": TENANT_A}]
        assert pool.get_size() == 1 and pool.get_idle_size() == 1
        assert await admin_db.fetchval(open_transactions) == 0


async def test_a_statement_is_parsed_once_unless_asyncpg_must_look_up_its_types(gateway_with: Any) -> None:
    """The Bind that follows the gateway's Parse+Describe reuses the unnamed statement
    (``prepared``), instead of asyncpg sending the Parse again; after a type lookup
    (which replaces the unnamed statement) asyncpg re-sends it, and the result is right."""
    async with gateway_with(database={"pool_min_size": 1, "pool_max_size": 1}) as api:
        pool = api.running.gateway.database.pool
        assert pool is not None
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL app.tenant_id = '{TENANT_A}'")
            state = await _prepare(conn, "SELECT $1::int + 1 AS n", 5)
            assert state.prepared
            rows, _, done = await conn._protocol.bind_execute(state, [41], "", 0, True, 5)
            assert done and [tuple(r) for r in rows] == [(42,)]
            state = await _prepare(conn, "SELECT 'sad'::mood AS m", 5)  # first use of the enum here
            assert not state.prepared
            rows, _, _ = await conn._protocol.bind_execute(state, [], "", 0, True, 5)
            assert [tuple(r) for r in rows] == [("sad",)]
            state = await _prepare(conn, "SELECT 'happy'::mood AS m", 5)  # known now
            assert state.prepared


async def test_session_set_is_blocked_by_grants_too(gateway_with: Any) -> None:
    """`SET` is refused by the guard; without the guard, the database still refuses temp objects."""
    async with gateway_with() as api:
        r = await api.query("CREATE TEMP TABLE events (x int)", key=KEY_B)
        assert r.status == 400 and r.code == "statement_rejected"


@pytest.fixture
async def bypass_role(stack: Stack, admin_db: asyncpg.Connection) -> Any:
    await admin_db.execute("DROP ROLE IF EXISTS app_bypass")
    await admin_db.execute("CREATE ROLE app_bypass LOGIN BYPASSRLS PASSWORD 'bypass'")
    yield stack.admin_dsn.replace("postgres:postgres-dev-only@", "app_bypass:bypass@")
    await admin_db.execute("DROP ROLE IF EXISTS app_bypass")


async def test_serve_refuses_a_role_that_bypasses_rls(stack: Stack, bypass_role: str, tmp_path: Path) -> None:
    with pytest.raises(RoleCanBypassRls, match="BYPASSRLS"):
        await start_gateway(make_settings(stack, database={"dsn": bypass_role}))
    config = tmp_path / "bypass.yaml"
    config.write_text(yaml.safe_dump(merge(base_config(stack), {"database": {"dsn": bypass_role}})))
    proc = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "refusing to start" in proc.stderr and "NOBYPASSRLS" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert KEY_A not in proc.stderr


class _CountingTransport:
    def __init__(self, transport: Any) -> None:
        self.transport, self.sends = transport, 0

    def write(self, data: Any) -> None:
        self.sends += 1
        self.transport.write(data)

    def writelines(self, data: Any) -> None:
        self.sends += 1
        self.transport.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _queries_sent(pool: asyncpg.Pool) -> int:
    """asyncpg's count of Bind+Execute and simple-query round trips on the pool's one connection."""
    holder = next(h for h in pool._holders if h._con is not None)
    return int(holder._con._protocol.queries_count)


async def test_the_commit_travels_with_a_last_statement_that_returns_rows(gateway_with: Any,
                                                                        admin_db: asyncpg.Connection) -> None:
    """Wall + COMMIT go in front of the Sync of a last statement that returns rows, in a
    transaction that writes nothing: one round trip instead of two after the
    Parse+Describe.  Writes, and statements that return no rows, end with a COMMIT of
    their own (after which the gateway knows whether it ran)."""
    async with gateway_with(database={"pool_min_size": 1, "pool_max_size": 1},
                            defaults={"max_rows": 10000}, server={"stream_threshold_rows": 1000}) as api:
        pool = api.running.gateway.database.pool
        assert pool is not None
        assert (await api.query("SELECT 1 AS one")).status == 200  # the one connection exists
        others = (await api.query("SELECT count(*) AS n FROM events")).body["rows"][0]["n"]
        writer = next(h for h in pool._holders if h._con is not None)._con.gateway_writer
        counting = writer._transport = _CountingTransport(writer._transport)  # the sends to PgBouncer
        assert pool.get_size() == 1

        before = _queries_sent(pool)
        r = await api.query("INSERT INTO events (event_type, data) SELECT 'pipelined', '{}' FROM generate_series(1, 3) "
                            "RETURNING event_type", max_rows=2)
        assert _queries_sent(pool) - before == 2
        assert r.status == 200, r.body
        assert r.body["command"] == "INSERT" and r.body["row_count"] == 2 and r.body["truncated"] is True
        assert r.body["rows"] == [{"event_type": "pipelined"}] * 2
        assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = 'pipelined'") == 3

        before = _queries_sent(pool)
        r = await api.query("UPDATE events SET data = '{\"seen\": 1}' WHERE event_type = 'pipelined'")
        assert _queries_sent(pool) - before == 2  # its Bind+Execute, then the wall + COMMIT
        assert r.status == 200 and r.body["command"] == "UPDATE" and r.body["row_count"] == 3
        assert await admin_db.fetchval("SELECT count(*) FROM events WHERE data = '{\"seen\": 1}'") == 3

        # Past the stream threshold (the default max_rows is), a result may stream, from a
        # portal the COMMIT would close; a LIMIT within the threshold rules that out.
        for sql, params, sent in [("SELECT id FROM events ORDER BY id LIMIT 5", [], 1),
                                  ("SELECT id FROM events ORDER BY lower(event_type), id LIMIT $1", [5], 1),
                                  ("SELECT id FROM events ORDER BY id LIMIT 5000", [], 2),
                                  ("SELECT id FROM events ORDER BY id", [], 2),
                                  ("SELECT id FROM events ORDER BY pg_backend_pid(), id LIMIT 5", [], 1)]:
            before, sends = _queries_sent(pool), counting.sends
            r = await api.query(sql, *params, read_only=True)
            assert r.status == 200 and _queries_sent(pool) - before == sent, (sql, r.body)
            # the prefix goes in the same send as the Parse+Describe: one send per round trip
            assert counting.sends - sends == sent + 1
            total = others + 3  # and the three rows inserted above
            limited = "LIMIT 5 " in sql + " " or params == [5]
            assert len(r.body["rows"]) == r.body["row_count"] == (min(total, 5) if limited else total)

        # In a READ ONLY transaction nothing can write, whatever the statement calls.
        before = _queries_sent(pool)
        r = await api.query("SELECT pg_backend_pid() AS pid LIMIT 1", read_only=True)
        assert r.status == 200 and _queries_sent(pool) - before == 1

        # An error in the statement: the wall and COMMIT after it never run, nothing stays open.
        r = await api.query("SELECT 1 / (count(*) - 3) AS x FROM events WHERE event_type = 'pipelined'", read_only=True)
        assert r.status == 422 and r.body["error"]["sqlstate"] == "22012"
        r = await api.query("SELECT current_setting('app.tenant_id') AS t")
        assert r.status == 200 and r.body["rows"] == [{"t": TENANT_A}]
        assert pool.get_size() == 1
        await admin_db.execute("DELETE FROM events WHERE event_type = 'pipelined'")


async def test_pool_wall_holds_when_the_commit_has_its_own_round_trip(gateway_with: Any,
                                                                    admin_db: asyncpg.Connection) -> None:
    """The last statement returns no rows, so the wall runs with its own COMMIT; a tenant
    change earlier in the transaction still stops the write from committing."""
    await admin_db.execute("GRANT EXECUTE ON FUNCTION set_config(text, text, boolean) TO app")
    try:
        async with gateway_with(guard={"allow_functions": ["set_config"]},
                                database={"pool_min_size": 1, "pool_max_size": 1}) as api:
            r = await api.transaction([
                {"sql": "SELECT set_config('app.tenant_id', $1, true)", "params": [TENANT_B]},
                {"sql": "INSERT INTO events (tenant_id, event_type, data) VALUES ($1, 'wall2', '{}')",
                 "params": [TENANT_B]},
            ])
            assert r.code == "statement_rejected" and "changed the tenant setting" in r.body["error"]["message"]
            assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = 'wall2'") == 0
            after = await api.query("SELECT current_setting('app.tenant_id') AS t")
            assert after.status == 200 and after.body["rows"] == [{"t": TENANT_A}]
    finally:
        await admin_db.execute("REVOKE EXECUTE ON FUNCTION set_config(text, text, boolean) FROM app")


async def _database(stack: Stack, dsn: str) -> Database:
    settings = make_settings(stack, database={"dsn": dsn, "pool_min_size": 1, "pool_max_size": 1})
    db = Database(settings.database, settings.tenancy.guc)
    await db.start()
    return db


def _tx(sql: str, **options: Any) -> TxRequest:
    command = sql.split(" ", 1)[0]
    return TxRequest(tenant_id=TENANT_A, statements=[Statement(sql, [], command)],
                     **{"read_only": False, "isolation": None, "timeout_ms": 5000, "max_rows": 10, **options})


async def test_a_strict_row_cap_is_checked_before_the_commit(stack: Stack, admin_db: asyncpg.Connection) -> None:
    """With ``strict_rows`` (Neon's endpoint), too many rows fail the transaction: the
    COMMIT must not have travelled with the statement."""
    db = await _database(stack, stack.gateway_dsn)
    try:
        insert = "INSERT INTO events (event_type, data) SELECT 'strict', '{}' FROM generate_series(1, 3) RETURNING id"
        with pytest.raises(ApiError) as refused:
            await db.run_in_tenant_tx(_tx(insert, max_rows=2, strict_rows=True), RequestTrace(endpoint="test"))
        assert refused.value.sqlstate == "54000"
        assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = 'strict'") == 0
        outcome = await db.run_in_tenant_tx(_tx(insert, max_rows=3, strict_rows=True), RequestTrace(endpoint="test"))
        assert not outcome.results[0].committed and outcome.results[0].row_count == 3
        assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = 'strict'") == 3
    finally:
        await db.close()
        await admin_db.execute("DELETE FROM events WHERE event_type = 'strict'")


@pytest.mark.parametrize("how", ["tcp, sslmode=prefer", "tcp, sslmode=disable", "unix socket"])
async def test_every_way_of_connecting_carries_the_commit(stack: Stack, how: str) -> None:
    """``_connect`` wraps the transport asyncpg's protocol writes through whichever way the
    connection was made: handed over by the loop (no SSL negotiation: ``sslmode=disable``,
    Unix sockets) or by asyncpg after its SSL negotiation (the default, ``prefer``)."""
    dsn = stack.gateway_dsn
    if how == "tcp, sslmode=disable":
        dsn += "?sslmode=disable"
    elif how == "unix socket":
        if stack.local is None:  # CI uses the local stack, which always has the socket
            pytest.skip("the container stack's PgBouncer socket is not reachable from here")  # allowed-skip
        local = stack.local
        dsn = (dsn.replace(f"@127.0.0.1:{local.bouncer_port}/", "@/")
               + f"?host={local.run_dir}&port={local.bouncer_port}")
    db = await _database(stack, dsn)
    try:
        assert db.pool is not None
        async with db.pool.acquire() as conn:
            assert conn.gateway_writer is not None
            assert isinstance(conn._transport.get_extra_info("peername"), str) == (how == "unix socket")
        outcome = await db.run_in_tenant_tx(_tx("SELECT current_setting('app.tenant_id') AS t", read_only=True),
                                            RequestTrace(endpoint="test"))
        assert outcome.results[0].committed and [tuple(r) for r in outcome.results[0].rows] == [(TENANT_A,)]
    finally:
        await db.close()


def test_connections_made_under_uvloop_carry_the_commit(stack: Stack) -> None:
    """The gateway runs on uvloop, whose transports the loop hands to ``_Adopt`` (no SSL
    negotiation) are not ``asyncio.Transport`` subclasses."""
    import uvloop

    async def run(dsn: str) -> list[Any]:
        db = await _database(stack, dsn)
        try:
            tx = _tx("SELECT current_setting('app.tenant_id') AS t", read_only=True)
            outcome = await asyncio.wait_for(db.run_in_tenant_tx(tx, RequestTrace(endpoint="test")), 10)
            assert outcome.results[0].committed
            return [tuple(r) for r in outcome.results[0].rows]
        finally:
            await db.close()

    assert uvloop.run(run(stack.gateway_dsn + "?sslmode=disable")) == [(TENANT_A,)]
    assert uvloop.run(run(stack.gateway_dsn)) == [(TENANT_A,)]


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[Stack]:
    """A stack of its own whose PgBouncer offers TLS (a throwaway self-signed certificate)."""
    for local in temporary_stack("tenant-proxy-tls-", pool_size=2, tls=True):
        yield stack_of(local)


def test_connections_over_tls_carry_the_prefix_and_the_commit(tls_stack: Stack) -> None:
    """After asyncpg's TLS upgrade (``loop.start_tls``), the transport asyncpg's protocol
    writes through is wrapped too: the prefix goes in front, the COMMIT before the Sync.
    Under both loops: uvloop's TLS transport is its own class."""
    import uvloop

    async def run() -> tuple[bool, list[Any], list[Any]]:
        db = await _database(tls_stack, tls_stack.gateway_dsn + "?sslmode=require")
        try:
            assert db.pool is not None
            async with db.pool.acquire() as conn:
                assert conn.gateway_writer is not None
                encrypted = conn._transport.get_extra_info("ssl_object") is not None
            trace = RequestTrace(endpoint="test")
            write = await db.run_in_tenant_tx(
                _tx("INSERT INTO events (event_type, data) VALUES ('over-tls', '{}') RETURNING tenant_id"), trace)
            read = await db.run_in_tenant_tx(
                _tx("SELECT count(*) AS n, current_setting('app.tenant_id') AS t FROM events "
                    "WHERE event_type = 'over-tls'", read_only=True), trace)
            assert read.results[0].committed, "the COMMIT did not travel with the statement"
            return (encrypted, [str(r["tenant_id"]) for r in write.results[0].rows],
                    [tuple(r) for r in read.results[0].rows])
        finally:
            await db.close()

    encrypted, written, seen = asyncio.run(asyncio.wait_for(run(), 30))
    assert encrypted and written == [TENANT_A] and seen == [(1, TENANT_A)]
    encrypted, written, seen = uvloop.run(asyncio.wait_for(run(), 30))
    assert encrypted and written == [TENANT_A] and seen == [(2, TENANT_A)]


class _KillingSink:
    """A RowSink whose first batch has the backend terminated (from outside) while the
    gateway's transaction sits between two protocol steps: PgBouncer passes the FATAL on
    unasked, and asyncpg's next step finds its protocol taken."""

    threshold, batch_rows = 5, 5

    def __init__(self, admin: asyncpg.Connection) -> None:
        self.admin = admin
        self.killed = False

    async def start(self, columns: list[tuple[str, str]]) -> None:
        pass

    async def rows(self, rows: list[Any]) -> bool:
        if not self.killed:
            self.killed = True
            await self.admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE usename = 'app' AND state = 'idle in transaction'")
            await asyncio.sleep(0.2)  # the FATAL arrives while the gateway's protocol is idle

        return True


async def test_a_backend_killed_between_two_steps_is_database_unavailable(stack: Stack,
                                                                         admin_db: asyncpg.Connection) -> None:
    db = await _database(stack, stack.gateway_dsn)
    try:
        sink = _KillingSink(admin_db)
        tx = _tx("SELECT g FROM generate_series(1, 100) g", read_only=True, max_rows=100, sink=sink)
        with pytest.raises(ApiError) as failed:
            await db.run_in_tenant_tx(tx, RequestTrace(endpoint="test"))
        assert sink.killed and failed.value.kind.code == "database_unavailable", failed.value.message
        outcome = await db.run_in_tenant_tx(_tx("SELECT 1 AS ok"), RequestTrace(endpoint="test"))
        assert [tuple(r) for r in outcome.results[0].rows] == [(1,)]  # and the pool recovers
    finally:
        await db.close()
