"""Idempotency-Key: a write runs at most once per (tenant, key); retries get the original answer."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from ..fix_gateway import KEY_B, TENANT_A, Api


def _insert(marker: str) -> dict[str, Any]:
    return {"sql": "INSERT INTO events (event_type, data) VALUES ($1, '{}') RETURNING event_type",
            "params": [marker]}


async def _count(admin_db: asyncpg.Connection, marker: str) -> int:
    return int(await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = $1", marker))


async def test_retry_replays_without_running_again(api: Api, admin_db: asyncpg.Connection) -> None:
    marker, key = f"idem-{uuid.uuid4()}", uuid.uuid4().hex
    first = await api.request("POST", "/v1/query", json=_insert(marker), headers={"Idempotency-Key": key})
    assert first.status == 200 and "Idempotent-Replayed" not in first.headers
    again = await api.request("POST", "/v1/query", json=_insert(marker), headers={"Idempotency-Key": key})
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.body == first.body
    assert await _count(admin_db, marker) == 1
    # the same key is a different key for another tenant
    other = await api.request("POST", "/v1/query", json=_insert(marker), key=KEY_B, headers={"Idempotency-Key": key})
    assert other.status == 200 and "Idempotent-Replayed" not in other.headers
    assert await _count(admin_db, marker) == 2


async def test_same_key_different_body_is_refused(api: Api, admin_db: asyncpg.Connection) -> None:
    marker, key = f"idem-{uuid.uuid4()}", uuid.uuid4().hex
    first = await api.request("POST", "/v1/query", json=_insert(marker), headers={"Idempotency-Key": key})
    assert first.status == 200
    r = await api.request("POST", "/v1/query", json=_insert(marker + "-x"), headers={"Idempotency-Key": key})
    assert r.status == 422 and r.code == "idempotency_key_reused"
    assert await _count(admin_db, marker + "-x") == 0


async def test_failed_request_records_nothing(api: Api, admin_db: asyncpg.Connection) -> None:
    marker, key = f"idem-{uuid.uuid4()}", uuid.uuid4().hex
    body = {"statements": [_insert(marker), {"sql": "SELECT 1/0"}]}
    r = await api.request("POST", "/v1/transaction", json=body, headers={"Idempotency-Key": key})
    assert r.status == 422
    fixed = {"statements": [_insert(marker)]}
    r = await api.request("POST", "/v1/transaction", json=fixed, headers={"Idempotency-Key": key})
    assert r.status == 200 and "Idempotent-Replayed" not in r.headers
    assert await _count(admin_db, marker) == 1


async def test_bad_keys_and_reads(api: Api) -> None:
    r = await api.request("POST", "/v1/query", json={"sql": "SELECT 1"}, headers={"Idempotency-Key": "x" * 300})
    assert r.status == 400 and r.code == "invalid_request"
    # read-only requests ignore the key (a READ ONLY transaction could not store it)
    for _ in range(2):
        r = await api.request("POST", "/v1/query", json={"sql": "SELECT 1 AS one", "read_only": True},
                              headers={"Idempotency-Key": "read-key"})
        assert r.status == 200 and "Idempotent-Replayed" not in r.headers


async def test_expired_keys_are_purged_and_reusable(gateway_with: Any, admin_db: asyncpg.Connection) -> None:
    async with gateway_with(idempotency={"retention_s": 1, "purge_interval_s": 3600}) as api:
        marker, key = f"idem-{uuid.uuid4()}", uuid.uuid4().hex
        assert (await api.request("POST", "/v1/query", json=_insert(marker),
                                  headers={"Idempotency-Key": key})).status == 200
        await asyncio.sleep(1.2)
        # expired: the same key runs again instead of replaying
        r = await api.request("POST", "/v1/query", json=_insert(marker), headers={"Idempotency-Key": key})
        assert r.status == 200 and "Idempotent-Replayed" not in r.headers
        assert await _count(admin_db, marker) == 2
        await asyncio.sleep(1.2)
        deleted = await api.running.gateway.purge_idempotency_keys()
        assert deleted >= 1
        left = await admin_db.fetchval("SELECT count(*) FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
                                       TENANT_A, key)
        assert left == 0
