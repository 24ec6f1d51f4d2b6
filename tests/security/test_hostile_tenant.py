"""Round two of the attacker's suite (issue 18): one test per finding, each made with tenant
A's key only, on the shared backend (PgBouncer pool of one).  Each shows the finding closed
by the wall chosen for it, and that tenant B is unharmed: its requests succeed (while A
attacks, where the fix is a resource bound) and its rows are neither shown nor changed."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from proxy.config import Limits
from proxy.policy.limits import Scheduler

from ..fix_gateway import KEY_A, KEY_B, SEED, TENANT_A, TENANT_B, Api
from ..fix_stack import Stack

B_SEED = SEED[TENANT_B]


async def b_rows(admin_db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await admin_db.fetch(
        "SELECT id, created_at, event_type, data::text FROM events WHERE tenant_id = $1 ORDER BY id", TENANT_B)]


async def assert_b_unharmed(api: Api, admin_db: asyncpg.Connection, before: list[tuple[Any, ...]]) -> None:
    r = await api.query("SELECT event_type FROM events WHERE event_type LIKE 'b-%' ORDER BY 1", key=KEY_B)
    assert r.status == 200, r.body
    assert [row["event_type"] for row in r.body["rows"]] == B_SEED
    assert await b_rows(admin_db) == before, "tenant B's rows changed"


def shows_nothing_of_b(reply_body: Any, b: list[tuple[Any, ...]]) -> None:
    text = str(reply_body)
    for row in b:
        assert str(row[0]) not in text, f"B's id came back: {text[:300]}"
    assert TENANT_B not in text


@pytest_asyncio.fixture
async def as_app(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """The gateway's role straight through PgBouncer, past the guard: the database's wall alone."""
    conn = await asyncpg.connect(stack.gateway_dsn, statement_cache_size=0)
    yield conn
    await conn.close()


async def in_tenant(conn: asyncpg.Connection, sql: str, *args: Any) -> Any:
    async with conn.transaction():
        await conn.execute(f"SET LOCAL app.tenant_id = '{TENANT_A}'")
        return await conn.fetch(sql, *args)


# ---------------------------------------------------------------- 1. ON CONFLICT ... WHERE reads B's row

ORACLE = ("INSERT INTO events (id, created_at, event_type, data) VALUES ($1, $2, 'x', '{}') "
          "ON CONFLICT (tenant_id, id, created_at) DO UPDATE SET data = excluded.data "
          "WHERE row_to_json(events)::text::int = 0")


async def test_on_conflict_where_cannot_read_another_tenants_row(
        api: Api, admin_db: asyncpg.Connection, as_app: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    b_id, b_at = before[0][0], before[0][1]
    # The guard refuses the form outright ...
    r = await api.query(ORACLE, str(b_id), b_at.isoformat())
    assert (r.status, r.code) == (400, "statement_rejected") and "ON CONFLICT" in r.body["error"]["message"]
    for key_spec in ("(id, created_at)", "(id)"):  # ... and the old key is not there to aim at
        r = await api.query(ORACLE.replace("(tenant_id, id, created_at)", key_spec).replace(" WHERE", " --"),
                            str(b_id), b_at.isoformat())
        assert r.status == 400 and r.body["error"]["sqlstate"] == "42P10", r.body
    # Past the guard, the database's wall alone: every key starts with tenant_id, so B's
    # (id, created_at) conflicts with nothing of A's; the WHERE never sees B's row.
    with pytest.raises(asyncpg.PostgresError) as err:  # rolled back: a new row of A's would stay otherwise
        async with as_app.transaction():
            await as_app.execute(f"SET LOCAL app.tenant_id = '{TENANT_A}'")
            inserted = await as_app.fetch(ORACLE + " RETURNING tenant_id::text", b_id, b_at)
            assert inserted == [(TENANT_A,)]
            await as_app.execute("SELECT 1/0")
    assert err.value.sqlstate == "22012"
    shows_nothing_of_b(r.body, before)
    await assert_b_unharmed(api, admin_db, before)


async def test_explain_and_echoing_errors_carry_nothing(api: Api, admin_db: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    # EXPLAIN's estimates walked the shared statistics to B's ids: refused in every form.
    for sql in ("EXPLAIN SELECT * FROM events WHERE id < $1", "EXPLAIN (COSTS OFF) SELECT * FROM events",
                "EXPLAIN (FORMAT JSON) SELECT * FROM events WHERE id < $1"):
        params = [str(before[0][0])] if "$1" in sql else []
        r = await api.query(sql, *params)
        assert (r.status, r.code) == (400, "statement_rejected"), r.body
    # A data exception keeps PostgreSQL's words, not the value it quotes.
    r = await api.query("SELECT row_to_json(e)::text::int FROM events e LIMIT 1")
    assert r.status == 422 and r.body["error"]["sqlstate"] == "22P02"
    assert r.body["error"]["message"] == 'invalid input syntax for type integer: "…"'
    r = await api.query("SELECT (event_type || '99999999999')::int FROM events LIMIT 1")
    assert r.status == 422 and r.body["error"]["sqlstate"] == "22P02"
    r = await api.query("SELECT (length(event_type)::text || '99999999999')::int FROM events LIMIT 1")
    assert (r.status, r.body["error"]["sqlstate"]) == (422, "22003")
    assert r.body["error"]["message"] == 'value "…" is out of range for type integer'
    await assert_b_unharmed(api, admin_db, before)


# ---------------------------------------------------------------- 2. one deep expression killed the gateway

DEEP = {
    "plus-chain": "SELECT " + "+".join(["1"] * 30000),
    "concat-chain": "SELECT " + "||".join(["'a'"] * 25000),
    "json-arrows": "SELECT '{}'::jsonb" + "->'a'" * 25000,
    "union-chain": " UNION ".join(["SELECT 1"] * 20000),
    "parentheses": "SELECT " + "(" * 30000 + "1" + ")" * 30000,
    "nested-arrays": "SELECT " + "ARRAY[" * 12000 + "1" + "]" * 12000,
    "nested-functions": "SELECT " + "abs(" * 20000 + "1" + ")" * 20000,
    "nested-subqueries": "SELECT " + "(SELECT " * 9000 + "1" + ")" * 9000,
    "nested-case": "SELECT " + "CASE WHEN true THEN " * 5000 + "1" + " END" * 5000,
}


async def test_deep_nesting_of_every_kind_is_a_400_and_the_gateway_lives(
        api: Api, admin_db: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    parser = api.running.gateway.parser
    for kind, sql in DEEP.items():
        r = await api.query(sql)
        assert r.status in (400, 413), (kind, r.status)
        assert r.code in ("statement_rejected", "payload_too_large"), (kind, r.body)
        r = await api.query("SELECT 1 AS one", key=KEY_B)  # the same process answers right after
        assert r.status == 200, (kind, r.body)
    assert parser.crashes >= 1, "no shape reached the parser's crash: the test proves nothing"
    short = "SELECT " + "+".join(["1"] * 500)  # within the inline limit: parsed on the loop, and fine
    assert (await api.query(short)).body["rows"] == [{"?column?": 500}]
    await assert_b_unharmed(api, admin_db, before)


# ---------------------------------------------------------------- 3. long parses froze the event loop

def big_array(n_bytes: int, salt: int, refused: bool = False) -> str:
    head = "SELECT set_config('a', 'b', true), " if refused else "SELECT "
    return head + f"{salt} AS salt, ARRAY[" + ",".join(["1"] * (n_bytes // 2)) + "]"


async def test_long_parses_do_not_freeze_other_tenants(api: Api, admin_db: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    reader, writer = await api.open_raw_query({"sql": big_array(1000 * 1024, 0)})  # over max_sql_bytes
    try:
        t0 = time.monotonic()
        assert (await reader.readline()).startswith(b"HTTP/1.1 413")  # refused before any parse
        assert time.monotonic() - t0 < 0.5
    finally:
        writer.close()
    stop = time.monotonic() + 3.0
    salt = iter(range(1, 10_000))

    async def sender() -> int:
        sent = 0
        while time.monotonic() < stop:
            # ~0.5 s to parse, each one new, then refused by the guard: the parse is all it costs
            r = await api.query(big_array(240_000, next(salt), refused=True))
            assert (r.status, r.code) in ((400, "statement_rejected"), (503, "concurrency_limited")), r.body
            sent += 1
        return sent

    senders = [asyncio.create_task(sender()) for _ in range(3)]
    latencies = []
    while time.monotonic() < stop:
        t0 = time.monotonic()
        r = await api.query("SELECT 1 AS one", key=KEY_B, read_only=True)
        latencies.append(time.monotonic() - t0)
        assert r.status == 200, r.body
        await asyncio.sleep(0.02)
    assert sum(await asyncio.gather(*senders)) >= 3
    # A parse on the loop would hold B for the whole parse (2.9 s for 1 MiB, ~0.5 s here).
    assert max(latencies) < 0.3, f"B waited {max(latencies):.2f} s behind A's parses"
    await assert_b_unharmed(api, admin_db, before)


async def test_admission_comes_before_the_parse(gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    async with gateway_with(tenants={TENANT_A: {"rate_per_s": 0.1, "burst": 1}}) as api:
        texts = [big_array(20_000, n) for n in range(5)]
        replies = [await api.query(t) for t in texts]
        assert [r.status for r in replies] == [200, 429, 429, 429, 429]
        guard = api.running.gateway.runtime.guard
        assert [guard.cached(t) is not None for t in texts] == [True, False, False, False, False]


# ---------------------------------------------------------------- 4. the shared lock table

async def test_lock_table_cannot_be_filled(api: Api, admin_db: asyncpg.Connection,
                                           as_app: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    floods = ["SELECT count(pg_advisory_xact_lock(g)) FROM generate_series(1, 30000) g",
              "SELECT count(pg_try_advisory_xact_lock_shared(g, g)) FROM generate_series(1, 30000) g",
              "SELECT count(pg_relation_size(oid)) FROM pg_class",
              "SELECT count((c.oid).pg_table_size) FROM pg_class c"]
    for sql in floods:
        r = await api.query(sql)
        assert (r.status, r.code) == (400, "statement_rejected"), (sql, r.body)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the role cannot either
            await in_tenant(as_app, sql.replace("(c.oid).pg_table_size", "pg_table_size(c.oid)"))
    # The idempotency claim, which took an advisory lock, still runs a key once.
    body = {"sql": "INSERT INTO events (event_type, data) SELECT 'idem-once', '{}' FROM pg_sleep(0.5)"}
    first = asyncio.create_task(api.request("POST", "/v1/query", json=body, headers={"Idempotency-Key": "k-lock"}))
    await asyncio.sleep(0.2)
    second = await api.request("POST", "/v1/query", json=body, headers={"Idempotency-Key": "k-lock"})
    assert (await first).status == 200
    # behind the first in PgBouncer's pool of one, or beside it: replayed, or told to retry
    assert (second.status == 200 and second.headers.get("Idempotent-Replayed") == "true") \
        or second.code == "idempotency_in_progress", second.body
    assert await admin_db.fetchval("DELETE FROM events WHERE event_type = 'idem-once' RETURNING 1") == 1
    await assert_b_unharmed(api, admin_db, before)


# ---------------------------------------------------------------- 5. a slot held past statement_timeout

async def test_one_deadline_per_transaction(gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    # B keeps the default 5 s: with PgBouncer's pool of one it queues there behind A's transactions.
    async with gateway_with(defaults={"statement_timeout_ms": 1000},
                            tenants={TENANT_B: {"statement_timeout_ms": 5000}}) as api:
        async def hog() -> Any:
            t0 = time.monotonic()
            r = await api.transaction([{"sql": "SELECT pg_sleep(0.9)"}] * 5)
            return r, time.monotonic() - t0

        hogs = [asyncio.create_task(hog()) for _ in range(6)]
        await asyncio.sleep(0.2)
        for _ in range(3):
            t0 = time.monotonic()
            r = await api.query("SELECT 1 AS one", key=KEY_B)
            # behind at most A's two transactions (its cap), each cut at ~1.5 s, not 4.5 s
            assert r.status == 200 and time.monotonic() - t0 < 3.5, r.body
        for r, took in await asyncio.gather(*hogs):
            if r.status == 503:  # queued behind its own cap (half the slots), then refused
                assert r.code == "concurrency_limited"
                continue
            assert (r.status, r.code) == (504, "statement_timeout"), r.body
            assert "transaction_timeout_ms" in r.body["error"]["message"]
            assert took < 5, f"the transaction took {took:.1f} s (5 x 0.9 s unbounded, queued ones too)"
        await assert_b_unharmed(api, admin_db, before)


async def test_a_slow_stream_reader_is_cut_at_the_deadline(gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    async with gateway_with(defaults={"statement_timeout_ms": 1000, "max_rows": 200000},
                            server={"stream_threshold_rows": 100}) as api:
        reader, writer = await api.open_raw_query(
            {"sql": "SELECT g, repeat('x', 2000) AS pad FROM generate_series(1, 200000) g", "read_only": True})
        try:
            await reader.readexactly(4096)  # the 200 and the start of the stream, then it stops reading
            await asyncio.sleep(2.5)
            t0 = time.monotonic()
            r = await api.query("SELECT 1 AS one", key=KEY_B)
            assert r.status == 200 and time.monotonic() - t0 < 1.0
            received = 4096
            try:
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                    received += len(chunk)
            except ConnectionResetError:
                pass  # cut off
            assert received < 200000 * 2000, "the whole result came: the stream was not cut"
        finally:
            writer.close()


def test_default_concurrency_cap_leaves_slots_for_others() -> None:
    async def run() -> None:
        scheduler = Scheduler(slots=4, acquire_timeout_s=0.05)
        limits = Limits(queue_timeout_ms=50)
        assert [await scheduler.admit(TENANT_A, limits) for _ in range(2)] == [0.0, 0.0]
        with pytest.raises(Exception, match="too many requests in flight"):
            await scheduler.admit(TENANT_A, limits)
        assert [await scheduler.admit(TENANT_B, limits) for _ in range(2)] == [0.0, 0.0]
    asyncio.run(run())


# ---------------------------------------------------------------- 6. other tenants' activity

ACTIVITY = ["SELECT query FROM pg_stat_activity", "SELECT count(*) FROM pg_locks",
            "SELECT n_live_tup FROM pg_stat_user_tables", "SELECT txid_current()", "SELECT pg_current_wal_lsn()",
            "SELECT pg_stat_get_activity(NULL)", "SELECT pg_current_xact_id()"]


async def test_other_tenants_activity_is_not_visible(api: Api, admin_db: asyncpg.Connection,
                                                     as_app: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    for sql in ACTIVITY:
        r = await api.query(sql)
        assert (r.status, r.code) == (400, "statement_rejected"), (sql, r.body)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await in_tenant(as_app, sql)
    await assert_b_unharmed(api, admin_db, before)


# ---------------------------------------------------------------- 7. memory and disk

async def test_every_response_is_capped_and_the_role_has_limits(gateway_with: Any,
                                                                 admin_db: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    cap = 1024 * 1024
    async with gateway_with(tenants={TENANT_A: {"max_response_bytes": cap}}) as api:
        big = {"sql": "SELECT g, repeat('x', 200000) AS pad FROM generate_series(1, 6) g"}
        r = await api.transaction([big, big])
        assert r.status == 200
        results = r.body["results"]
        assert results[0]["truncated"] and results[1]["truncated"] and results[1]["rows"] == []
        assert 0 < len(results[0]["rows"]) < 6
        neon = await api.request("POST", "/sql", json={"query": big["sql"]},
                                 headers={"Neon-Connection-String": "postgresql://x@y/z"})
        assert neon.status < 500 and len(str(neon.body)) < 2 * cap
        r = await api.query("SELECT current_setting('temp_file_limit') AS t, current_setting('work_mem') AS w, "
                            "current_setting('max_parallel_workers_per_gather') AS p", key=KEY_B)
        assert r.body["rows"] == [{"t": "1GB", "w": "4MB", "p": "0"}]
        await assert_b_unharmed(api, admin_db, before)


# ---------------------------------------------------------------- 10. the field notation and the deny list

async def test_denied_prefixes_hold_for_functions_called_as_fields(api: Api, admin_db: asyncpg.Connection) -> None:
    before = await b_rows(admin_db)
    for sql in ("SELECT ('host=x'::text).dblink_connect", "SELECT (1::bigint).pg_advisory_xact_lock",
                "SELECT (NULL::int).pg_stat_get_backend_activity", "SELECT (0::oid).lo_get"):
        r = await api.query(sql)
        assert (r.status, r.code) == (400, "statement_rejected"), (sql, r.body)
        assert "called as a field" in r.body["error"]["message"]
    await assert_b_unharmed(api, admin_db, before)


async def test_tenant_a_is_not_refused_its_own_work(api: Api) -> None:
    """The walls above cost a well-behaved tenant nothing it needs."""
    r = await api.query("INSERT INTO events (event_type, data) VALUES ('own', '{}') "
                        "ON CONFLICT (tenant_id, id, created_at) DO UPDATE SET data = excluded.data "
                        "RETURNING tenant_id")
    assert r.status == 200 and r.body["rows"] == [{"tenant_id": TENANT_A}]
    r = await api.query("DELETE FROM events WHERE event_type = 'own'")
    assert r.status == 200


# ---------------------------------------------------------------- round three: values costly to encode

async def test_large_bit_strings_geometry_and_numerics_neither_freeze_nor_pass_the_cap(
        gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    """A 20-million-bit varbit took 9 s of the event loop to encode (asyncpg built it bit by
    bit), and a numeric counted as 16 bytes let 131 MB pass a 1 MB cap."""
    before = await b_rows(admin_db)
    cap = 1_000_000
    async with gateway_with(tenants={TENANT_A: {"max_response_bytes": cap}}) as api:
        heavy = [
            "SELECT repeat('1', 20000000)::varbit AS b",
            "SELECT polygon(500000, circle '((0,0),1)') AS p FROM generate_series(1, 4)",
            "SELECT repeat('9', 131000)::numeric AS n FROM generate_series(1, 200)",
        ]
        for sql in heavy:
            attack = asyncio.create_task(api.query(sql, read_only=True))
            await asyncio.sleep(0.05)
            worst = 0.0
            while not attack.done():
                t0 = time.monotonic()
                r = await api.query("SELECT 1 AS one", key=KEY_B)
                worst = max(worst, time.monotonic() - t0)
                assert r.status == 200, r.body
            reply = await attack
            assert worst < 1.0, f"B waited {worst:.2f} s behind {sql}"
            if reply.status == 200 and reply.body["rows"]:
                assert len(str(reply.body)) < 3 * cap or reply.body["truncated"] is True, sql
        r = await api.query("SELECT repeat('9', 131000)::numeric AS n FROM generate_series(1, 20)", read_only=True)
        assert r.status == 200 and r.body["truncated"] is True and len(r.body["rows"]) < 10
        await assert_b_unharmed(api, admin_db, before)


# ---------------------------------------------------------------- round three: rows read before the cap

def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


async def test_rows_far_past_the_cap_are_refused_before_they_are_read(
        gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    """300 rows of 10 MB (3 GB) were all decoded before the 1 MB cap cut them: the gateway
    grew by 1.6 GB.  The connection's reads are metered: past twice the cap and a MiB, the
    result is refused (422, 54000) and the connection dropped; nothing A wrote is kept."""
    before = await b_rows(admin_db)
    cap = 1_000_000
    async with gateway_with(tenants={TENANT_A: {"max_response_bytes": cap, "max_rows": 100_000}}) as api:
        _peak_rss_reset()
        base = _peak_rss()
        attacks = [
            ("SELECT repeat('x', 10000000) AS pad FROM generate_series(1, 300)", True),
            ("SELECT repeat('x', 200000000) AS pad", True),
            ("INSERT INTO events (event_type, data) SELECT 'fat', jsonb_build_object('p', repeat('x', 4000000)) "
             "FROM generate_series(1, 50) RETURNING data", False),
        ]
        for sql, read_only in attacks:
            r = await api.query(sql, read_only=read_only)
            assert (r.status, r.code) == (422, "sql_error"), (sql, r.status, str(r.body)[:300])
            assert r.body["error"]["sqlstate"] == "54000" and "max_response_bytes" in r.body["error"]["message"]
            r = await api.query("SELECT 1 AS one", key=KEY_B)
            assert r.status == 200
        grown = _peak_rss() - base
        assert grown < 150 * 1024 * 1024, f"the gateway grew by {grown / 2**20:.0f} MiB"
        assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = 'fat'") == 0
        # A stream of many moderate rows is read batch by batch, each batch within the
        # meter: cut at the cap, not refused.
        r = await api.query("SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 40000) g", read_only=True)
        assert r.status == 200 and r.body["truncated"] is True
        assert 1000 < len(r.body["rows"]) < 2001
        await assert_b_unharmed(api, admin_db, before)


# ---------------------------------------------------------------- round three: counters, statistics, MERGE

async def test_merge_cannot_tell_whether_another_tenants_row_matches(
        api: Api, admin_db: asyncpg.Connection, as_app: asyncpg.Connection) -> None:
    """PostgreSQL 15 raises an RLS error for ``MERGE ... ON true WHEN MATCHED`` when another
    tenant has rows in the table (403 if it has, 200 if not).  The guard refuses MERGE."""
    before = await b_rows(admin_db)
    b_id = before[0][0]
    probes = [f"MERGE INTO events t USING (SELECT 1) s ON t.id = '{b_id}' WHEN MATCHED THEN DELETE",
              "MERGE INTO events t USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE",
              "MERGE INTO events t USING (SELECT 1) s ON true WHEN MATCHED THEN UPDATE SET data = '{}'"]
    for sql in probes:
        r = await api.query(sql)
        assert (r.status, r.code) == (400, "statement_rejected"), (sql, r.body)
        assert "MERGE is not allowed" in r.body["error"]["message"]
        shows_nothing_of_b(r.body, before)
    # What the guard stands in front of: the database alone answers the probe with an error.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await in_tenant(as_app, probes[1])
    await assert_b_unharmed(api, admin_db, before)


async def test_counters_and_row_statistics_are_not_shown(
        api: Api, admin_db: asyncpg.Connection, as_app: asyncpg.Connection) -> None:
    """age(xid), mxid_age and pg_control_* showed the cluster's transaction counter;
    pg_class.reltuples/relpages every tenant's rows per table and partition."""
    before = await b_rows(admin_db)
    for sql in ("SELECT mxid_age('1'::xid) AS a", "SELECT * FROM pg_control_checkpoint()",
                "SELECT * FROM pg_control_system()", "SELECT pg_xact_commit_timestamp('3'::xid) AS t",
                "SELECT sum(reltuples) AS n FROM pg_class WHERE relname LIKE 'events%'",
                "SELECT c.relpages FROM pg_catalog.pg_class c"):
        r = await api.query(sql)
        assert (r.status, r.code) == (400, "statement_rejected"), (sql, r.body)
    # age(xid) shares its name with age(timestamp): the database refuses the one overload.
    r = await api.query("SELECT age('3'::xid) AS a")
    assert r.status == 403 and "permission denied" in r.body["error"]["message"], r.body
    r = await api.query("SELECT age(timestamp '2000-01-01', timestamp '1999-01-01')::text AS a")
    assert r.status == 200 and r.body["rows"] == [{"a": "1 year"}]
    for sql in ("SELECT age('3'::xid)", "SELECT mxid_age('1'::xid)", "SELECT (pg_control_checkpoint()).next_xid"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await in_tenant(as_app, sql)
    r = await api.query("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'events'")
    assert r.status == 200 and r.body["rows"] == [{"n": 1}]
    await assert_b_unharmed(api, admin_db, before)


# ---------------------------------------------------------------- round four (helper's probes, fixed)

async def _b_worst_latency_while(api: Api, attack: Any) -> tuple[Any, float, list[Any]]:
    """Run ``attack`` (a coroutine) while B sends SELECT 1 every 20 ms; B's worst latency."""
    stop = False
    worst = 0.0
    failures: list[Any] = []

    async def victim() -> None:
        nonlocal worst
        while not stop:
            t = time.perf_counter()
            r = await api.query("SELECT 1 AS one", key=KEY_B)
            worst = max(worst, time.perf_counter() - t)
            if r.status != 200:
                failures.append((r.status, r.body))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(victim())
    await asyncio.sleep(0.2)
    try:
        result = await attack
    finally:
        await asyncio.sleep(0.3)
        stop = True
        await task
    return result, worst, failures


@pytest.mark.parametrize("sql", [
    "SELECT array_fill('10.1.2.0/24'::cidr, ARRAY[1000000]) AS a",
    "SELECT array_fill(NULL::int, ARRAY[10000000]) AS a",
    "SELECT array_fill(now(), ARRAY[1000000]) AS a",
    "SELECT array_fill(0.5::float4, ARRAY[1000000]) AS a",
])
async def test_a_large_array_is_refused_before_it_freezes_the_loop(api: Api, sql: str) -> None:
    """Round four F1: arrays are decoded element by element on the event loop (a million
    cidr took 8 s, 10 million NULLs 3.5 s): a result with array columns may bring 2 MiB."""
    reply, worst, failures = await _b_worst_latency_while(api, api.query(sql, read_only=True))
    assert (reply.status, reply.code) == (422, "sql_error"), reply.body
    assert "array_to_json" in reply.body["error"]["message"]
    assert not failures, failures
    assert worst < 1.0, f"B's SELECT 1 took {worst:.2f} s behind {sql}"


async def test_arrays_within_the_budget_and_as_json_are_answered(api: Api) -> None:
    r = await api.query("SELECT ARRAY['10.1.2.0/24'::cidr, '::1'::inet] AS a, ARRAY[1, NULL, 3] AS b, "
                        "'08:00:2b:01:02:03'::macaddr AS m")
    assert r.status == 200 and r.body["rows"] == [{"a": ["10.1.2.0/24", "::1"], "b": [1, None, 3],
                                                   "m": "08:00:2b:01:02:03"}], r.body
    r = await api.query("SELECT array_to_json(array_fill(7, ARRAY[500000])) AS a", read_only=True)
    assert r.status == 200 and len(r.body["rows"][0]["a"]) == 500000


async def test_a_parameter_the_server_cannot_read_keeps_the_replicas(gateway_with: Any, stack: Stack) -> None:
    """Round four F2: PostgreSQL answers 08P01 to a \"char\" parameter of '' (a statement's
    problem on a live connection); it took every replica out of rotation for all tenants."""
    async with gateway_with(database={"replicas": [stack.gateway_dsn]}) as api:
        router = api.running.gateway.router
        r = await api.query('SELECT $1::"char" AS c', "", read_only=True)
        assert (r.status, r.code) == (422, "sql_error") and r.body["error"]["retryable"] is False, r.body
        downs = [name for c in router._clusters.values() for name, until in c.down_until.items()
                 if until > time.monotonic()]
        assert downs == [], downs
        r = await api.query("SELECT 1 AS one", key=KEY_B, read_only=True)
        assert r.status == 200


def _raw_post(port: int, body: bytes, headers: dict[str, str]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        out = b""
        s.settimeout(3)
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


@pytest.mark.parametrize("status", [101, -5, 1000])
async def test_a_replay_answers_200_whatever_the_stored_status(api: Api, status: int) -> None:
    """Round four F3: the idempotency record is a row of a tenant table; a replay put its
    status on the wire (101 Switching Protocols, invalid status lines)."""
    key = f"round4-{status}-{time.monotonic_ns()}"
    body = {"sql": "INSERT INTO events (event_type, data) VALUES ('round4', '{}') RETURNING event_type",
            "params": []}
    r = await api.request("POST", "/v1/query", json=body, headers={"Idempotency-Key": key})
    assert r.status == 200, r.body
    r = await api.query("UPDATE idempotency_keys SET status = $1 WHERE key = $2 RETURNING status", status, key)
    assert r.status == 200 and r.body["rows"] == [{"status": status}], r.body
    raw = await asyncio.to_thread(_raw_post, api.running.port, json.dumps(body).encode(),
                                  {"Authorization": f"Bearer {KEY_A}", "Idempotency-Key": key})
    assert raw.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 200"), raw[:100]
    assert b"Idempotent-Replayed: true" in raw
    await api.query("DELETE FROM events WHERE event_type = 'round4'")


async def test_internal_errors_on_demand_are_4xx_and_multixacts_are_hidden(api: Api) -> None:
    """Round four F4: XX000 raised on a built-in's arguments was a 500 at will;
    pg_get_multixact_members shows other tenants' row locks."""
    r = await api.query("SELECT pg_identify_object_as_address(0, 0, 0)")
    assert (r.status, r.code) == (422, "sql_error"), r.body
    r = await api.query("SELECT pg_get_multixact_members('1'::xid)")
    assert (r.status, r.code) == (400, "statement_rejected"), r.body
