"""Chaos: concurrent writers with idempotency keys and retries, while PgBouncer is killed and
restarted twice and PostgreSQL once.  Every write acknowledged with a 2xx must be stored
exactly once, under the right tenant, and nothing else may be."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from proxy.client import AsyncClient
from proxy.tools.devstack import LocalStack

from ..fix_gateway import KEY_ANY, TENANT_A, TENANT_B, TENANT_C
from .conftest import admin_query, assert_no_transaction_left_open

TENANTS = (TENANT_A, TENANT_B, TENANT_C)
WRITERS_PER_TENANT = 2
WRITES_PER_WRITER = 60


async def _writer(base: str, tenant: str, writer: int, acked: list[tuple[str, int]]) -> int:
    async with AsyncClient(base, KEY_ANY, tenant=tenant, retries=200, backoff_s=0.05, max_backoff_s=0.5,
                           timeout_s=10) as client:
        for i in range(WRITES_PER_WRITER):
            n = writer * 1000 + i
            await client.query("INSERT INTO events (event_type, data) "
                               "VALUES ('chaos', jsonb_build_object('n', $1::int))", n)
            acked.append((tenant, n))
            await asyncio.sleep(random.uniform(0, 0.02))
        return client.retried


async def _chaos(stack: LocalStack) -> None:
    loop = asyncio.get_running_loop()
    for action in ("bouncer", "postgres", "bouncer"):
        await asyncio.sleep(0.8)
        if action == "bouncer":
            await loop.run_in_executor(None, stack.stop_bouncer)
            await asyncio.sleep(0.5)
            await loop.run_in_executor(None, stack.start_bouncer)
        else:
            await loop.run_in_executor(None, stack.restart_postgres)


async def test_no_acknowledged_write_is_lost_or_duplicated(fault_gateway: Any, fault_stack: LocalStack) -> None:
    await admin_query(fault_stack, "DELETE FROM events WHERE event_type = 'chaos'")
    acked: list[tuple[str, int]] = []
    async with fault_gateway(database={"pool_min_size": 2, "pool_max_size": 8}) as api:
        writers = [_writer(api.base, t, w, acked) for t in TENANTS for w in range(WRITERS_PER_TENANT)]
        _, *retried = await asyncio.gather(_chaos(fault_stack), *writers)
    assert sum(retried) > 0, "the faults never hit a write: the test proved nothing"
    assert len(acked) == len(TENANTS) * WRITERS_PER_TENANT * WRITES_PER_WRITER  # every write was acknowledged
    rows = await admin_query(fault_stack, "SELECT tenant_id::text AS tenant, (data->>'n')::int AS n "
                                          "FROM events WHERE event_type = 'chaos'")
    stored = sorted((r["tenant"], r["n"]) for r in rows)
    assert len(stored) == len(set(stored)), "a write was stored twice"
    assert stored == sorted(acked), "stored writes differ from acknowledged ones"
    await assert_no_transaction_left_open(fault_stack)
