"""A retry that arrives while the first request with the same key still runs gets 409."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from proxy.tools.devstack import LocalStack

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


async def test_concurrent_senders_of_one_key_run_it_once(fault_gateway: Any, fault_stack: LocalStack) -> None:
    """Many callers race with the same key, retrying on 409: one execution per key, and
    every caller gets that execution's answer.  (A request whose statement began just
    before the first one committed used to see no row, take the lock, and run again.)"""
    keys, senders = 300, 12
    prefix = f"race-{uuid.uuid4().hex[:8]}"

    async with fault_gateway() as api:
        async def send(key: str) -> Any:
            body = {"sql": "INSERT INTO events (event_type, data) VALUES ($1, '{}') RETURNING id", "params": [key]}
            for _ in range(200):
                r = await api.request("POST", "/v1/query", json=body, headers={"Idempotency-Key": key})
                if r.status == 409 and r.code == "idempotency_in_progress":
                    await asyncio.sleep(0.01)
                    continue
                assert r.status == 200, r.body
                return r.body["rows"]
            raise AssertionError("never answered")

        answers = await asyncio.gather(*(send(f"{prefix}-{k}") for k in range(keys) for _ in range(senders)))
    for k in range(keys):
        mine = answers[k * senders:(k + 1) * senders]
        assert all(a == mine[0] for a in mine), f"key {k}: callers got different answers"
    rows = await admin_query(fault_stack, "SELECT event_type, count(*) AS n FROM events WHERE event_type LIKE $1 "
                             "GROUP BY event_type HAVING count(*) > 1", prefix + "-%")
    assert rows == [], f"keys that ran more than once: {rows}"
