"""A retry that arrives while the first request with the same key still runs gets 409."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from proxy.devstack import LocalStack

from ..fix_gateway import Api
from .conftest import admin_query


def _insert(marker: str) -> dict[str, Any]:
    return {"sql": "INSERT INTO events (event_type, data) VALUES ($1, '{}') RETURNING event_type",
            "params": [marker]}


async def test_retry_while_running_is_409(fault_gateway: Any, fault_stack: LocalStack) -> None:
    """Needs two backends (the main test stack's PgBouncer has one, which would queue the retry)."""
    marker, key = f"idem-{uuid.uuid4()}", uuid.uuid4().hex
    body = {"statements": [_insert(marker), {"sql": "SELECT pg_sleep(0.8)"}]}
    async with fault_gateway() as api:
        await _running_twice(api, body, key)
    rows = await admin_query(fault_stack, "SELECT count(*) AS n FROM events WHERE event_type = $1", marker)
    assert rows[0]["n"] == 1


async def _running_twice(api: Api, body: dict[str, Any], key: str) -> None:
    first = asyncio.create_task(api.request("POST", "/v1/transaction", json=body, headers={"Idempotency-Key": key}))
    await asyncio.sleep(0.3)
    r = await api.request("POST", "/v1/transaction", json=body, headers={"Idempotency-Key": key})
    assert r.status == 409 and r.code == "idempotency_in_progress" and r.headers["Retry-After"] == "1"
    assert r.body["error"]["retryable"] is True
    assert (await first).status == 200
    replay = await api.request("POST", "/v1/transaction", json=body, headers={"Idempotency-Key": key})
    assert replay.headers["Idempotent-Replayed"] == "true"
