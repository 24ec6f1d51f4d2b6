"""Fault tests get a stack of their own (they stop and restart its servers), with a
PgBouncer pool of 4 so that two transactions can deadlock."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from proxy.app import start_gateway
from proxy.config import parse_config
from proxy.devstack import LocalStack

from ..fix_gateway import SEED, Api, base_config, merge
from ..fix_stack import Stack


@pytest.fixture(scope="session")
def fault_stack() -> Iterator[LocalStack]:
    root = Path(tempfile.mkdtemp(prefix="tenant-proxy-faults-"))
    local = LocalStack(root, pool_size=4)
    local.start()
    try:
        yield local
    finally:
        local.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture(scope="session")
async def fault_admin(fault_stack: LocalStack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fault_stack.admin_dsn)
    for tenant, types in SEED.items():
        for event_type in types:
            await conn.execute("INSERT INTO events (tenant_id, event_type, data) VALUES ($1, $2, '{}')",
                               tenant, event_type)
    await conn.execute("CREATE TABLE IF NOT EXISTS public.accounts (id int, tenant_id uuid NOT NULL "
                       "DEFAULT current_tenant_id(), balance int, PRIMARY KEY (tenant_id, id))")
    await conn.execute("""
        ALTER TABLE accounts OWNER TO app_owner;
        ALTER TABLE accounts ENABLE ROW LEVEL SECURITY; ALTER TABLE accounts FORCE ROW LEVEL SECURITY;
        DROP POLICY IF EXISTS tenant_isolation ON accounts;
        CREATE POLICY tenant_isolation ON accounts USING (tenant_id = current_tenant_id())
          WITH CHECK (tenant_id = current_tenant_id());
        GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO app;""")
    yield conn
    await conn.close()


async def admin_query(stack: LocalStack, sql: str, *args: Any) -> Any:
    """A fresh superuser connection each time: the fault tests restart PostgreSQL under us."""
    conn = await asyncpg.connect(stack.admin_dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def assert_no_transaction_left_open(stack: LocalStack) -> None:
    rows = await admin_query(stack, "SELECT state, query FROM pg_stat_activity WHERE usename = 'app' "
                                    "AND state LIKE 'idle in transaction%'")
    assert rows == [], rows


@pytest.fixture
def fault_gateway(fault_stack: LocalStack, fault_admin: asyncpg.Connection) -> Any:
    """``async with fault_gateway(**overrides) as api`` over the fault stack."""
    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Api]:
        stack = Stack(gateway_dsn=fault_stack.gateway_dsn, admin_dsn=fault_stack.admin_dsn,
                      pgbouncer_admin_dsn=fault_stack.pgbouncer_admin_dsn)
        raw = merge(base_config(stack), merge({"database": {"acquire_timeout_ms": 1000, "connect_timeout_ms": 1000}},
                                              overrides))
        running = await start_gateway(parse_config(raw, {}))
        try:
            async with aiohttp.ClientSession() as session:
                yield Api(session, running)
        finally:
            await running.stop()
    return start
