"""proxy.client against the real gateway: results, typed errors, retries with Retry-After,
idempotency keys on retried writes, and the blocking wrapper."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import pytest

from proxy import client as pc

from ..fix_gateway import KEY_A, KEY_ANY, KEY_B, TENANT_A, TENANT_B, Api


async def test_query_transaction_and_typed_errors(api: Api) -> None:
    async with pc.AsyncClient(api.base, KEY_A) as c:
        r = await c.query("SELECT $1::int + 1 AS n", 41)
        assert r.rows == [{"n": 42}] and r.command == "SELECT" and r.row_count == 1
        results = await c.transaction(["SELECT 1 AS a", ("SELECT $1::text AS b", ["x"])], read_only=True)
        assert [res.rows for res in results] == [[{"a": 1}], [{"b": "x"}]]
        with pytest.raises(pc.StatementRejected) as info:
            await c.query("SET app.tenant_id = 'x'")
        assert info.value.status == 400 and not info.value.retryable and info.value.request_id
        with pytest.raises(pc.SqlError) as sql_info:
            await c.query("SELECT * FROM nowhere")
        assert sql_info.value.sqlstate == "42P01"
        with pytest.raises(pc.ERRORS["tenant_forbidden"]):
            await c.query("SELECT 1", tenant=TENANT_B)
    async with pc.AsyncClient(api.base, "wrong") as bad:
        with pytest.raises(pc.Unauthenticated):
            await bad.query("SELECT 1")
    async with pc.AsyncClient(api.base, KEY_ANY, tenant=TENANT_B) as c:
        assert (await c.query("SELECT current_setting('app.tenant_id') AS t")).rows == [{"t": TENANT_B}]


async def test_retries_honour_retry_after(gateway_with: Any) -> None:
    async with gateway_with(tenants={TENANT_A: {"rate_per_s": 1, "burst": 1}}) as api:
        async with pc.AsyncClient(api.base, KEY_A, retries=3, backoff_s=0.01) as c:
            await c.query("SELECT 1", read_only=True)
            started = time.monotonic()
            await c.query("SELECT 1", read_only=True)  # 429 first, then a retry after Retry-After
            assert time.monotonic() - started >= 0.9 and c.retried == 1
        async with pc.AsyncClient(api.base, KEY_A, retries=0) as c:
            with pytest.raises(pc.RateLimited) as info:
                await c.query("SELECT 1", read_only=True)
            assert info.value.retryable and info.value.retry_after_s is not None


async def test_retried_write_runs_once(gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    """A write whose first attempt is rate-limited and whose retry meets a replayed answer
    still runs once: the client sends one Idempotency-Key for all attempts."""
    marker = f"client-{uuid.uuid4()}"
    limits = {TENANT_A: {"max_concurrency": 1, "queue_timeout_ms": 50}}
    async with gateway_with(tenants=limits) as api, pc.AsyncClient(api.base, KEY_A, retries=20, backoff_s=0.05) as c:
        slow = asyncio.create_task(c.query("SELECT pg_sleep(0.4)"))
        await asyncio.sleep(0.1)
        await c.query("INSERT INTO events (event_type, data) VALUES ($1, '{}')", marker)  # 503, then retried
        await slow
        assert c.retried >= 1
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = $1", marker) == 1
    assert await admin_db.fetchval("SELECT count(*) FROM idempotency_keys WHERE tenant_id = $1 AND "
                                   "response IS NOT NULL AND created_at > now() - interval '1 minute'",
                                   TENANT_A) >= 1


async def test_blocking_client(api: Api) -> None:
    def blocking() -> None:  # in a thread: the gateway's event loop keeps running meanwhile
        with pc.Client(api.base, KEY_B) as c:
            assert c.query("SELECT 2 AS two").rows == [{"two": 2}]
            commands = [r.command for r in c.transaction(["SELECT 1", "SELECT 2"], read_only=True)]
            assert commands == ["SELECT", "SELECT"]
            with pytest.raises(pc.StatementRejected):
                c.query("COMMIT")

    await asyncio.get_running_loop().run_in_executor(None, blocking)
