"""A pool of connections to PgBouncer, and how a tenant transaction gets one (the
transaction itself: transaction.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import asyncpg

from ..config import DatabaseConfig
from ..errors import POOL_TIMEOUT
from ..observe.pools import PoolStats
from ..observe.trace import RequestTrace
from . import _asyncpg
from .classify import DATABASE_ERRORS, Context, Phase, classify
from .connection import GatewayConnection, init_connection, no_reset
from .transaction import Outcome, TxRequest, run_tenant_tx
from .wire import connect

log = logging.getLogger("tenant_proxy.db")

_UNREACHABLE: tuple[type[BaseException], ...] = (TimeoutError, *DATABASE_ERRORS)


class Pool:
    """One pool of connections to PgBouncer (a cluster's primary, or one of its replicas),
    and the way a tenant transaction gets one of them."""

    def __init__(self, cfg: DatabaseConfig, guc: str, name: str = "primary") -> None:
        self.cfg = cfg
        self.guc = guc
        self.name = name
        self.pool: asyncpg.Pool | None = None
        self.waiting = 0
        self.timeouts = 0
        # (finished at, pool wait, transaction time) of recent transactions, for /admin/pool.
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=20000)

    def stats(self) -> PoolStats:
        pool = self.pool
        size = pool.get_size() if pool is not None else 0
        idle = pool.get_idle_size() if pool is not None else 0
        return PoolStats(name=self.name, size=size, idle=idle, max=self.cfg.pool_max_size, waiting=self.waiting,
                         timeouts=self.timeouts)

    async def start(self) -> None:
        kwargs: dict[str, Any] = dict(
            dsn=self.cfg.dsn, max_size=self.cfg.pool_max_size, statement_cache_size=0,
            timeout=self.cfg.connect_timeout_ms / 1000, init=init_connection, reset=no_reset,
            connection_class=GatewayConnection, connect=connect,
            max_inactive_connection_lifetime=300.0,
        )
        try:
            self.pool = await asyncpg.create_pool(min_size=self.cfg.pool_min_size, **kwargs)
            async with self.pool.acquire():  # with min_size 0, still check the role once now
                pass
        except _UNREACHABLE as exc:
            # Start anyway and report not-ready; connections are made on demand once the database is back.
            log.warning("database not reachable at start-up (%s); starting with an empty pool",
                        type(exc).__name__)
            if self.pool is not None:
                await self.pool.close()
            self.pool = await asyncpg.create_pool(min_size=0, **kwargs)

    async def close(self) -> None:
        """Close every connection of the pool."""
        if self.pool is not None:
            await self.pool.close()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """A real round trip through PgBouncer."""
        assert self.pool is not None
        try:
            async with asyncio.timeout(timeout_s), self.pool.acquire() as conn:
                return bool(await conn.fetchval("SELECT 1"))
        except _UNREACHABLE:
            return False

    async def run_in_tenant_tx(self, tx: TxRequest, trace: RequestTrace) -> Outcome:
        """Run ``tx.statements`` in one transaction confined to ``tx.tenant_id``; all or nothing."""
        assert self.pool is not None
        started = time.perf_counter()
        self.waiting += 1
        try:
            timeout = None if _asyncpg.pool_has_connected_idle(self.pool) else self.cfg.acquire_timeout_ms / 1000
            conn = await self.pool.acquire(timeout=timeout)
        except Exception as exc:
            error = classify(exc, Context(Phase.ACQUIRE)).error
            if error is None:
                raise
            if error.kind is POOL_TIMEOUT:
                self.timeouts += 1
            raise error from None
        finally:
            self.waiting -= 1
            trace.wait_s = time.perf_counter() - started
        started = time.perf_counter()
        # The request works on the connection itself: each call through the pool's proxy
        # costs a check and an indirection.  Only the release goes through the proxy.
        raw: GatewayConnection = _asyncpg.connection_of(conn)
        writer = raw.gateway_writer
        if writer is not None:
            writer.arm_read_limit(tx.read_limit)
        try:
            return await run_tenant_tx(raw, writer, tx, self.guc)
        finally:
            done = time.perf_counter()
            trace.db_s = done - started
            self.recent.append((time.monotonic(), trace.wait_s or 0.0, trace.db_s))
            if writer is not None:
                writer.front = None  # a prefix that never went out (the request failed first)
                writer.read_limit = 0
            await _asyncpg.release(self.pool, conn, self.cfg.acquire_timeout_ms / 1000)


async def connect_direct(dsn: str, timeout_s: float = 10.0) -> asyncpg.Connection:
    """One plain connection (for the CLI's catalog reads); safe through PgBouncer."""
    return await asyncpg.connect(dsn, statement_cache_size=0, timeout=timeout_s)
