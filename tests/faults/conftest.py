"""Fault tests get a stack of their own (they stop and restart its servers), with a
PgBouncer pool of 4 so that two transactions can deadlock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from proxy.tools.devstack import LocalStack

from ..fix_gateway import SEED, make_settings, merge, running_gateway
from ..fix_stack import stack_of, temporary_stack


@pytest.fixture(scope="session")
def fault_stack() -> Iterator[LocalStack]:
    yield from temporary_stack("tenant-proxy-faults-", pool_size=4)


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
    def start(**overrides: Any) -> Any:
        quick = {"database": {"acquire_timeout_ms": 1000, "connect_timeout_ms": 1000}}
        return running_gateway(make_settings(stack_of(fault_stack), **merge(quick, overrides)))
    return start
