"""Tenant A never sees or writes tenant B's rows, even on the same PostgreSQL backend."""

from __future__ import annotations

import uuid

import asyncpg

from ..fix_gateway import KEY_A, KEY_AC, KEY_ANY, KEY_B, SEED, TENANT_A, TENANT_B, TENANT_C, Api


async def _types(api: Api, key: str, tenant: str | None = None) -> list[str]:
    r = await api.query("SELECT event_type, tenant_id FROM events WHERE event_type LIKE '_-_' ORDER BY 1",
                        key=key, tenant=tenant)
    assert r.status == 200, r.body
    return [row["event_type"] for row in r.body["rows"]]


async def test_both_tenants_share_one_backend(api: Api) -> None:
    a = await api.query("SELECT pg_backend_pid() AS pid", key=KEY_A)
    b = await api.query("SELECT pg_backend_pid() AS pid", key=KEY_B)
    assert a.body["rows"][0]["pid"] == b.body["rows"][0]["pid"]


async def test_each_tenant_reads_only_its_rows(api: Api) -> None:
    for _ in range(3):  # interleaved on the one shared backend
        assert await _types(api, KEY_A) == SEED[TENANT_A]
        assert await _types(api, KEY_B) == SEED[TENANT_B]
    r = await api.query("SELECT DISTINCT tenant_id FROM events", key=KEY_A)
    assert r.body["rows"] == [{"tenant_id": TENANT_A}]


async def test_no_filter_needed_and_counts_are_confined(api: Api) -> None:
    r = await api.query("SELECT count(*) AS n FROM events WHERE event_type LIKE '_-_'", key=KEY_B)
    assert r.body["rows"] == [{"n": len(SEED[TENANT_B])}]


async def test_cannot_insert_a_row_for_another_tenant(api: Api, admin_db: asyncpg.Connection) -> None:
    marker = f"forged-{uuid.uuid4()}"
    r = await api.query("INSERT INTO events (tenant_id, event_type, data) VALUES ($1, $2, '{}')",
                        TENANT_B, marker, key=KEY_A)
    assert r.status == 403 and r.code == "rls_violation"
    assert r.body["error"]["sqlstate"] == "42501"
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = $1", marker) == 0


async def test_insert_defaults_to_the_callers_tenant(api: Api, admin_db: asyncpg.Connection) -> None:
    marker = f"own-{uuid.uuid4()}"
    r = await api.query("INSERT INTO events (event_type, data) VALUES ($1, '{}') RETURNING tenant_id",
                        marker, key=KEY_A)
    assert r.status == 200, r.body
    assert r.body["rows"] == [{"tenant_id": TENANT_A}]
    assert r.body["command"] == "INSERT" and r.body["row_count"] == 1
    assert await admin_db.fetchval("SELECT tenant_id::text FROM events WHERE event_type = $1", marker) == TENANT_A


async def test_cannot_move_own_row_to_another_tenant(api: Api, admin_db: asyncpg.Connection) -> None:
    marker = f"move-{uuid.uuid4()}"
    await api.query("INSERT INTO events (event_type, data) VALUES ($1, '{}')", marker, key=KEY_A)
    r = await api.query("UPDATE events SET tenant_id = $1 WHERE event_type = $2", TENANT_B, marker, key=KEY_A)
    assert r.status == 403 and r.code == "rls_violation"
    assert await admin_db.fetchval("SELECT tenant_id::text FROM events WHERE event_type = $1", marker) == TENANT_A


async def test_update_and_delete_touch_only_own_rows(api: Api, admin_db: asyncpg.Connection) -> None:
    before_b = await admin_db.fetch("SELECT id, metadata FROM events WHERE tenant_id = $1 ORDER BY id", TENANT_B)
    r = await api.query("UPDATE events SET metadata = '{\"touched\": true}' WHERE event_type LIKE 'b-%'",
                        key=KEY_A)
    assert r.status == 200 and r.body["command"] == "UPDATE" and r.body["row_count"] == 0
    r = await api.query("DELETE FROM events WHERE tenant_id = $1", TENANT_B, key=KEY_A)
    assert r.status == 200 and r.body["command"] == "DELETE" and r.body["row_count"] == 0
    after_b = await admin_db.fetch("SELECT id, metadata FROM events WHERE tenant_id = $1 ORDER BY id", TENANT_B)
    assert before_b == after_b


async def test_bound_key_cannot_pick_another_tenant(api: Api) -> None:
    r = await api.query("SELECT 1", key=KEY_A, tenant=TENANT_B)
    assert r.status == 403 and r.code == "tenant_forbidden"
    r = await api.query("SELECT 1", key=KEY_A, tenant=TENANT_A.upper())  # its own id, any spelling
    assert r.status == 200


async def test_wildcard_key_must_name_a_tenant(api: Api) -> None:
    r = await api.query("SELECT 1", key=KEY_ANY)
    assert r.status == 400 and r.code == "tenant_required"
    assert await _types(api, KEY_ANY, TENANT_B) == SEED[TENANT_B]


async def test_key_for_a_list_of_tenants(api: Api) -> None:
    r = await api.query("SELECT 1", key=KEY_AC)
    assert r.code == "tenant_required"
    assert (await api.query("SELECT 1", key=KEY_AC, tenant=TENANT_B)).code == "tenant_forbidden"
    assert await _types(api, KEY_AC, TENANT_A) == SEED[TENANT_A]
    assert await _types(api, KEY_AC, TENANT_C) == []


async def test_unset_tenant_setting_matches_nothing(admin_db: asyncpg.Connection, stack: object) -> None:
    """Fail closed: the gateway role with no tenant set sees no rows at all."""
    from ..fix_stack import Stack

    assert isinstance(stack, Stack)
    conn = await asyncpg.connect(stack.gateway_dsn, statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT count(*) FROM events") == 0
    finally:
        await conn.close()
