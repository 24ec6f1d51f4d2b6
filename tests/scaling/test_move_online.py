"""The online move (issue 20): logical replication copies a tenant of 400,000 rows while a
client writes to it every 10 ms and another reads; the writes wait under a second."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from proxy.__main__ import main
from proxy.client import AsyncClient
from proxy.control.schema import SCHEMA
from proxy.tools.devstack import LocalStack
from proxy.tools.move import move_tenant
from proxy.tools.replication import object_name

from ..fix_gateway import KEY_ANY, TENANT_A, Api, base_config, make_settings, merge, running_gateway
from ..fix_stack import stack_of, temporary_stack
from .conftest import rows
from .test_fleet import _all, fleet, within

# A tenant table with a sequence, as a schema of the operator's may have one: the move
# sets the target's sequence past the source's.
TICKETS = """
CREATE TABLE IF NOT EXISTS public.tickets (
  tenant_id uuid NOT NULL DEFAULT public.current_tenant_id(),
  id bigserial,
  body text,
  PRIMARY KEY (tenant_id, id));
ALTER TABLE public.tickets OWNER TO app_owner;
ALTER TABLE public.tickets ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.tickets FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON public.tickets;
CREATE POLICY tenant_isolation ON public.tickets USING (tenant_id = public.current_tenant_id())
  WITH CHECK (tenant_id = public.current_tenant_id());
