"""Three gateway instances sharing one control catalog act as one gateway (issue: the fleet).

Each test gets a catalog database of its own on the primary's PostgreSQL, initialised with
`tenant-proxy control init` from the test config, and three instances on that config.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from proxy.__main__ import main
from proxy.config import load_config
from proxy.control.schema import SCHEMA, CatalogError
from proxy.control.sync import ControlSync
from proxy.http.app import start_gateway
from proxy.tools.devstack import LocalStack
from proxy.tools.move import move_tenant
from proxy.tools.tenant_data import LifecycleError

from ..fix_gateway import KEY_A, KEY_ANY, KEY_B, TENANT_A, TENANT_B, Api, base_config, merge, running_gateway
from ..fix_stack import stack_of
from ..fix_tcp import Cuttable, cuttable
from .conftest import rows

ADMIN_TOKEN = "fleet-test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def within(seconds: float) -> Callable[[Callable[[], Awaitable[bool]]], Awaitable[float]]:
    async def wait(check: Callable[[], Awaitable[bool]]) -> float:
        started = time.monotonic()
        while not await check():
            assert time.monotonic() - started < seconds, f"not within {seconds} s"
            await asyncio.sleep(0.05)
        return time.monotonic() - started
    return wait


class Fleet:
    def __init__(self, config: Path, control_dsn: str) -> None:
        self.config = config
        self.control_dsn = control_dsn
        self.apis: list[Api] = []

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        """Run `tenant-proxy ...` in a thread (it runs its own event loop), capturing its output."""
        import contextlib as cl
        import io

        out, err = io.StringIO(), io.StringIO()

        def run() -> int:
            with cl.redirect_stdout(out), cl.redirect_stderr(err):
                return main([*argv])
        code = await asyncio.to_thread(run)
        return code, out.getvalue(), err.getvalue()

    async def catalog(self, sql: str, *args: Any) -> list[Any]:
        conn = await asyncpg.connect(self.control_dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def statuses(self, sql: str = "SELECT 1 AS one", *, key: str = KEY_B, tenant: str | None = None,
                       **opts: Any) -> list[int]:
        return [(await api.query(sql, key=key, tenant=tenant, **opts)).status for api in self.apis]


@contextlib.asynccontextmanager
async def fleet(primary: LocalStack, tmp_path: Path, n: int = 3, overrides: dict[str, Any] | None = None,
                control_via: Callable[[str], str] | None = None) -> AsyncIterator[Fleet]:
    """A catalog database, `control init`, and ``n`` instances (``control_via`` may route an
    instance's catalog connection elsewhere: ``control_via(dsn)`` for the last one)."""
    name = f"control_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(primary.admin_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = primary.admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    raw = merge(base_config(stack_of(primary)), {
        "control": {"dsn": dsn, "lease_s": 2, "heartbeat_s": 0.3},
        "admin": {"tokens": [{"name": "ops-alice", "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]},
        **(overrides or {})})
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(raw))
    f = Fleet(config, dsn)
    code, _out, err = await f.cli("control", "init", "--config", str(config))
    assert code == 0, err
    try:
        async with contextlib.AsyncExitStack() as stack:
            for i in range(n):
                settings = load_config(config, {})
                if control_via is not None and i == n - 1:
                    raw_i = merge(raw, {"control": {"dsn": control_via(dsn)}})
                    settings = load_config(_write(tmp_path / f"gateway-{i}.yaml", raw_i), {})
                f.apis.append(await stack.enter_async_context(running_gateway(settings, config)))
            yield f
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


def _write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


async def test_every_change_kind_reaches_every_instance(primary: LocalStack, tmp_path: Path) -> None:
    async with fleet(primary, tmp_path) as f:
        api0 = f.apis[0]
        assert await f.statuses() == [200, 200, 200]
        for _ in range(2):
            assert (await api0.query("INSERT INTO events (event_type, data) VALUES ('b-fleet', '{}')",
                                     key=KEY_B)).status == 200
        # suspend through one instance's admin API: all three refuse within a second
        r = await api0.request("PUT", f"/admin/tenants/{TENANT_B}/limits", json={"suspended": True}, admin=True,
                               key=None, headers=ADMIN)
        assert r.status == 200 and r.body["limits"]["suspended"] is True
        await within(1.0)(lambda: _all(f.statuses(), 403))
        r = await api0.request("PUT", f"/admin/tenants/{TENANT_B}/limits", json={"suspended": False, "max_rows": 1},
                               admin=True, key=None, headers=ADMIN)
        assert r.status == 200
        await within(1.0)(lambda: _all(f.statuses(), 200))
        # a limit: max_rows 1 cuts B's rows to one on every instance
        for api in f.apis:
            q = await api.query("SELECT event_type FROM events WHERE event_type = 'b-fleet'", key=KEY_B)
            assert q.status == 200 and q.body["truncated"] is True and len(q.body["rows"]) == 1
        # the CLI: suspend and resume
        code, out, err = await f.cli("tenants", "suspend", "--config", str(f.config), "--tenant", TENANT_B)
        assert code == 0, err
        await within(1.0)(lambda: _all(f.statuses(), 403))
        code, out, err = await f.cli("tenants", "resume", "--config", str(f.config), "--tenant", TENANT_B)
        assert code == 0, err
        await within(1.0)(lambda: _all(f.statuses(), 200))
        # a new tenant and a key for it: the key is printed once, alone on the last line
        new = str(uuid.uuid4())
        assert (await f.cli("tenants", "add", "--config", str(f.config), "--tenant", new))[0] == 0
        code, out, err = await f.cli("keys", "add", "--config", str(f.config), "--name", "svc-new", "--tenant", new)
        assert code == 0, err
        key = out.rstrip("\n").splitlines()[-1]
        assert key.startswith("tp_") and key not in str(await f.catalog(f"SELECT * FROM {SCHEMA}.api_keys"))
        await within(5.0)(lambda: _all(f.statuses(key=key), 200))
        # rotation: the old and the new key both work during the grace period
        code, out, err = await f.cli("keys", "rotate", "--config", str(f.config), "--name", "svc-new",
                                     "--grace", "1h")
        assert code == 0, err
        rotated = out.rstrip("\n").splitlines()[-1]
        await within(5.0)(lambda: _all(f.statuses(key=rotated), 200))
        assert await f.statuses(key=key) == [200, 200, 200]
        # revocation: refused everywhere within 5 s
        code, out, err = await f.cli("keys", "revoke", "--config", str(f.config), "--name", "svc-new")
        assert code == 0, err
        took = await within(5.0)(lambda: _all(f.statuses(key=rotated), 401))
        assert took < 5.0 and await f.statuses(key=key) == [401, 401, 401]
        # the change log: newest first, with who made each change
        r = await api0.request("GET", "/admin/changes?limit=50", admin=True, key=None, headers=ADMIN)
        assert r.status == 200
        kinds = [(c["kind"], c["actor"]) for c in r.body["changes"]]
        assert kinds[0][0] == "key.revoke" and ("tenant.update", "ops-alice") in kinds
        assert all(a.startswith("cli:") for k, a in kinds if k.startswith("key."))
        # the fleet: three live instances, each at the catalog's version
        r = await api0.request("GET", "/admin/fleet", admin=True, key=None, headers=ADMIN)
        assert r.status == 200 and len(r.body["instances"]) == 3
        await within(2.0)(lambda: _fleet_at(api0, r.body["version"]))


async def _all(statuses: Awaitable[list[int]], status: int) -> bool:
    return all(s == status for s in await statuses)


async def _fleet_at(api: Api, version: int) -> bool:
    r = await api.request("GET", "/admin/fleet", admin=True, key=None, headers=ADMIN)
    return all(i["applied_version"] >= version for i in r.body["instances"])


async def test_changes_survive_restarts_and_reloads(primary: LocalStack, tmp_path: Path) -> None:
    async with fleet(primary, tmp_path) as f:
        r = await f.apis[1].request("PUT", f"/admin/tenants/{TENANT_B}/limits", json={"suspended": True},
                                    admin=True, key=None, headers=ADMIN)
        assert r.status == 200
        await within(1.0)(lambda: _all(f.statuses(), 403))
        r = await f.apis[0].request("POST", "/admin/reload", admin=True, key=None, headers=ADMIN)
        assert r.status == 200
        assert await f.statuses() == [403, 403, 403]
        for api in f.apis:
            await api.running.stop()
        f.apis.clear()
        settings = load_config(f.config, {})
        running = [await start_gateway(settings, f.config) for _ in range(3)]
        try:
            async with __import__("aiohttp").ClientSession() as session:
                f.apis = [Api(session, r) for r in running]
                assert await f.statuses() == [403, 403, 403]
                assert await f.statuses(key=KEY_A) == [200, 200, 200]
        finally:
            for r in running:
                await r.stop()


async def test_admin_routes_need_a_token_and_a_refused_one_changes_nothing(primary: LocalStack,
                                                                            tmp_path: Path) -> None:
    async with fleet(primary, tmp_path, n=1) as f:
        api = f.apis[0]
        version = (await f.catalog(f"SELECT version FROM {SCHEMA}.meta"))[0]["version"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
            for method, path, body in (("PUT", f"/admin/tenants/{TENANT_B}/limits", {"suspended": True}),
                                       ("POST", "/admin/reload", None), ("GET", "/admin/config", None),
                                       ("GET", "/admin/changes", None), ("GET", "/admin/fleet", None)):
                r = await api.request(method, path, json=body, admin=True, key=None, headers=headers)
                assert r.status == 401 and r.code == "unauthenticated", (method, path, r.body)
        assert (await f.catalog(f"SELECT version FROM {SCHEMA}.meta"))[0]["version"] == version
        assert await f.statuses() == [200]
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await api.request("GET", path, admin=True, key=None)).status == 200, path
        metrics = (await api.request("GET", "/metrics", admin=True, key=None)).body
        assert "tenant_proxy_control_version" in metrics and "tenant_proxy_control_connected 1.0" in metrics


async def test_an_unregistered_tenant_is_refused_whatever_the_key_allows(primary: LocalStack,
                                                                         tmp_path: Path) -> None:
    async with fleet(primary, tmp_path, n=1) as f:
        stranger = str(uuid.uuid4())  # a typo in X-Tenant-Id must not start a new tenant
        r = await f.apis[0].query("INSERT INTO events (event_type, data) VALUES ('typo', '{}')", key=KEY_ANY,
                                  tenant=stranger)
        assert r.status == 403 and r.code == "tenant_unknown"
        conn = await asyncpg.connect(primary.admin_dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM events WHERE tenant_id = $1", stranger) == 0
        finally:
            await conn.close()
        assert (await f.apis[0].query("SELECT 1", key=KEY_ANY, tenant=TENANT_A)).status == 200


async def test_a_cut_off_instance_refuses_writes_after_its_lease_and_recovers(primary: LocalStack,
                                                                              tmp_path: Path) -> None:
    proxies: list[Cuttable] = []
    async with contextlib.AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(cuttable("127.0.0.1", primary.pg_port))
        proxies.append(proxy)
        via = await stack.enter_async_context(fleet(
            primary, tmp_path, control_via=lambda dsn: dsn.replace(f":{primary.pg_port}/", f":{proxy.port}/")))
        cut_off = via.apis[2]
        write = "INSERT INTO events (event_type, data) VALUES ('lease', '{}')"
        assert (await cut_off.query(write, key=KEY_A)).status == 200
        proxy.sever()
        await asyncio.sleep(2.5)  # the lease (2 s) runs out
        r = await cut_off.query(write, key=KEY_A)
        assert r.status == 503 and r.code == "control_unavailable" and r.headers.get("Retry-After")
        read = await cut_off.query("SELECT count(*) AS n FROM events WHERE event_type = 'lease'", key=KEY_A)
        assert read.status == 200  # reads go on
        assert (await via.apis[0].query(write, key=KEY_A)).status == 200  # the others write
        # a change made meanwhile reaches it once the catalog is back
        r = await via.apis[0].request("PUT", f"/admin/tenants/{TENANT_B}/limits", json={"suspended": True},
                                      admin=True, key=None, headers=ADMIN)
        assert r.status == 200
        assert (await cut_off.query("SELECT 1", key=KEY_B)).status == 200  # its last good view
        proxy.restore()
        await within(8.0)(lambda: _status(cut_off.query(write, key=KEY_A), 200))
        assert (await cut_off.query("SELECT 1", key=KEY_B)).status == 403


async def _status(reply: Awaitable[Any], status: int) -> bool:
    return bool((await reply).status == status)


async def test_move_through_the_fleet_loses_and_duplicates_nothing(primary: LocalStack, second_cluster: LocalStack,
                                                                   tmp_path: Path) -> None:
    mover = str(uuid.uuid4())
    marker = f"fleet-move-{uuid.uuid4()}"
    overrides = {"clusters": {"eu": {"dsn": second_cluster.gateway_dsn}}, "server": {"write_hold_s": 0}}
    async with fleet(primary, tmp_path, overrides=overrides) as f:
        assert (await f.cli("tenants", "add", "--config", str(f.config), "--tenant", mover))[0] == 0
        await within(1.0)(lambda: _all(f.statuses(key=KEY_ANY, tenant=mover), 200))
        settings = load_config(f.config, {})
        acked: list[int] = []
        paused: list[int] = []
        stop = asyncio.Event()

        async def writer() -> None:
            from proxy.client import AsyncClient

            clients = [AsyncClient(api.base, KEY_ANY, tenant=mover, retries=200, backoff_s=0.05, max_backoff_s=0.3)
                       for api in f.apis]
            try:
                n = 0
                while not stop.is_set() or n < 40:
                    client = clients[n % 3]  # through every instance in turn
                    await client.query("INSERT INTO events (event_type, data) "
                                       "VALUES ($1, jsonb_build_object('n', $2::int))", marker, n)
                    acked.append(n)
                    n += 1
                    await asyncio.sleep(0.01)
                paused.append(sum(c.retried for c in clients))
            finally:
                for c in clients:
                    await c.close()

        task = asyncio.create_task(writer())
        await asyncio.sleep(0.5)
        moved = await move_tenant(settings, mover, "eu", say=lambda _: None, offline=True)
        assert moved.rows["public.events"] >= 1
        await asyncio.sleep(0.5)
        stop.set()
        await task
        assert paused[0] > 0, "no write met the pause: the test proved nothing"
        row = (await f.catalog(f"SELECT cluster, state FROM {SCHEMA}.tenants WHERE id = $1", mover))[0]
        assert (row["cluster"], row["state"]) == ("eu", "active")
        # durable: a restarted instance serves the tenant from the target
        for api in f.apis:
            await api.running.stop()
        async with running_gateway(load_config(f.config, {}), f.config) as fresh:
            r = await fresh.query("SELECT count(*) AS n FROM events WHERE event_type = $1", marker, key=KEY_ANY,
                                  tenant=mover)
            assert r.status == 200 and r.body["rows"] == [{"n": len(acked)}]
            assert fresh.running.gateway.runtime.settings.limits_for(mover).cluster == "eu"
    target = await rows(second_cluster, "SELECT (data->>'n')::int AS n FROM events WHERE tenant_id = $1", mover)
    assert sorted(r["n"] for r in target) == sorted(acked)  # every acknowledged write, exactly once
    assert len(acked) == len(set(acked))
    assert await rows(primary, "SELECT 1 FROM events WHERE tenant_id = $1", mover) == []
    assert await rows(primary, "SELECT 1 FROM idempotency_keys WHERE tenant_id = $1", mover) == []



async def test_bad_input_gets_a_clear_error_and_changes_nothing(primary: LocalStack, second_cluster: LocalStack,
                                                                tmp_path: Path) -> None:
    async with fleet(primary, tmp_path, n=1) as f:
        version = (await f.catalog(f"SELECT version FROM {SCHEMA}.meta"))[0]["version"]
        cfg = str(f.config)
        cases = [
            (("tenants", "suspend", "--config", cfg, "--tenant", str(uuid.uuid4())), "is not registered"),
            (("tenants", "show", "--config", cfg, "--tenant", "not-a-uuid"), "not a valid uuid tenant id"),
            (("keys", "revoke", "--config", cfg, "--name", "nobody"), "no key named 'nobody'"),
            (("keys", "add", "--config", cfg, "--name", "svc-a", "--tenant", TENANT_A), "exists already"),
            (("keys", "add", "--config", cfg, "--name", "x", "--tenant", str(uuid.uuid4())), "is not registered"),
            (("keys", "add", "--config", cfg, "--name", "y", "--tenant", TENANT_A, "--expires", "soon"), "duration"),
            (("tenants", "add", "--config", cfg, "--tenant", TENANT_A), "already registered"),
            (("tenants", "resume", "--config", cfg, "--tenant", TENANT_A), "is active, not suspended or moving"),
            (("move", "--config", cfg, "--tenant", TENANT_A, "--to", "default"), "already on cluster default"),
        ]
        for argv, message in cases:
            code, _out, err = await f.cli(*argv)
            assert code == 1 and message in err and "Traceback" not in err, (argv, err)
        r = await f.apis[0].request("PUT", f"/admin/tenants/{uuid.uuid4()}/limits", json={"max_rows": 5},
                                    admin=True, key=None, headers=ADMIN)
        assert r.status == 404 and "not registered" in r.body["error"]["message"]
        assert (await f.catalog(f"SELECT version FROM {SCHEMA}.meta"))[0]["version"] == version
        assert await f.statuses() == [200]
    # a catalog that cannot be reached, or is missing: a clear error, no traceback
    raw = yaml.safe_load(f.config.read_text())
    raw["control"]["dsn"] = raw["control"]["dsn"].rsplit("/", 1)[0] + "/no_such_catalog"
    gone = _write(tmp_path / "gone.yaml", raw)
    code, _out, err = await f.cli("tenants", "list", "--config", str(gone))
    assert code == 1 and "cannot reach the control catalog" in err and "Traceback" not in err
    assert "postgres:<redacted>@" in err or "<redacted>" in err
    with pytest.raises(CatalogError, match="cannot reach the control catalog"):
        await start_gateway(load_config(gone, {}), gone)
    empty = f"control_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(primary.admin_dsn)
    await admin.execute(f"CREATE DATABASE {empty}")
    try:
        raw["control"]["dsn"] = raw["control"]["dsn"].rsplit("/", 1)[0] + f"/{empty}"
        missing = _write(tmp_path / "missing.yaml", raw)
        with pytest.raises(CatalogError, match="control init"):
            await start_gateway(load_config(missing, {}), missing)
        code, _out, err = await f.cli("serve", "--config", str(missing))
        assert code == 1 and "control init" in err
    finally:
        await admin.execute(f"DROP DATABASE {empty} WITH (FORCE)")
        await admin.close()
    with pytest.raises(LifecycleError):
        await move_tenant(load_config(gone, {}), TENANT_A, "default", say=lambda _: None, offline=True)


async def test_a_catalog_in_the_tenants_database_is_out_of_the_gateway_roles_reach(primary: LocalStack,
                                                                                   tmp_path: Path) -> None:
    raw = merge(base_config(stack_of(primary)), {"control": {"dsn": primary.admin_dsn}})
    config = _write(tmp_path / "shared.yaml", raw)
    f = Fleet(config, primary.admin_dsn)
    code, _out, err = await f.cli("control", "init", "--config", str(config))
    assert code == 0, err
    code, again, err = await f.cli("control", "init", "--config", str(config))
    assert code == 0 and "0 tenants, 0 API keys" in again, err  # idempotent
    app = await asyncpg.connect(primary.gateway_dsn, statement_cache_size=0)
    try:
        for table in ("api_keys", "tenants", "changes", "instances", "meta"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.fetch(f"SELECT * FROM {SCHEMA}.{table}")
    finally:
        await app.close()
    async with running_gateway(load_config(config, {}), config) as api:
        r = await api.query(f"SELECT name, sha256 FROM {SCHEMA}.api_keys", key=KEY_A)
        assert r.status >= 400 and "sha256" not in str(r.body.get("rows", "")), r.body


async def test_an_instance_stopped_without_its_catalog_connection_still_leaves_the_fleet(
        primary: LocalStack, tmp_path: Path) -> None:
    """Stopping cancels the sync loop.  When its LISTEN connection is gone (lost, or cancelled
    mid-query, where a late cancel request can hit the DELETE: CI once saw a worker's row
    outlive it), the instance leaves on a connection of its own, not after its lease."""
    async with cuttable("127.0.0.1", primary.pg_port) as proxy, fleet(primary, tmp_path, n=0) as f:
        settings = load_config(f.config, {})
        via = settings.control.dsn.replace(f":{primary.pg_port}/", f":{proxy.port}/")
        cfg = dataclasses.replace(settings.control, dsn=via, lease_s=60.0)
        sync = ControlSync(cfg, "127.0.0.1:1", lambda _view: None, _no_drain)
        await sync.start()
        try:
            assert [r["id"] for r in await f.catalog(f"SELECT id FROM {SCHEMA}.instances")] == [sync.id]
            proxy.sever()
            await within(5.0)(lambda: _is(not sync.connected))
            proxy.restore()  # and stopped before the loop's next try: no await in between
            await sync.close()
        finally:
            await sync.close()
        assert await f.catalog(f"SELECT id FROM {SCHEMA}.instances") == []


async def _no_drain(_tenants: set[str]) -> None:
    return None


async def _is(value: bool) -> bool:
    return value
