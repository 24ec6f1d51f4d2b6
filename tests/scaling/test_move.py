"""`tenant-proxy move`: a tenant moves to another cluster while a client keeps writing to it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from proxy.client import AsyncClient
from proxy.tools.devstack import LocalStack
from proxy.tools.move import move_tenant
from proxy.tools.tenant_data import LifecycleError

from ..fix_gateway import KEY_A, KEY_ANY, TENANT_A
from .conftest import rows


async def test_move_while_writing(scaled_gateway: Any, primary: LocalStack, second_cluster: LocalStack) -> None:
    mover = str(uuid.uuid4())
    marker = f"move-{uuid.uuid4()}"
    # write_hold_s 0: the offline pause answers writes with 503 at once, which the client retries
    overrides = {"clusters": {"eu": {"dsn": second_cluster.gateway_dsn}}, "server": {"write_hold_s": 0}}
    acked: list[int] = []
    stop = asyncio.Event()
    async with scaled_gateway(**overrides) as api:
        admin_url = f"http://127.0.0.1:{api.running.admin_port}"
        settings = api.running.gateway.runtime.settings
        a = await api.query("INSERT INTO events (event_type, data) VALUES ($1, '{}')", marker, key=KEY_A)
        assert a.status == 200

        async def writer() -> int:
            async with AsyncClient(api.base, KEY_ANY, tenant=mover, retries=100, backoff_s=0.05,
                                   max_backoff_s=0.3) as client:
                n = 0
                while not stop.is_set() or n < 30:
                    await client.query("INSERT INTO events (event_type, data) "
                                       "VALUES ($1, jsonb_build_object('n', $2::int))", marker, n)
                    acked.append(n)
                    n += 1
                    await asyncio.sleep(0.01)
                return client.retried

        task = asyncio.create_task(writer())
        await asyncio.sleep(0.5)
        moved = await move_tenant(settings, mover, "eu", admin_url, say=lambda _: None, offline=True)
        assert moved.rows["public.events"] >= 1
        await asyncio.sleep(0.3)  # writes go on, now on the new cluster
        stop.set()
        retried = await task
        assert retried > 0, "no write met the pause: the test proved nothing"
        r = await api.query("SELECT count(*) AS n FROM events WHERE event_type = $1", marker, key=KEY_ANY,
                            tenant=mover)
        assert r.body["rows"] == [{"n": len(acked)}]  # reads now come from the new cluster
    target = await rows(second_cluster, "SELECT (data->>'n')::int AS n FROM events WHERE tenant_id = $1", mover)
    assert sorted(r["n"] for r in target) == sorted(acked)  # every acknowledged write, exactly once
    assert await rows(primary, "SELECT 1 FROM events WHERE tenant_id = $1", mover) == []
    assert await rows(primary, "SELECT 1 FROM idempotency_keys WHERE tenant_id = $1", mover) == []
    others = await rows(primary, "SELECT tenant_id::text AS t FROM events WHERE event_type = $1", marker)
    assert [r["t"] for r in others] == [TENANT_A]  # nobody else moved
    assert await rows(second_cluster, "SELECT 1 FROM events WHERE tenant_id = $1", TENANT_A) == []


async def test_move_refuses_bad_targets_and_leaves_the_tenant_serving(scaled_gateway: Any,
                                                                      second_cluster: LocalStack) -> None:
    async with scaled_gateway(clusters={"eu": {"dsn": second_cluster.gateway_dsn}}) as api:
        admin_url = f"http://127.0.0.1:{api.running.admin_port}"
        settings = api.running.gateway.runtime.settings
        with pytest.raises(LifecycleError, match="no such cluster"):
            await move_tenant(settings, TENANT_A, "mars", admin_url, offline=True)
        with pytest.raises(LifecycleError, match="already on cluster default"):
            await move_tenant(settings, TENANT_A, "default", admin_url, offline=True)
        assert (await api.query("INSERT INTO events (event_type, data) VALUES ('after', '{}')")).status == 200
        with pytest.raises(LifecycleError, match="cannot reach"):
            await move_tenant(settings, TENANT_A, "eu", "http://127.0.0.1:1", offline=True)
