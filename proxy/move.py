"""`tenant-proxy move`: move one tenant's data to another cluster while the gateway runs.

1. Pause the tenant's writes in the running gateway (admin API: `moving`), so writes get
   503 `tenant_moving` with Retry-After while reads go on; wait for its transactions in
   flight to finish.
2. Export it from its cluster (one consistent snapshot, under RLS), import it on the
   target (manifest and checksums verified first; refused if the tenant already has rows
   there), and check the row counts on the target against the export.
3. Flip the tenant's placement in the gateway and resume its writes, in one admin call.
4. Only then purge it from the source.

Any failure before the flip resumes the tenant on its source and deletes what was
imported on the target.  The idempotency records travel with the data, so a client
retrying a write across the move still has it run once.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .config import Settings
from .db import connect_direct
from .export import export_tenant
from .lifecycle import LifecycleError, Progress, begin_tenant_tx, row_counts, tenant_tables
from .purge import purge_tenant
from .restore import check_export, load_export

DRAIN_TIMEOUT_S = 30.0


class _Admin:
    def __init__(self, http: aiohttp.ClientSession, base: str, tenant: str) -> None:
        self.http = http
        self.url = f"{base.rstrip('/')}/admin/tenants/{tenant}"

    async def set(self, **limits: Any) -> dict[str, Any]:
        async with self.http.put(self.url + "/limits", json=limits) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise LifecycleError(f"the gateway refused {limits}: {body}")
            return dict(body["limits"])

    async def inflight(self) -> int:
        async with self.http.get(self.url) as r:
            return int((await r.json())["inflight"])


async def move_tenant(settings: Settings, tenant: str, target: str, admin_url: str,
                      say: Callable[[str], None] = print) -> dict[str, int]:
    """Move ``tenant`` to cluster ``target``; returns the rows moved per table."""
    if target not in settings.clusters:
        known = ", ".join(sorted(settings.clusters))
        raise LifecycleError(f"--to {target!r}: no such cluster in the config (known: {known})")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        admin = _Admin(http, admin_url, tenant)
        try:
            current = await admin.set(moving=True)
        except aiohttp.ClientError as exc:
            raise LifecycleError(f"cannot reach the gateway's admin API at {admin_url}: {exc}") from None
        source = current["cluster"]
        if source == target:
            await admin.set(moving=False)
            raise LifecycleError(f"tenant {tenant} is already on cluster {target}")
        say(f"move: writes of tenant {tenant} paused on cluster {source}")
        try:
            await _drain(admin)
            moved = await _copy(settings, tenant, source, target, say)
        except BaseException:
            await _undo(settings, tenant, target, admin, say)
            raise
        await admin.set(cluster=target, moving=False)
    say(f"move: tenant {tenant} now served by cluster {target}; writes resumed")
    say(f"move: purged {await _purge(settings, tenant, source)} rows from cluster {source}")
    say(f"move: make it last: set tenants.{tenant}.cluster: {target} in the config file before the next reload")
    return moved


async def _drain(admin: _Admin) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while await admin.inflight() > 0:
        if time.monotonic() > deadline:
            raise LifecycleError("the tenant still has transactions in flight after 30 s")
        await asyncio.sleep(0.05)


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


async def _undo(settings: Settings, tenant: str, target: str, admin: _Admin, say: Callable[[str], None]) -> None:
    """Before the flip: the source still serves; drop what reached the target, resume writes."""
    await _purge(settings, tenant, target)
    await admin.set(moving=False)
    say(f"move: failed; tenant {tenant} stays on its cluster, the copy on {target} was removed")


async def _purge(settings: Settings, tenant: str, cluster: str) -> int:
    conn = await connect_direct(settings.clusters[cluster].dsn)
    try:
        return sum(n for _, n in await purge_tenant(conn, tenant=tenant, tenancy=settings.tenancy, yes=True))
    except LifecycleError:
        return 0  # the tenant has no rows there
    finally:
        await conn.close()
