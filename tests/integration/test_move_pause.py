"""While `tenant-proxy move` has a tenant paused: reads are answered, a write is held until
the pause ends and then runs where the tenant is now, and only a pause longer than
`server.write_hold_s` answers 503 tenant_moving."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg

from ..fix_gateway import TENANT_A, Api


async def _moving(api: Api, value: bool) -> None:
    r = await api.request("PUT", f"/admin/tenants/{TENANT_A}/limits", admin=True, key=None, json={"moving": value})
    assert r.status == 200 and r.body["limits"]["moving"] is value, r.body


async def _count(admin_db: asyncpg.Connection, marker: str) -> int:
    return int(await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = $1", marker))


async def test_a_write_is_held_through_a_short_pause(gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    marker = f"held-{uuid.uuid4()}"
    async with gateway_with(server={"write_hold_s": 2}) as api:
        await _moving(api, True)
        try:
            r = await api.query("SELECT count(*) AS n FROM events")  # not marked read_only: answered
            assert r.status == 200
            started = time.monotonic()
            write = asyncio.create_task(api.query(
                "WITH w AS (INSERT INTO events (event_type, data) VALUES ($1, '{}') RETURNING 1) SELECT count(*) "
                "AS n FROM w", marker))
            await asyncio.sleep(0.4)
            assert not write.done() and await _count(admin_db, marker) == 0
        finally:
            await _moving(api, False)
        r = await write
        assert r.status == 200 and r.body["rows"] == [{"n": 1}], r.body
        assert time.monotonic() - started >= 0.4
        assert await _count(admin_db, marker) == 1


async def test_a_pause_longer_than_the_hold_is_a_503(gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    marker = f"refused-{uuid.uuid4()}"
    async with gateway_with(server={"write_hold_s": 0.3}) as api:
        await _moving(api, True)
        try:
            started = time.monotonic()
            r = await api.query("INSERT INTO events (event_type, data) VALUES ($1, '{}')", marker)
            waited = time.monotonic() - started
        finally:
            await _moving(api, False)
        assert (r.status, r.code) == (503, "tenant_moving") and r.headers["Retry-After"] == "1", r.body
        assert 0.3 <= waited < 1.5
        assert await _count(admin_db, marker) == 0
