"""Read replicas and tenant placement across clusters, on real streaming replication."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from proxy.devstack import LocalStack
from proxy.routing import REPLICA_RETRY_S

from ..fix_gateway import KEY_A, KEY_ANY, TENANT_A, TENANT_C, Api


async def _in_recovery(api: Api, **options: Any) -> bool:
    r = await api.query("SELECT pg_is_in_recovery() AS r", **options)
    assert r.status == 200, r.body
    return bool(r.body["rows"][0]["r"])


async def test_reads_go_to_the_replica_and_writes_to_the_primary(scaled_gateway: Any, replica: LocalStack) -> None:
    async with scaled_gateway(database={"replicas": [replica.gateway_dsn]}) as api:
        assert await _in_recovery(api, read_only=True) is True
        assert await _in_recovery(api) is False
        assert await _in_recovery(api, read_only=True, consistency="primary") is False
        marker = f"repl-{uuid.uuid4()}"
        w = await api.query("INSERT INTO events (event_type, data) VALUES ($1, '{}') RETURNING tenant_id", marker)
        assert w.status == 200 and w.body["rows"] == [{"tenant_id": TENANT_A}]
        seen = 0
        for _ in range(50):  # replay is asynchronous
            r = await api.query("SELECT count(*) AS n FROM events WHERE event_type = $1", marker, read_only=True)
            seen = r.body["rows"][0]["n"]
            if seen:
                break
            await asyncio.sleep(0.1)
        assert seen == 1
        # the replica is RLS-confined exactly like the primary
        r = await api.query("SELECT DISTINCT tenant_id FROM events", read_only=True)
        assert r.body["rows"] in ([], [{"tenant_id": TENANT_A}])
        text = (await api.request("GET", "/metrics", key=None, admin=True)).body
        assert 'tenant_proxy_pool_max{pool="primary/replica-0"} 4.0' in text
        assert 'tenant_proxy_pool_max{pool="primary"} 4.0' in text


async def test_replica_failure_falls_back_to_the_primary(scaled_gateway: Any, replica: LocalStack) -> None:
    async with scaled_gateway(database={"replicas": [replica.gateway_dsn], "connect_timeout_ms": 500}) as api:
        assert await _in_recovery(api, read_only=True) is True
        replica.stop_bouncer()
        try:
            for _ in range(3):  # no error reaches the client: reads move to the primary
                assert await _in_recovery(api, read_only=True) is False
        finally:
            replica.start_bouncer()
        back = False
        for _ in range(int(REPLICA_RETRY_S * 4)):
            await asyncio.sleep(0.5)
            if await _in_recovery(api, read_only=True):
                back = True
                break
        assert back, "the replica was not put back in rotation"


async def test_tenants_go_to_their_cluster(scaled_gateway: Any, primary: LocalStack,
                                           second_cluster: LocalStack) -> None:
    overrides = {"clusters": {"eu": {"dsn": second_cluster.gateway_dsn}},
                 "tenants": {TENANT_C: {"cluster": "eu"}}}
    marker = f"placed-{uuid.uuid4()}"
    async with scaled_gateway(**overrides) as api:
        for key, tenant in ((KEY_A, None), (KEY_ANY, TENANT_C)):
            r = await api.query("INSERT INTO events (event_type, data) VALUES ($1, '{}')", marker, key=key,
                                tenant=tenant)
            assert r.status == 200, r.body
        r = await api.query("SELECT tenant_id FROM events WHERE event_type = $1", marker, key=KEY_ANY, tenant=TENANT_C)
        assert r.body["rows"] == [{"tenant_id": TENANT_C}]
        pools = (await api.request("GET", "/admin/pool", key=None, admin=True)).body["pools"]
        assert {p["pool"] for p in pools} == {"primary", "eu"}
    for stack, tenant in ((primary, TENANT_A), (second_cluster, TENANT_C)):
        conn = await asyncpg.connect(stack.admin_dsn)
        try:
            rows = await conn.fetch("SELECT tenant_id::text AS t FROM events WHERE event_type = $1", marker)
        finally:
            await conn.close()
        assert [r["t"] for r in rows] == [tenant]
