"""Read PgBouncer's admin console (SHOW POOLS / STATS_TOTALS / LISTS) for the metrics collector.

The console speaks only the simple query protocol, which asyncpg cannot use for
results; psycopg's plain cursor sends parameterless queries that way.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import psycopg


@dataclass(slots=True)
class Snapshot:
    up: bool
    pools: list[dict[str, Any]] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    lists: dict[str, float] = field(default_factory=dict)


async def _show(conn: psycopg.AsyncConnection[Any], what: str) -> list[dict[str, Any]]:
    cur = conn.cursor()
    await cur.execute(f"SHOW {what}".encode())
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


async def read(dsn: str, timeout_s: float) -> Snapshot:
    """One snapshot; PgBouncer down or slow gives ``Snapshot(up=False)``, never an exception."""
    try:
        async with asyncio.timeout(timeout_s):
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout_s)))
            try:
                pools = await _show(conn, "POOLS")
                stats = await _show(conn, "STATS_TOTALS")
                lists = {r["list"]: float(r["items"]) for r in await _show(conn, "LISTS")}
            finally:
                await conn.close()
    except (OSError, TimeoutError, psycopg.Error):
        return Snapshot(up=False)
    return Snapshot(up=True, pools=pools, stats=stats, lists=lists)
