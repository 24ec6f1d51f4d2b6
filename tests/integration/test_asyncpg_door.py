"""The upgrade contract for asyncpg: every private attribute, method and message text the
gateway relies on (all of them in proxy/pg/_asyncpg.py) exists and behaves as relied on,
against the real PostgreSQL behind PgBouncer.  A new asyncpg that changed any of them
fails here, by name, before anything subtler fails elsewhere."""

from __future__ import annotations

import asyncio
import inspect

import asyncpg
import pytest

from proxy.pg import _asyncpg
from proxy.pg.connection import GatewayConnection, init_connection, no_reset
from proxy.pg.statement import pipelined
from proxy.pg.wire import SplicingTransport, connect

from ..fix_stack import Stack


def test_the_checked_version_is_the_installed_one() -> None:
    """The door's docstring names the version it was checked against: a different minor
    version must be checked again (this file), and CHECKED_AGAINST moved with it."""
    assert asyncpg.__version__.rsplit(".", 1)[0] == _asyncpg.CHECKED_AGAINST.rsplit(".", 1)[0], (
        f"asyncpg {asyncpg.__version__} is installed; proxy/pg/_asyncpg.py was checked against "
        f"{_asyncpg.CHECKED_AGAINST}: re-check each function there, then update CHECKED_AGAINST")


def test_the_private_names_exist() -> None:
    """Names looked up on classes, so that a rename shows without a database."""
    from asyncpg import pool as pool_module
    from asyncpg.protocol import protocol as protocol_module

    assert hasattr(asyncpg.protocol, "Protocol")
    for name in ("prepare", "bind_execute", "execute", "get_record_class", "_is_cancelling"):
        assert hasattr(protocol_module.Protocol, name), f"asyncpg Protocol.{name}"
    for name in ("_get_unique_id", "_on_release", "prepare"):
        assert hasattr(asyncpg.Connection, name), f"asyncpg Connection.{name}"
    for name in ("_init_types", "_init_codecs", "_get_parameters", "_get_attributes"):
        assert hasattr(protocol_module.PreparedStatementState, name), f"asyncpg PreparedStatementState.{name}"
    assert hasattr(pool_module.PoolConnectionHolder, "release") and hasattr(pool_module.PoolConnectionHolder,
                                                                          "is_connected")
    # GatewayConnection is made by asyncpg as connection_class(protocol, transport, loop, addr, config, params)
    params = list(inspect.signature(asyncpg.Connection.__init__).parameters)
    assert params[1:4] == ["protocol", "transport", "loop"], params
    for exc, what in ((asyncpg.UnsupportedClientFeatureError("no encoder for OID 1"), "unhandled_type"),
                      (asyncpg.InternalClientError("cannot switch to state 5; another operation"), "protocol_broken"),
                      (asyncpg.OutdatedSchemaCacheError("cache lookup failed"), "outdated_schema"),
                      (asyncpg.InternalClientError("no decoder for OID 1"), "no_decoder"),
                      (asyncpg.InternalClientError("something new"), "unexpected")):
        assert _asyncpg.driver_failure(exc) == what


async def _pool(stack: Stack, max_size: int = 1) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        stack.gateway_dsn, min_size=1, max_size=max_size, statement_cache_size=0, init=init_connection,
        reset=no_reset, connection_class=GatewayConnection, connect=connect)


async def test_the_pool_internals_behave_as_relied_on(stack: Stack) -> None:
    pool = await _pool(stack)
    try:
        assert _asyncpg.pool_has_connected_idle(pool)  # Pool._queue._queue holds a connected holder
        pooled = await pool.acquire()
        conn = _asyncpg.connection_of(pooled)
        assert isinstance(conn, GatewayConnection) and not _asyncpg.pool_has_connected_idle(pool)
        # a connection through wire.connect writes through a SplicingTransport, and skips the JIT toggle
        assert isinstance(conn.gateway_writer, SplicingTransport) and conn._server_caps.jit is False
        assert _asyncpg.releases_at_once(pooled)
        await _asyncpg.release(pool, pooled, 5)  # the holder's release, without Pool.release's task
        assert pool.get_idle_size() == 1 and _asyncpg.connection_of(pooled) is None
        pooled = await pool.acquire()
        await pooled.execute("BEGIN")
        assert not _asyncpg.releases_at_once(pooled)  # a transaction to roll back: Pool.release's path
        await _asyncpg.release(pool, pooled, 5)
        async with pool.acquire() as again:
            assert not again.is_in_transaction()
    finally:
        await pool.close()


async def test_the_protocol_internals_behave_as_relied_on(stack: Stack) -> None:
    pool = await _pool(stack)
    try:
        async with pool.acquire() as pooled:
            conn = _asyncpg.connection_of(pooled)
            # messages written raw go ahead of the next Parse, in the same round trip
            _asyncpg.write_raw(conn, pipelined(["BEGIN", "SET LOCAL application_name = 'door'"]))
            state = await _asyncpg.prepare_unnamed(conn, "SELECT $1::int + 1 AS n, "
                                                   "current_setting('application_name') AS a", 5)
            assert [t.name for t in _asyncpg.parameter_types(state)] == ["int4"]
            assert [(a.name, a.type.name) for a in _asyncpg.result_attributes(state)] == [("n", "int4"), ("a", "text")]
            rows, status, done = await _asyncpg.bind_execute(conn, state, [41], "", 0, 5)
            assert [tuple(r) for r in rows] == [(42, "door")] and status == b"SELECT 1" and done
            # a named portal read on in batches
            state = await _asyncpg.prepare_unnamed(conn, "SELECT g FROM generate_series(1, 5) g", 5)
            portal = _asyncpg.portal_name(conn)
            assert portal and portal != _asyncpg.portal_name(conn)
            rows, status, done = await _asyncpg.bind_execute(conn, state, [], portal, 2, 5)
            assert [r[0] for r in rows] == [1, 2] and not done
            rows, status, done = await _asyncpg.execute_portal(conn, state, portal, 10, 5)
            assert [r[0] for r in rows] == [3, 4, 5] and done and status == b"SELECT 3"
            await conn.execute("ROLLBACK")
            # a type asyncpg must look up first takes its own prepare, and still works
            state = await _asyncpg.prepare_unnamed(conn, "SELECT ARRAY['a']::varchar(3)[] AS v", 5)
            rows, _, _ = await _asyncpg.bind_execute(conn, state, [], "", 0, 5)
            assert rows[0]["v"] == ["a"]
    finally:
        await pool.close()


async def test_a_cancelled_statement_is_seen_as_cancelling(stack: Stack) -> None:
    """``releases_at_once`` is False while asyncpg cancels a statement (Protocol._is_cancelling)."""
    pool = await _pool(stack)
    try:
        pooled = await pool.acquire()
        task = asyncio.ensure_future(pooled.execute("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not _asyncpg.releases_at_once(pooled)
        await _asyncpg.release(pool, pooled, 5)
        async with pool.acquire() as again:
            assert await again.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