GRANT SELECT, INSERT, UPDATE, DELETE ON public.tickets TO app;
GRANT USAGE ON SEQUENCE public.tickets_id_seq TO app;
"""


async def _admin(stack: LocalStack, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(stack.admin_dsn)
    try:
        return await conn.execute(sql, *args)
    finally:
        await conn.close()


def _overrides(source: LocalStack, target: LocalStack) -> dict[str, Any]:
    return {"database": {"admin_dsn": source.admin_dsn},
            "clusters": {"eu": {"dsn": target.gateway_dsn, "admin_dsn": target.admin_dsn}}}


async def _leftovers(source: LocalStack, target: LocalStack, tenant: str) -> list[Any]:
    name = object_name(tenant)
    return [*await rows(source, "SELECT pubname FROM pg_publication WHERE pubname = $1", name),
            *await rows(source, "SELECT slot_name FROM pg_replication_slots"),  # the copy's own slots too
            *await rows(target, "SELECT subname FROM pg_subscription WHERE subname = $1", name)]


async def _seed(source: LocalStack, target: LocalStack, mover: str) -> None:
    for stack in (source, target):
        await _admin(stack, TICKETS)
    await _admin(source, "INSERT INTO events (tenant_id, event_type, data) "
                         "SELECT $1, 'bulk', jsonb_build_object('g', g) FROM generate_series(1, 400000) g", mover)
    await _admin(source, "INSERT INTO tickets (tenant_id, body) SELECT $1, 'old' FROM generate_series(1, 500)",
                 mover)
    await _admin(source, "INSERT INTO events (tenant_id, event_type, data) VALUES ($1, 'stays', '{}')", TENANT_A)


async def _move_under_load(apis: list[Api], config: Path, mover: str) -> tuple[str, list[tuple[float, int]]]:
    """Move ``mover`` with the CLI while a client writes every 10 ms (with Idempotency-Keys,
    through each instance in turn) and another reads; the CLI's output and the writes
    acknowledged, with when."""
    acked: list[tuple[float, int]] = []
    reads: list[int] = []
    stop = asyncio.Event()

    async def writer() -> None:
        clients = [AsyncClient(api.base, KEY_ANY, tenant=mover, retries=200, backoff_s=0.02, max_backoff_s=0.05)
                   for api in apis]
        try:
            n = 0
            while not stop.is_set():
                await clients[n % len(clients)].query(
                    "INSERT INTO events (event_type, data) VALUES ('live', jsonb_build_object('n', $1::int))", n)
                acked.append((time.monotonic(), n))
                n += 1
                await asyncio.sleep(0.01)
        finally:
            for c in clients:
                await c.close()

    async def reader() -> None:
        i = 0
        while not stop.is_set():
            r = await apis[i % len(apis)].query("SELECT count(*) AS n FROM events WHERE event_type = 'live'",
                                                key=KEY_ANY, tenant=mover)
            reads.append(r.status)
            i += 1
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
    await asyncio.sleep(0.3)
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return main(["move", "--config", str(config), "--tenant", mover, "--to", "eu"])
    code = await asyncio.to_thread(run)
    await asyncio.sleep(0.3)  # writes go on, now on the new cluster
    stop.set()
    await asyncio.gather(*tasks)
    text = out.getvalue()
    assert code == 0, text
    assert set(reads) == {200}, f"reads met {sorted(set(reads))} during the move"
    r = await apis[0].query("INSERT INTO tickets (body) VALUES ('new') RETURNING id", key=KEY_ANY, tenant=mover)
    assert r.status == 200 and r.body["rows"][0]["id"] > 500, r.body  # the sequence went past the source's
    return text, acked


async def _assert_moved(source: LocalStack, target: LocalStack, mover: str, text: str,
                        acked: list[tuple[float, int]]) -> None:
    paused_ms = int(text.split("writes paused ")[-1].split(" ms")[0])
    assert paused_ms < 1000, text
    times = [t for t, _ in acked]
    gap = max(b - a for a, b in itertools.pairwise(times))
    assert gap < 1.0, f"the writer waited {gap:.2f} s between two acknowledged writes\n{text}"
    live = await rows(target, "SELECT (data->>'n')::int AS n FROM events WHERE tenant_id = $1 AND event_type = 'live'",
                      mover)
    assert sorted(r["n"] for r in live) == [n for _, n in acked]  # every acknowledged write, exactly once
    counts = await rows(target, "SELECT (SELECT count(*) FROM events WHERE tenant_id = $1 AND event_type = 'bulk') "
                                "AS bulk, (SELECT count(*) FROM tickets WHERE tenant_id = $1) AS tickets", mover)
    assert dict(counts[0]) == {"bulk": 400000, "tickets": 501}
    for table in ("events", "tickets", "idempotency_keys"):
        assert await rows(source, f"SELECT 1 FROM {table} WHERE tenant_id = $1 LIMIT 1", mover) == [], table
    assert await rows(source, "SELECT 1 FROM events WHERE tenant_id = $1 AND event_type = 'stays'", TENANT_A)
    assert await rows(target, "SELECT 1 FROM events WHERE tenant_id = $1", TENANT_A) == []  # nobody else moved
    assert await _leftovers(source, target, mover) == []


async def test_online_move_of_400k_rows_pauses_writes_under_a_second(
        tmp_path: Path, logical: LocalStack, second_cluster: LocalStack) -> None:
    mover = str(uuid.uuid4())
    await _seed(logical, second_cluster, mover)
    raw = merge(base_config(stack_of(logical)), _overrides(logical, second_cluster))
    async with running_gateway(make_settings(stack_of(logical), **_overrides(logical, second_cluster))) as api:
        raw["server"] = {**raw.get("server", {}), "admin_port": api.running.admin_port}
        config = tmp_path / "move.yaml"
        config.write_text(yaml.safe_dump(raw))
        text, acked = await _move_under_load([api], config, mover)
    await _assert_moved(logical, second_cluster, mover, text, acked)


async def test_online_move_through_the_fleet_catalog(tmp_path: Path, logical: LocalStack,
                                                     second_cluster: LocalStack) -> None:
    mover = str(uuid.uuid4())
    await _seed(logical, second_cluster, mover)
    async with fleet(logical, tmp_path, overrides=_overrides(logical, second_cluster)) as f:
        assert (await f.cli("tenants", "add", "--config", str(f.config), "--tenant", mover))[0] == 0
        await within(1.0)(lambda: _all(f.statuses(key=KEY_ANY, tenant=mover), 200))
        text, acked = await _move_under_load(f.apis, f.config, mover)
        row = (await f.catalog(f"SELECT cluster, state FROM {SCHEMA}.tenants WHERE id = $1", mover))[0]
        assert (row["cluster"], row["state"]) == ("eu", "active")
    await _assert_moved(logical, second_cluster, mover, text, acked)


async def test_an_interrupted_online_move_leaves_nothing_behind(logical: LocalStack,
                                                                second_cluster: LocalStack) -> None:
    mover = str(uuid.uuid4())
    await _admin(logical, "INSERT INTO events (tenant_id, event_type, data) "
                          "SELECT $1, 'bulk', '{}' FROM generate_series(1, 200000) g", mover)
    async with running_gateway(make_settings(stack_of(logical), **_overrides(logical, second_cluster))) as api:
        settings = api.running.gateway.runtime.settings
        admin_url = f"http://127.0.0.1:{api.running.admin_port}"
        move = asyncio.create_task(move_tenant(settings, mover, "eu", admin_url, say=lambda _: None))
        deadline = time.monotonic() + 30
        while not await rows(second_cluster, "SELECT 1 FROM pg_subscription WHERE subname = $1",
                             object_name(mover)):
            assert time.monotonic() < deadline and not move.done(), move
            await asyncio.sleep(0.02)
        move.cancel()  # Ctrl-C during the copy
        with pytest.raises(asyncio.CancelledError):
            await move
        assert await _leftovers(logical, second_cluster, mover) == []
        assert await rows(second_cluster, "SELECT 1 FROM events WHERE tenant_id = $1 LIMIT 1", mover) == []
        r = await api.query("INSERT INTO events (event_type, data) VALUES ('after', '{}')", key=KEY_ANY,
                            tenant=mover)
        assert r.status == 200  # still served, and writable, on its source
        r = await api.query("SELECT count(*) AS n FROM events", key=KEY_ANY, tenant=mover)
        assert r.body["rows"] == [{"n": 200001}]
    r2 = await rows(logical, "SELECT count(*) AS n FROM events WHERE tenant_id = $1", mover)
    assert r2[0]["n"] == 200001


async def test_a_target_dying_mid_copy_leaves_no_slot_and_the_move_can_be_rerun(
        tmp_path: Path, logical: LocalStack) -> None:
    """A forgotten slot keeps the source's WAL for ever: when the target dies mid-copy the
    source's slots and publication go at once, the tenant stays served on its source, and
    a second run removes what stayed on the target and moves it."""
    mover = str(uuid.uuid4())
    await _admin(logical, "INSERT INTO events (tenant_id, event_type, data) "
                          "SELECT $1, 'bulk', jsonb_build_object('pad', repeat('x', 200)) "
                          "FROM generate_series(1, 300000) g", mover)
    for doomed in temporary_stack("tenant-proxy-doomed-", pool_size=2):
        await _admin(doomed, TICKETS)
        overrides = _overrides(logical, doomed)
        async with running_gateway(make_settings(stack_of(logical), **overrides)) as api:
            settings = api.running.gateway.runtime.settings
            admin_url = f"http://127.0.0.1:{api.running.admin_port}"
            said: list[str] = []
            move = asyncio.create_task(move_tenant(settings, mover, "eu", admin_url, say=said.append))
            deadline = time.monotonic() + 30
            while not await rows(doomed, "SELECT 1 FROM pg_subscription_rel r JOIN pg_subscription s ON "
                                         "s.oid = r.srsubid WHERE s.subname = $1 AND r.srsubstate = 'd'",
                                 object_name(mover)):  # a table is being copied
                assert time.monotonic() < deadline and not move.done(), said
                await asyncio.sleep(0.02)
            await asyncio.to_thread(doomed.stop)
            with pytest.raises(Exception):  # noqa: B017 - whatever the lost connection raises
                await move
            assert await rows(logical, "SELECT slot_name FROM pg_replication_slots") == []
            assert await rows(logical, "SELECT pubname FROM pg_publication") == []
            assert any("stays on cluster default" in line and "subscription" in line for line in said), said
            r = await api.query("INSERT INTO events (event_type, data) VALUES ('after', '{}')", key=KEY_ANY,
                                tenant=mover)
            assert r.status == 200, r.body  # served, and writable, on its source
            await asyncio.to_thread(doomed.start)
            said.clear()
            report = await move_tenant(settings, mover, "eu", admin_url, say=said.append)
            assert report.rows["public.events"] == 300001
            assert any("removing what an earlier move" in line for line in said), said
        assert await _leftovers(logical, doomed, mover) == []
        assert (await rows(doomed, "SELECT count(*) AS n FROM events WHERE tenant_id = $1", mover))[0]["n"] == 300001
    assert await rows(logical, "SELECT 1 FROM events WHERE tenant_id = $1 LIMIT 1", mover) == []
