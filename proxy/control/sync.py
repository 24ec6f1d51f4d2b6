"""A running instance's link to the control catalog: LISTEN, resync, heartbeat and lease.

One task owns one direct connection.  It LISTENs on the catalog's channel; a NOTIFY (or
the heartbeat interval passing) makes it read what changed, hand the new view to the
gateway, wait for the gateway's transactions of any tenant that view pauses, and then
report the version as applied, with a heartbeat, in ``tenant_proxy.instances``.  A lost
connection is retried with backoff and followed by a full resync; meanwhile the gateway
keeps its last good view.

The lease: :meth:`ControlSync.fresh` is true while the last read that confirmed the
catalog's version began less than ``control.lease_s`` ago.  An instance that is not
fresh cannot know where a tenant lives now, so the gateway refuses its writes; `move`
waits for every live instance to apply a placement, or for its lease to run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Gauge

from ..config import ControlConfig, Settings
from . import view as views
from .catalog import Catalog
from .schema import CHANNEL, SCHEMA, CatalogError, connect

log = logging.getLogger("tenant_proxy.control")

BACKOFF_S = (0.1, 5.0)
_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, CatalogError)


def instance_id(worker: int | None = None) -> str:
    """Unique per process; ``serve --workers`` adds the worker's index (``host-pid-w1-3fa2c0``)."""
    index = "" if worker is None else f"-w{worker}"
    return f"{socket.gethostname()}-{os.getpid()}{index}-{os.urandom(3).hex()}"


