"""Remembered statement descriptions (proxy/describe.py): one round trip fewer, and never stale."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from proxy.db import Database

from ..fix_gateway import KEY_B, TENANT_A, Api

PROBE_TABLE = """
DROP TABLE IF EXISTS public.described;
CREATE TABLE public.described (
  tenant_id uuid NOT NULL DEFAULT public.current_tenant_id(),
  v integer NOT NULL
);
ALTER TABLE public.described OWNER TO app_owner;
ALTER TABLE public.described ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.described FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON public.described USING (tenant_id = public.current_tenant_id())
  WITH CHECK (tenant_id = public.current_tenant_id());
GRANT SELECT, INSERT ON public.described TO app;
"""


@pytest_asyncio.fixture
async def described_table(admin_db: asyncpg.Connection) -> AsyncIterator[None]:
    await admin_db.execute(PROBE_TABLE)
    await admin_db.execute("INSERT INTO public.described (tenant_id, v) VALUES ($1, 42)", TENANT_A)
    yield
    await admin_db.execute("DROP TABLE IF EXISTS public.described")


def primary(api: Api) -> Database:
    return api.running.gateway.router.primary("default")


async def test_a_repeated_statement_uses_its_description(api: Api, admin_db: asyncpg.Connection) -> None:
    cache = primary(api).descriptions
    sql = "SELECT event_type, $1::int + 1 AS n FROM events WHERE event_type = $2 ORDER BY event_type"
    first = await api.query(sql, 1, "a-1")
    hits = cache.hits
    for _ in range(3):
        again = await api.query(sql, 1, "a-1")
        assert again.status == 200 and again.body == first.body
    assert cache.hits == hits + 3
    assert first.body["rows"] == [{"event_type": "a-1", "n": 2}]
    # still confined: the same remembered statement for another tenant sees its own rows
    r = await api.query(sql, 1, "a-1", key=KEY_B)
    assert r.status == 200 and r.body["rows"] == []
    # no statement of the gateway's is left in the session (the security suite checks every backend too)
    r = await api.query("SELECT count(*) AS n FROM pg_prepared_statements")
    assert r.body["rows"] == [{"n": 0}]


@pytest.mark.usefixtures("described_table")
async def test_a_column_type_change_is_never_decoded_with_the_old_type(api: Api,
                                                                       admin_db: asyncpg.Connection) -> None:
    cache = primary(api).descriptions
    read = "SELECT v FROM described"
    assert (await api.query(read)).body["rows"] == [{"v": 42}]
    assert (await api.query(read)).body["rows"] == [{"v": 42}]  # remembered now
    stale = cache.stale
    # int4 -> int8 keeps the rows but changes the wire format: decoding eight bytes as
    # four would fail, float8 would decode silently wrong.
    for new_type, expected, label in (("bigint", 42, "int8"), ("double precision", 42.0, "float8"),
                                      ("text", "42", "text")):
        await admin_db.execute(f"ALTER TABLE public.described ALTER COLUMN v TYPE {new_type} USING v::{new_type}")
        r = await api.query(read)
        assert r.status == 200, r.body
        assert r.body["columns"] == [{"name": "v", "type": label}] and r.body["rows"] == [{"v": expected}]
    assert cache.stale > stale
    r = await api.query("SELECT count(*) AS n FROM pg_prepared_statements")
    assert r.body["rows"] == [{"n": 0}]


@pytest.mark.usefixtures("described_table")
async def test_a_parameter_type_change_is_described_again(api: Api, admin_db: asyncpg.Connection) -> None:
    sql = "SELECT v FROM described WHERE v = $1"
    assert (await api.query(sql, 42)).body["rows"] == [{"v": 42}]
    assert (await api.query(sql, 42)).body["rows"] == [{"v": 42}]
    # $1 was integer; against a text column the remembered Parse no longer type-checks
    # (text = integer), which must not reach the caller as an error.
    await admin_db.execute("ALTER TABLE public.described ALTER COLUMN v TYPE text USING v::text")
    r = await api.query(sql, "42")
    assert r.status == 200 and r.body["rows"] == [{"v": "42"}], r.body


@pytest.mark.usefixtures("described_table")
async def test_writes_report_their_own_command_and_count(api: Api, admin_db: asyncpg.Connection) -> None:
    sql = "INSERT INTO described (v) SELECT g FROM generate_series(1, $1::int) g"
    for n in (3, 2):
        r = await api.query(sql, n)
        assert (r.status, r.body["command"], r.body["row_count"]) == (200, "INSERT", n), r.body
    returning = "INSERT INTO described (v) SELECT g FROM generate_series(1, $1::int) g RETURNING v"
    for _ in range(2):
        r = await api.query(returning, 8, max_rows=5)
        assert (r.body["command"], r.body["row_count"], r.body["truncated"]) == ("INSERT", 5, True), r.body
    assert await admin_db.fetchval("SELECT count(*) FROM public.described WHERE v < 42") == 3 + 2 + 8 + 8


async def test_only_read_committed_uses_descriptions(api: Api) -> None:
    cache = primary(api).descriptions
    sql = "SELECT current_setting('transaction_isolation') AS iso"
    for _ in range(2):  # (the first may meet a schema change of an earlier test, and not be remembered)
        await api.query(sql)
    hits = cache.hits
    for isolation in ("repeatable read", "serializable"):
        r = await api.query(sql, isolation=isolation)
        assert r.body["rows"] == [{"iso": isolation}]
    assert cache.hits == hits
    r = await api.query(sql, isolation="read committed")
    assert r.body["rows"] == [{"iso": "read committed"}] and cache.hits == hits + 1


async def test_without_the_schema_check_every_statement_is_described(gateway_with: Any,
                                                                      admin_db: asyncpg.Connection) -> None:
    await admin_db.execute("REVOKE EXECUTE ON FUNCTION tenant_ddl.check_schema_version(bigint, text) FROM app")
    try:
        async with gateway_with() as api:
            for _ in range(3):
                r = await api.query("SELECT DISTINCT tenant_id::text AS t FROM events")
                assert r.status == 200 and r.body["rows"] == [{"t": TENANT_A}]
            cache = primary(api).descriptions
            assert not cache.available and cache.hits == 0 and len(cache) == 0
    finally:
        await admin_db.execute("GRANT EXECUTE ON FUNCTION tenant_ddl.check_schema_version(bigint, text) TO app")
    async with gateway_with(database={"describe_cache_size": 0}) as api:
        for _ in range(2):
            assert (await api.query("SELECT 1 AS one")).status == 200
        assert primary(api).descriptions.hits == 0


@pytest.mark.usefixtures("described_table")
async def test_a_streamed_result_checks_the_schema_before_its_first_row(gateway_with: Any,
                                                                         admin_db: asyncpg.Connection) -> None:
    await admin_db.execute("INSERT INTO public.described (tenant_id, v) SELECT $1, g FROM generate_series(1, 300) g",
                           TENANT_A)
    overrides = {"server": {"stream_threshold_rows": 50, "stream_batch_rows": 100},
                 "tenants": {TENANT_A: {"max_rows": 10_000}}}
    async with gateway_with(**overrides) as api:
        sql = "SELECT v FROM described ORDER BY v"
        for _ in range(2):
            r = await api.query(sql)
            assert r.status == 200 and r.body["row_count"] == 301 and r.body["rows"][0] == {"v": 1}
        assert primary(api).descriptions.hits >= 1
        # float4 is four bytes like int4: decoded with the old codec it would pass as
        # (wrong) integers, and the COMMIT's check would come after rows had left.
        await admin_db.execute("ALTER TABLE public.described ALTER COLUMN v TYPE real")
        r = await api.query(sql)
        assert r.status == 200, r.body
        assert r.body["columns"] == [{"name": "v", "type": "float4"}] and r.body["rows"][:2] == [{"v": 1.0}, {"v": 2.0}]


@pytest.mark.usefixtures("described_table")
async def test_parameters_the_old_types_refuse_are_described_again(api: Api, admin_db: asyncpg.Connection) -> None:
    """A remembered statement whose parameter no longer fits its remembered type: the
    request is answered as if described afresh, promptly (no stall, no 500)."""
    sql = "SELECT v FROM described WHERE v = $1"
    for _ in range(2):
        assert (await api.query(sql, 42)).body["rows"] == [{"v": 42}]
    await admin_db.execute("ALTER TABLE public.described ALTER COLUMN v TYPE bigint")
    await admin_db.execute("INSERT INTO public.described (tenant_id, v) VALUES ($1, 3000000000)", TENANT_A)
    for _ in range(2):  # int4 could not carry it; int8 can
        r = await api.query(sql, 3_000_000_000)
        assert r.status == 200 and r.body["rows"] == [{"v": 3_000_000_000}], r.body
    await admin_db.execute("ALTER TABLE public.described ALTER COLUMN v TYPE text USING v::text")
    for _ in range(2):
        started = time.monotonic()
        r = await api.query(sql, "abc")
        assert r.status == 200 and r.body["rows"] == [], r.body
        assert time.monotonic() - started < 2
    # and a caller's own error on a remembered statement is still that error
    r = await api.query("SELECT v FROM described WHERE v = $1 AND 1 / $2::int = 1", "42", 1)
    r = await api.query("SELECT v FROM described WHERE v = $1 AND 1 / $2::int = 1", "42", 0)
    assert r.status == 400 or r.status == 422
    assert r.body["error"]["sqlstate"] == "22012", r.body


async def test_search_path_differing_between_backends_is_caught(gateway_with: Any,
                                                                admin_db: asyncpg.Connection) -> None:
    """ALTER ROLE ... SET search_path fires no event trigger and reaches new backends only:
    the same SQL text then means another table on them."""
    await admin_db.execute("""
        DROP SCHEMA IF EXISTS sp1, sp2 CASCADE;
        CREATE SCHEMA sp1; CREATE SCHEMA sp2;
        CREATE TABLE sp1.t (v integer); CREATE TABLE sp2.t (v real);
        INSERT INTO sp1.t VALUES (7); INSERT INTO sp2.t VALUES (7.5);
        GRANT USAGE ON SCHEMA sp1, sp2 TO app; GRANT SELECT ON sp1.t, sp2.t TO app;
    """)

    async def new_backends(path: str) -> None:
        await admin_db.execute(f"ALTER ROLE app SET search_path = {path}")
        await admin_db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")

    try:
        await new_backends("sp1, public")
        async with gateway_with() as api:
            for _ in range(3):
                r = await api.query("SELECT v FROM t")
                if r.status == 200:
                    break
            assert r.body["rows"] == [{"v": 7}], r.body
            assert (await api.query("SELECT v FROM t")).body["rows"] == [{"v": 7}]  # remembered
            await new_backends("sp2, public")
            for _ in range(3):
                r = await api.query("SELECT v FROM t")
                if r.status == 200:
                    break
            # float4's bits read as int4 would be 1089470464
            assert r.body["columns"] == [{"name": "v", "type": "float4"}] and r.body["rows"] == [{"v": 7.5}], r.body
    finally:
        await admin_db.execute("ALTER ROLE app RESET search_path")
        await admin_db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
        await admin_db.execute("DROP SCHEMA IF EXISTS sp1, sp2 CASCADE")


async def test_a_check_revoked_while_running_turns_descriptions_off(gateway_with: Any,
                                                                   admin_db: asyncpg.Connection) -> None:
    async with gateway_with() as api:
        sql = "SELECT count(*) AS n FROM events WHERE event_type LIKE $1"
        for _ in range(2):
            assert (await api.query(sql, "a-%")).status == 200
        await admin_db.execute("REVOKE EXECUTE ON FUNCTION tenant_ddl.check_schema_version(bigint, text) FROM app")
        try:
            for _ in range(3):
                r = await api.query(sql, "a-%")
                assert r.status == 200 and r.body["rows"][0]["n"] >= 3, r.body
            assert not primary(api).descriptions.available
        finally:
            await admin_db.execute("GRANT EXECUTE ON FUNCTION tenant_ddl.check_schema_version(bigint, text) TO app")
