"""Read replicas and tenant placement across clusters, on real streaming replication."""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from typing import Any

import asyncpg

from proxy.pg.routing import REPLICA_RETRY_S
from proxy.tools.devstack import LocalStack

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


async def _hang_up_mid_stream(api: Api, sql: str, **options: Any) -> bytes:
    """POST a streaming read, take the first body bytes, then reset the connection (RST)."""
    reader, writer = await api.open_raw_query({"sql": sql, **options})
    head = await reader.readuntil(b"\r\n\r\n")
    first = await reader.read(4096)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return head + first


async def test_a_client_hanging_up_mid_stream_does_not_take_the_replica_out(scaled_gateway: Any,
                                                                            replica: LocalStack) -> None:
    overrides = {"database": {"replicas": [replica.gateway_dsn]},
                 "server": {"stream_threshold_rows": 10, "stream_batch_rows": 50},
                 "tenants": {TENANT_A: {"max_rows": 10_000_000, "max_response_bytes": 1 << 40}}}
    async with scaled_gateway(**overrides) as api:
        assert await _in_recovery(api, read_only=True) is True
        sql = "SELECT g, repeat('x', 2000) AS pad FROM generate_series(1, 2000000) g"
        for _ in range(5):
            got = await _hang_up_mid_stream(api, sql, read_only=True)
            assert got.startswith(b"HTTP/1.1 200") and b"chunked" in got.lower()
            await asyncio.sleep(0.3)  # the gateway notices, rolls back, hands the connection back
            # a hang-up is not a database failure: reads stay on the replica
            assert await _in_recovery(api, read_only=True) is True
        text = (await api.request("GET", "/metrics", key=None, admin=True)).body
        assert 'code="499"' in text
        assert 'code="503"' not in text
        # every connection went back to the pool, none is left in its transaction
        for _ in range(20):
            r = await api.query("SELECT count(*) AS n FROM generate_series(1, 3)", read_only=True)
            assert r.status == 200 and r.body["rows"] == [{"n": 3}]