class ControlSync:
    """``apply`` swaps a new view into the gateway (synchronously, so no request sees half
    of it); ``drain`` waits until no transaction that could write is in flight for the
    given tenants."""

    def __init__(self, cfg: ControlConfig, address: str, apply: Callable[[views.View], None],
                 drain: Callable[[set[str]], Awaitable[None]], worker: int | None = None) -> None:
        self.cfg = cfg
        self.id = instance_id(worker)
        self.address = address
        self._apply = apply
        self._drain = drain
        self.view: views.View | None = None
        self.confirmed_at = -1e9  # monotonic start of the last read that confirmed the version
        # Live instances (a heartbeat within the lease), this one included, as of the last sync:
        # each enforces its share of a tenant's concurrency cap (and of its rate without Redis).
        self.fleet_size = 1
        self.connected = False
        self._conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._op_timeout = max(1.0, 2 * cfg.heartbeat_s)
        self._pool: asyncpg.Pool | None = None  # for the admin API's writes, opened on first use
        self._registered = False  # a row in the instances table may be this instance's

    @contextlib.asynccontextmanager
    async def catalog(self, settings: Settings) -> AsyncIterator[Catalog]:
        """A catalog connection for one admin request (its own, not the LISTEN session)."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.cfg.dsn, min_size=0, max_size=2, statement_cache_size=0,
                                                   timeout=self._op_timeout)
        async with asyncio.timeout(max(self._op_timeout, 5.0)), self._pool.acquire() as conn:
            yield Catalog(conn, settings)

    # ------------------------------------------------------------------ the lease
    def fresh(self) -> bool:
        return time.monotonic() - self.confirmed_at < self.cfg.lease_s

    def age_s(self) -> float:
        return max(0.0, time.monotonic() - self.confirmed_at)

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Connect, check the catalog's version, read it whole and apply it: the gateway
        starts serving only with a view (a catalog that cannot be read stops the start)."""
        await self._connect()
        self._task = asyncio.create_task(self._run())

    async def caught_up(self, version: int, timeout_s: float = 5.0) -> bool:
        """Sync now and wait until this instance applies ``version`` (a change it made itself)."""
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        while (self.view is None or self.view.version < version) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.view is not None and self.view.version >= version

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if self._registered:
            self._registered = False
            await self._leave(conn)
        elif conn is not None:
            conn.terminate()

    async def _leave(self, conn: asyncpg.Connection | None) -> None:
        """Leave the fleet at once, so a move need not wait for this instance's lease.  The
        LISTEN connection may be unusable (the sync loop was cancelled mid-query, or it was
        lost): then a connection of its own does it."""
        delete = f"DELETE FROM {SCHEMA}.instances WHERE id = $1"
        try:
            if conn is not None and not conn.is_closed():
                try:
                    async with asyncio.timeout(self._op_timeout):
                        await conn.execute(delete, self.id)
                    return
                except _ERRORS:
                    pass
            async with asyncio.timeout(self._op_timeout):  # a catalog that is down delays the stop little
                own = await connect(self.cfg.dsn or "", checked=False, timeout_s=self._op_timeout)
                try:
                    await own.execute(delete, self.id)
                finally:
                    own.terminate()
        except _ERRORS as exc:
            log.warning("control catalog: could not leave the fleet (%s: %s); the lease (%.1f s) will expire it",
                        type(exc).__name__, exc, self.cfg.lease_s)
        finally:
            if conn is not None:
                conn.terminate()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        Gauge("tenant_proxy_control_version", "Catalog version this instance applied",
              registry=registry).set_function(lambda: float(self.view.version if self.view else 0))
        Gauge("tenant_proxy_control_sync_age_seconds", "Seconds since this instance last confirmed its catalog view",
              registry=registry).set_function(self.age_s)
        Gauge("tenant_proxy_control_connected", "1 while the catalog connection (LISTEN) is up",
              registry=registry).set_function(lambda: 1.0 if self.connected else 0.0)

    # ------------------------------------------------------------------ the loop
    async def _connect(self) -> None:
        async with asyncio.timeout(max(self._op_timeout, 5.0)):
            conn = await connect(self.cfg.dsn or "", timeout_s=max(self._op_timeout, 5.0))
            try:
                await conn.execute(f"DELETE FROM {SCHEMA}.instances WHERE heartbeat_at < now() - interval '1 day'")
                await conn.add_listener(CHANNEL, self._notified)
                conn.add_termination_listener(lambda _c: self._wake.set())
            except BaseException:
                conn.terminate()
                raise
        self._conn = conn
        self.connected = True
        await self._sync(full=True)

    def _notified(self, *_args: Any) -> None:
        self._wake.set()

    async def _run(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._connect()
                    log.info("control catalog: connected, view at version %d", self.view.version if self.view else 0)
                    backoff = BACKOFF_S[0]
                try:
                    async with asyncio.timeout(self.cfg.heartbeat_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                await self._sync(full=False)
                backoff = BACKOFF_S[0]
            except _ERRORS as exc:
                self._lost(exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_S[1])

    def _lost(self, exc: BaseException) -> None:
        if self.connected:
            log.warning("control catalog: connection lost (%s: %s); keeping the view at version %d and retrying",
                        type(exc).__name__, exc, self.view.version if self.view else 0)
        self.connected = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _sync(self, full: bool) -> None:
        """Read what changed, apply it, drain what it pauses, report the version applied."""
        conn = self._conn
        assert conn is not None
        started = time.monotonic()
        async with asyncio.timeout(self._op_timeout):
            new = await views.read(conn, None if full else self.view)
        old = self.view
        if new is not old:
            paused = {t for t, e in new.tenants.items()
                      if e.state == "moving" and (old is None or old.tenants.get(t) is None
                                                  or old.tenants[t].state != "moving"
                                                  or old.tenants[t].cluster != e.cluster)}
            self.view = new
            self._apply(new)
            if paused:
                await self._drain(paused)
        self.confirmed_at = started
        self._registered = True
        async with asyncio.timeout(self._op_timeout):
            await conn.execute(
                f"INSERT INTO {SCHEMA}.instances (id, address, applied_version) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), applied_version = $3, address = $2",
                self.id, self.address, new.version)
            self.fleet_size = max(1, int(await conn.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.instances WHERE heartbeat_at > now() - make_interval(secs => $1)",
                float(self.cfg.lease_s))))
