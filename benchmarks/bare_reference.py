"""The yardstick for benchmarks/throughput.py: the least an HTTP front end to this query can do.

aiohttp + asyncpg + uvloop + orjson, one process, one route, and nothing else: no auth,
no SQL guard, no metrics, no limits, no access log.  Per request, through PgBouncer
(transaction mode), the same round trips as the gateway's data path::

    BEGIN; SET LOCAL app.tenant_id = '<uuid>'     -- one simple-protocol round trip
    SELECT ... WHERE event_type = $1 ...           -- extended protocol, unnamed statement
    COMMIT

    POST /  {"tenant": "<uuid>", "event_type": "ev_3"}  ->  {"rows": [{...}, ...]}

Run: python -m benchmarks.bare_reference --port 8099 --dsn postgresql://app:secret@127.0.0.1:6432/appdb
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import asyncpg
import orjson
import uvloop
from aiohttp import web

SQL = "SELECT id, event_type, data, created_at FROM events WHERE event_type = $1 ORDER BY created_at DESC LIMIT 10"
POOL = web.AppKey("pool", asyncpg.Pool)


async def _init(conn: asyncpg.Connection) -> None:
    # jsonb passes through as the database's text (as the gateway does), not as a JSON string.
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=str, decoder=orjson.Fragment, format="text")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Every request ends its own transaction; asyncpg's RESET ALL round trip is not needed."""


def _default(value: Any) -> str:
    return str(value)  # asyncpg's own UUID type, which orjson does not know


async def query(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    tenant = str(uuid.UUID(body["tenant"]))  # canonical, so safe to inline
    async with request.app[POOL].acquire() as conn:
        await conn.execute(f"BEGIN; SET LOCAL app.tenant_id = '{tenant}'")
        rows = await conn.fetch(SQL, body["event_type"])  # on error, the pool's release rolls back
        await conn.execute("COMMIT")
    return web.Response(body=orjson.dumps({"rows": [dict(r) for r in rows]}, default=_default),
                        content_type="application/json")


async def serve(port: int, dsn: str, pool_size: int) -> None:
    app = web.Application()
    app[POOL] = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size, statement_cache_size=0,
                                            init=_init, reset=_no_reset)
    app.router.add_post("/", query)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()  # until SIGTERM
    finally:
        await runner.cleanup()
        await app[POOL].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--pool-size", type=int, default=20)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.dsn, args.pool_size))


if __name__ == "__main__":
    main()
