"""`tenant-proxy move`: move one tenant's data to another cluster while the gateway runs.

1. Pause the tenant's writes, so writes get 503 `tenant_moving` with Retry-After while
   reads go on, and wait for its transactions in flight to finish: with a control catalog
   on every instance of the fleet (proxy/control/placement.py), without one in the
   gateway whose admin API is given.
2. Export it from its cluster (one consistent snapshot, under RLS), import it on the
   target (manifest and checksums verified first; refused if the tenant already has rows
   there), and check the row counts on the target against the export.
3. Flip the tenant's placement (with a catalog: and wait until every live instance
   applied it, or its lease ran out), then resume its writes.
4. Only then purge it from the source.

Any failure before the flip resumes the tenant on its source and deletes what was
imported on the target.  The idempotency records travel with the data, so a client
retrying a write across the move still has it run once.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .config import Settings
from .control.placement import Coordinator, FleetPlacement
from .db import connect_direct
from .export import export_tenant
from .lifecycle import LifecycleError, Progress, begin_tenant_tx, row_counts, tenant_tables
from .purge import purge_tenant
from .restore import check_export, load_export

DRAIN_TIMEOUT_S = 30.0


class _Admin:
    """Without a control catalog: one gateway, through its admin API."""

    def __init__(self, http: aiohttp.ClientSession, base: str, tenant: str, token: str | None) -> None:
        self.http = http
        self.url = f"{base.rstrip('/')}/admin/tenants/{tenant}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base = base

    async def set(self, **limits: Any) -> dict[str, Any]:
        try:
            async with self.http.put(self.url + "/limits", json=limits, headers=self.headers) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise LifecycleError(f"the gateway refused {limits}: {body}")
                return dict(body["limits"])
        except aiohttp.ClientError as exc:
            raise LifecycleError(f"cannot reach the gateway's admin API at {self.base}: {exc}") from None

    async def pause(self, target: str) -> str:
        current = await self.set(moving=True)
        if current["cluster"] == target:
            await self.set(moving=False)
            raise LifecycleError(f"tenant is already on cluster {target}")
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while await self._inflight() > 0:
            if time.monotonic() > deadline:
                raise LifecycleError("the tenant still has transactions in flight after 30 s")
            await asyncio.sleep(0.05)
        return str(current["cluster"])

    async def _inflight(self) -> int:
        async with self.http.get(self.url, headers=self.headers) as r:
            return int((await r.json())["inflight"])

    async def flip(self, target: str) -> None:
        await self.set(cluster=target)

    async def resume(self) -> None:
        await self.set(moving=False)


async def move_tenant(settings: Settings, tenant: str, target: str, admin_url: str | None = None,
                      say: Callable[[str], None] = print, admin_token: str | None = None) -> dict[str, int]:
    """Move ``tenant`` to cluster ``target``; returns the rows moved per table.  With
    control.dsn the fleet's catalog coordinates it; without, the gateway at ``admin_url``."""
    if target not in settings.clusters:
        known = ", ".join(sorted(settings.clusters))
        raise LifecycleError(f"--to {target!r}: no such cluster in the config (known: {known})")
    async with contextlib.AsyncExitStack() as stack:
        coordinator: Coordinator
        if settings.control.dsn is not None:
            coordinator = await stack.enter_async_context(FleetPlacement.open(settings, tenant, say))
        else:
            http = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
            url = admin_url or f"http://{settings.server.admin_host}:{settings.server.admin_port}"
            coordinator = _Admin(http, url, tenant, admin_token)
        try:
            source = await coordinator.pause(target)
        except LifecycleError as exc:
            raise LifecycleError(f"tenant {tenant}: {exc}") from None
        say(f"move: writes of tenant {tenant} paused on cluster {source}")
        try:
            moved = await _copy(settings, tenant, source, target, say)
        except BaseException:
            await _undo(settings, tenant, target, coordinator, say)
            raise
        await coordinator.flip(target)
        await coordinator.resume()
    say(f"move: tenant {tenant} now served by cluster {target}; writes resumed")
    say(f"move: purged {await _purge(settings, tenant, source)} rows from cluster {source}")
    if settings.control.dsn is None:
        say(f"move: make it last: set tenants.{tenant}.cluster: {target} in the config file before the next reload")
    return moved


async def _copy(settings: Settings, tenant: str, source: str, target: str,
                say: Callable[[str], None]) -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="tenant-move-") as tmp:
        out = Path(tmp)
        src = await connect_direct(settings.clusters[source].dsn)
        try:
            manifest = await export_tenant(src, tenant=tenant, tenancy=settings.tenancy, out=out,
                                           progress=Progress(prefix="move/export: "))
        finally:
            await src.close()
        say(f"move: exported {sum(t.rows for t in manifest.tables)} rows from cluster {source}")
        checked = check_export(out, tenant, settings.tenancy.id_format, Progress(prefix="move/verify: "))
        dst = await connect_direct(settings.clusters[target].dsn)
        try:
            await load_export(dst, manifest=checked, src=out, tenant=tenant, tenancy=settings.tenancy,
                              replace=False, progress=Progress(prefix="move/import: "))
            await begin_tenant_tx(dst, settings.tenancy, tenant, read_only=True)
            tables = await tenant_tables(dst, settings.tenancy)
            counts = {t.qualified: n for t, n in await row_counts(dst, tables, tenant)}
            await dst.execute("ROLLBACK")
        finally:
            await dst.close()
    expected = {t.qualified: t.rows for t in manifest.tables}
    if any(counts.get(name, -1) != n for name, n in expected.items()):
        raise LifecycleError(f"row counts on cluster {target} differ from the export: {counts} vs {expected}")
    say(f"move: imported and verified {sum(expected.values())} rows on cluster {target}")
    return expected


async def _undo(settings: Settings, tenant: str, target: str, coordinator: Coordinator,
                say: Callable[[str], None]) -> None:
    """Before the flip: the source still serves; drop what reached the target, resume writes."""
    await _purge(settings, tenant, target)
    await coordinator.resume()
    say(f"move: failed; tenant {tenant} stays on its cluster, the copy on {target} was removed")


async def _purge(settings: Settings, tenant: str, cluster: str) -> int:
    conn = await connect_direct(settings.clusters[cluster].dsn)
    try:
        return sum(n for _, n in await purge_tenant(conn, tenant=tenant, tenancy=settings.tenancy, yes=True))
    except LifecycleError:
        return 0  # the tenant has no rows there
    finally:
        await conn.close()
