"""`tenant-proxy move`: move one tenant's data to another cluster while the gateway runs.

Online (the default; proxy/tools/replication.py): the source publishes the tenant's rows
(a row filter on the tenant column), the target subscribes, copies them and follows the
tenant's writes as they are committed.  Then the cut-over, the only time writes wait:

1. pause the tenant's writes (writes are held in the gateway, then 503 `tenant_moving`
   with Retry-After; reads go on in READ ONLY transactions) and wait for its write
   transactions in flight: with a control catalog on every instance of the fleet
   (proxy/tools/placement.py), without one in the gateway whose admin API is given;
2. wait until the subscription has confirmed a WAL position of the source past every
   transaction committed so far, and compare the tenant's row counts on both sides;
3. set the target's sequences at least to the source's;
4. flip the placement (with a catalog: and wait until every live instance applied it,
   or its lease ran out), then resume.

Then the subscription, its slots and the publication are dropped, and the source purged.
Any failure or interruption before the flip drops them too, deletes what reached the
target and resumes the tenant on its source; the next move of the tenant removes what a
move killed outright left.  The pre-flight (proxy/tools/preflight.py) runs first and
names every requirement that does not hold.

`--offline` keeps the older copy for sources without logical replication: the writes stay
paused for the whole export, verification and import.

The idempotency records travel with the data (they are a tenant table), so a client
retrying a write across the move still has it run once.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ..config import Settings
from ..pg.pool import connect_direct
from . import preflight
from .export import export_tenant
from .placement import Coordinator, FleetPlacement
from .purge import purge_tenant
from .replication import Replication, object_name
from .restore import check_export, load_export
from .tenant_data import LifecycleError, Progress, TenantTable, begin_tenant_tx, row_counts, tenant_tables

DRAIN_TIMEOUT_S = 30.0
CATCH_UP_BYTES = 1 << 20       # the lag below which the cut-over starts
CATCH_UP_TIMEOUT_S = 60.0      # ... or after this long waiting for it
CUTOVER_TIMEOUT_S = 10.0       # the most the paused tenant waits for the target to catch up
# The row counts are compared inside the pause only when counting the tenant takes less than
# this (timed before the pause): the pause must not grow with the tenant's size.  Beyond,
# the slot's confirmation of a flushed position past every commit is what stands for them.
VERIFY_IN_PAUSE_S = 0.2


@dataclass(slots=True)
class MoveReport:
    rows: dict[str, int]
    pause_ms: float = 0.0        # writes paused (online: the cut-over; offline: the whole copy)
    total_s: float = 0.0
    steps_ms: dict[str, float] = field(default_factory=dict)  # the cut-over's parts


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

    async def _get(self) -> dict[str, Any]:
        try:
            async with self.http.get(self.url, headers=self.headers) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise LifecycleError(f"the gateway's admin API answered {r.status}: {body}")
                return dict(body)
        except aiohttp.ClientError as exc:
            raise LifecycleError(f"cannot reach the gateway's admin API at {self.base}: {exc}") from None

    async def placement(self) -> str:
        return str((await self._get())["cluster"])

    async def pause(self, target: str) -> str:
        current = await self.set(moving=True)
        if current["cluster"] == target:
            await self.set(moving=False)
            raise LifecycleError(f"tenant is already on cluster {target}")
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while int((await self._get())["writing"]) > 0:
            if time.monotonic() > deadline:
                raise LifecycleError("the tenant still has read-write transactions in flight after 30 s")
            await asyncio.sleep(0.01)
        return str(current["cluster"])

    async def flip(self, target: str) -> None:
        await self.set(cluster=target)

    async def resume(self) -> None:
        await self.set(moving=False)


async def move_tenant(settings: Settings, tenant: str, target: str, admin_url: str | None = None,
                      say: Callable[[str], None] = print, admin_token: str | None = None,
                      offline: bool = False) -> MoveReport:
    """Move ``tenant`` to cluster ``target``.  With control.dsn the fleet's catalog
    coordinates it; without, the gateway at ``admin_url``."""
    if target not in settings.clusters:
        known = ", ".join(sorted(settings.clusters))
        raise LifecycleError(f"--to {target!r}: no such cluster in the config (known: {known})")
    started = time.monotonic()
    async with _coordinator(settings, tenant, admin_url, admin_token, say) as coordinator:
        if offline:
            report, source = await _move_offline(settings, tenant, target, coordinator, say)
        else:
            report, source = await _move_online(settings, tenant, target, coordinator, say)
    say(f"move: tenant {tenant} now served by cluster {target}; writes resumed after {report.pause_ms:.0f} ms")
    say(f"move: purged {await _purge(settings, tenant, source)} rows from cluster {source}")
    if settings.control.dsn is None:
        say(f"move: make it last: set tenants.{tenant}.cluster: {target} in the config file before the next reload")
    report.total_s = time.monotonic() - started
    say(f"move: done in {report.total_s:.1f} s; writes paused {report.pause_ms:.0f} ms")
    return report


@contextlib.asynccontextmanager
async def _coordinator(settings: Settings, tenant: str, admin_url: str | None, admin_token: str | None,
                       say: Callable[[str], None]) -> AsyncIterator[Coordinator]:
    if settings.control.dsn is not None:
        async with FleetPlacement.open(settings, tenant, say) as fleet:
            yield fleet
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        url = admin_url or f"http://{settings.server.admin_host}:{settings.server.admin_port}"
        yield _Admin(http, url, tenant, admin_token)


async def _pause(coordinator: Coordinator, tenant: str, target: str) -> str:
    try:
        return await coordinator.pause(target)
    except LifecycleError as exc:
        raise LifecycleError(f"tenant {tenant}: {exc}") from None


async def _move_offline(settings: Settings, tenant: str, target: str, coordinator: Coordinator,
                        say: Callable[[str], None]) -> tuple[MoveReport, str]:
    paused = time.monotonic()
    source = await _pause(coordinator, tenant, target)
    say(f"move: writes of tenant {tenant} paused on cluster {source} for the whole copy (--offline)")
    try:
        moved = await _copy(settings, tenant, source, target, say)
    except BaseException:
        await _undo(settings, tenant, target, coordinator, say)
        raise
    await coordinator.flip(target)
    await coordinator.resume()
    return MoveReport(rows=moved, pause_ms=(time.monotonic() - paused) * 1000), source


async def _move_online(settings: Settings, tenant: str, target: str, coordinator: Coordinator,
                       say: Callable[[str], None]) -> tuple[MoveReport, str]:
    source = await coordinator.placement()
    if source == target:
        raise LifecycleError(f"tenant {tenant} is already on cluster {target}")
    src, dst = await preflight.open_admin(settings, source, target)
    try:
        repl = Replication(src, dst, tenant, object_name(tenant))
        if left := await repl.leftovers():
            # The tenant is served from the source (above): what is on the target is a copy.
            say(f"move: removing what an earlier move of tenant {tenant} left: {', '.join(left)}, and its copy on "
                f"cluster {target}")
            await repl.drop()
            await _purge(settings, tenant, target)
        problems = await preflight.check(src, dst, settings.tenancy, tenant)
        if problems:
            raise LifecycleError("the online move cannot start:\n  " + "\n  ".join(map(str, problems))
                                 + f"\n({preflight.OFFLINE_HINT})")
        tables = await tenant_tables(src, settings.tenancy)
        report = await _replicate_and_cut_over(settings, repl, tables, source, target, coordinator, say)
        try:
            await repl.drop()
        except LifecycleError as exc:
            # Purging the source now could reach the target through what is left.
            raise LifecycleError(f"tenant {tenant} is served by cluster {target}, but {exc}; its rows on cluster "
                                 f"{source} were kept: purge them once these are gone") from None
    finally:
        await src.close()
        await dst.close()
    return report, source


async def _replicate_and_cut_over(settings: Settings, repl: Replication, tables: list[TenantTable], source: str,
                                  target: str, coordinator: Coordinator,
                                  say: Callable[[str], None]) -> MoveReport:
    tenant = repl.tenant
    paused = flipped = False
    try:
        started = time.monotonic()
        await repl.start(tables, settings.clusters[source].admin_dsn or "")
        say(f"move: replicating tenant {tenant} from cluster {source} to {target} ({len(tables)} tables)")
        await repl.wait_copied(say)
        say(f"move: initial copy done in {time.monotonic() - started:.1f} s; catching up")
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while await repl.lag_bytes() > CATCH_UP_BYTES and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        counted = time.monotonic()
        rows = await _counts(repl.source, tables, tenant)
        verify = time.monotonic() - counted < VERIFY_IN_PAUSE_S
        if not verify:
            say(f"move: counting the tenant takes {time.monotonic() - counted:.1f} s: the row counts are not "
                "compared in the pause (the slot's confirmation stands for them)")
        t0 = time.monotonic()
        paused = True
        if await _pause(coordinator, tenant, target) != source:
            raise LifecycleError(f"tenant {tenant} was placed on another cluster than {source} meanwhile")
        t1 = time.monotonic()
        await repl.wait_applied(await repl.flushed_position(), CUTOVER_TIMEOUT_S)
        t2 = time.monotonic()
        if verify:
            rows = await _same_counts(repl, tables, target)
        t3 = time.monotonic()
        await repl.advance_sequences(tables)
        flipped = True
        await coordinator.flip(target)
        await coordinator.resume()
        t4 = time.monotonic()
        steps = {"pause_and_drain": t1 - t0, "catch_up": t2 - t1, "verify": t3 - t2, "sequences_and_flip": t4 - t3}
        report = MoveReport(rows=rows, pause_ms=(t4 - t0) * 1000, steps_ms={k: v * 1000 for k, v in steps.items()})
        say("move: cut-over " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} ms" for k, v in report.steps_ms.items()))
        return report
    except BaseException:
        if flipped:
            with contextlib.suppress(Exception):
                await coordinator.resume()
            raise
        await _abandon(settings, repl, source, target, coordinator if paused else None, say)
        raise


async def _abandon(settings: Settings, repl: Replication, source: str, target: str, paused: Coordinator | None,
                   say: Callable[[str], None]) -> None:
    """Before the flip: replication objects dropped, the copy deleted, the source serving
    (resumed, if it was paused).  Each step is tried whatever became of the others."""
    notes = []
    try:
        await repl.drop()
    except LifecycleError as exc:
        notes.append(str(exc))
    try:
        await _purge(settings, repl.tenant, target)
    except Exception as exc:
        notes.append(f"the copy on cluster {target} stays ({type(exc).__name__}: {exc}); the next move of the "
                     f"tenant deletes it, or `tenant-proxy purge --cluster {target}`")
    if paused is not None:
        await paused.resume()
    say(f"move: failed; tenant {repl.tenant} stays on cluster {source}"
        + ("; " + "; ".join(notes) if notes else f", the copy on {target} was removed"))


async def _same_counts(repl: Replication, tables: list[TenantTable], target: str) -> dict[str, int]:
    """The tenant's rows per table on both sides, counted at once; any difference fails the move."""
    counts = await asyncio.gather(*(_counts(conn, tables, repl.tenant) for conn in (repl.source, repl.target)))
    if counts[0] != counts[1]:
        raise LifecycleError(f"row counts on cluster {target} differ from the source after catching up: "
                             f"{counts[1]} vs {counts[0]}")
    return counts[0]


async def _counts(conn: Any, tables: list[TenantTable], tenant: str) -> dict[str, int]:
    return {t.qualified: n for t, n in await row_counts(conn, tables, tenant)}


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
