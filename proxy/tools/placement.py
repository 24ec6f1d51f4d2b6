"""A move's pause, flip and resume through the control catalog, fenced by the lease.

Each step is a catalog change; the mover then waits until every live instance reports
that version applied (an instance reports it only once the transactions it had in flight
for a tenant the version pauses have ended), or until the instance's lease has run out
since its last heartbeat, plus the tenant's transaction deadline for a write it started
just before.  An instance that is cut off from the catalog can therefore never write
where the tenant no longer lives: by then it refuses writes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ..config import Settings
from ..control.catalog import Catalog
from ..control.schema import SCHEMA, CatalogError, connect
from .tenant_data import LifecycleError

FLEET_TIMEOUT_S = 60.0


class Coordinator(Protocol):
    async def placement(self) -> str: ...            # the cluster serving the tenant now
    async def pause(self, target: str) -> str: ...   # writes paused and drained; returns the source cluster
    async def flip(self, target: str) -> None: ...   # placement switched (writes still paused)
    async def resume(self) -> None: ...


class FleetPlacement:
    def __init__(self, conn: Any, settings: Settings, tenant: str, say: Callable[[str], None]) -> None:
        self.catalog = Catalog(conn, settings)
        self.conn = conn
        self.settings = settings
        self.tenant = tenant
        self.say = say
        self.state_before = "active"

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings, tenant: str, say: Callable[[str], None]) -> AsyncIterator[FleetPlacement]:
        try:
            conn = await connect(settings.control.dsn or "")
        except CatalogError as exc:
            raise LifecycleError(str(exc)) from None
        try:
            yield cls(conn, settings, tenant, say)
        finally:
            await conn.close()

    async def _change(self, **change: Any) -> int:
        try:
            await self.catalog.update_tenant("cli:move", self.tenant, **change)
        except CatalogError as exc:
            raise LifecycleError(str(exc)) from None
        return await self.catalog.version()

    async def placement(self) -> str:
        row = await self.catalog.tenant(self.tenant)
        if row is None:
            raise LifecycleError(f"tenant {self.tenant} is not registered in the control catalog "
                                 f"(`tenant-proxy tenants add --tenant {self.tenant}`)")
        return str(row["cluster"])

    async def pause(self, target: str) -> str:
        row = await self.catalog.tenant(self.tenant)
        if row is None:
            raise LifecycleError(f"not registered in the control catalog (`tenant-proxy tenants add --tenant "
                                 f"{self.tenant}`)")
        if row["cluster"] == target:
            raise LifecycleError(f"already on cluster {target}")
        # A move that died half-way left the tenant moving: this one takes over from it.
        self.state_before = "active" if row["state"] == "moving" else row["state"]
        await self._until_applied(await self._change(state="moving"), "pause its writes")
        return str(row["cluster"])

    async def flip(self, target: str) -> None:
        await self._until_applied(await self._change(cluster=target), "serve it from cluster " + target)

    async def resume(self) -> None:
        await self._change(state=self.state_before)

    async def _until_applied(self, version: int, what: str) -> None:
        """Wait until every instance has applied ``version`` or can no longer write."""
        lease = self.settings.control.lease_s
        grace = lease + self.settings.limits_for(self.tenant).transaction_timeout_s + 1.0
        deadline = time.monotonic() + FLEET_TIMEOUT_S
        while True:
            rows = await self.conn.fetch(
                f"SELECT id, applied_version, extract(epoch FROM now() - heartbeat_at)::float8 AS age "
                f"FROM {SCHEMA}.instances WHERE applied_version < $1", version)
            pending = [r["id"] for r in rows if r["age"] < grace]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LifecycleError(f"instances {', '.join(sorted(pending))} did not {what} within "
                                     f"{FLEET_TIMEOUT_S:g} s")
            await asyncio.sleep(0.05)
