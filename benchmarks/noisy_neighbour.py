"""Noisy neighbour (issue 5): nine quiet tenants at a steady rate while one tenant floods.

Through the real stack (PgBouncer pool 20, gateway pool 20, gateway in its own process).
Quiet tenants send open-loop (fixed schedule; latency counted from the scheduled send
time, so a stalled gateway cannot hide its queueing).  The flooder runs 80 closed-loop
workers of `SELECT pg_sleep(0.05)`.  Three runs: no flood; flood with no per-tenant
limits (the fair scheduler still applies); flood with the flooder capped
(max_concurrency 4).  Goal: quiet p99 with the flood and limits within 1.5x of no flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from .harness import BENCH_KEY, gateway_process, local_stack, percentile, record, run

QUIET = [str(uuid.UUID(int=i + 1, version=4)) for i in range(9)]
FLOODER = str(uuid.UUID(int=999, version=4))
QUIET_RATE = 40          # requests/s per quiet tenant
DURATION_S = 8.0
FLOOD_WORKERS = 80
QUIET_SQL = "SELECT count(*) FROM generate_series(1, 100)"


async def _post(http: aiohttp.ClientSession, url: str, tenant: str, sql: str) -> int:
    async with http.post(url, json={"sql": sql}, headers={"Authorization": f"Bearer {BENCH_KEY}",
                                                          "X-Tenant-Id": tenant}) as r:
        await r.read()
        return r.status


async def scenario(port: int, flood: bool) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/query"
    latencies: list[float] = []
    errors = 0
    flood_done = 0
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def flooder() -> None:
            nonlocal flood_done
            while not stop.is_set():
                await _post(http, url, FLOODER, "SELECT pg_sleep(0.05)")
                flood_done += 1

        async def one(tenant: str, due: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            status = await _post(http, url, tenant, QUIET_SQL)
            if status == 200:
                latencies.append(time.perf_counter() - due)
            else:
                errors += 1

        floods = [asyncio.create_task(flooder()) for _ in range(FLOOD_WORKERS if flood else 0)]
        await asyncio.sleep(1.0 if flood else 0)  # let the flood fill the pool first
        start = time.perf_counter()
        interval = 1 / QUIET_RATE
        tasks = [asyncio.create_task(one(t, start + i * interval + k * interval / len(QUIET)))
                 for i in range(int(DURATION_S * QUIET_RATE)) for k, t in enumerate(QUIET)]
        await asyncio.gather(*tasks)
        stop.set()
        for f in floods:
            f.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await f
    return {"p50": percentile(latencies, 0.5) * 1000, "p99": percentile(latencies, 0.99) * 1000,
            "n": len(latencies), "errors": errors, "flood_rps": flood_done / DURATION_S}


async def main() -> None:
    results = {}
    with local_stack(pool_size=20) as stack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with gateway_process(stack, work) as (port, _):
            await scenario(port, flood=False)  # warm-up
            results["no flood"] = await scenario(port, flood=False)
            results["flood, no per-tenant limits"] = await scenario(port, flood=True)
        with gateway_process(stack, work, tenants={FLOODER: {"max_concurrency": 4, "queue_timeout_ms": 10000}}) \
                as (port, _):
            await scenario(port, flood=False)  # warm-up
            results["flood, flooder max_concurrency 4"] = await scenario(port, flood=True)
    base = results["no flood"]["p99"]
    lines = ["| scenario | quiet p50 | quiet p99 | p99 vs no flood | quiet errors | flood tx/s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['p50']:.1f} ms | {r['p99']:.1f} ms | {r['p99'] / base:.2f}x | "
                     f"{r['errors']} of {r['n'] + r['errors']} | {r['flood_rps']:.0f} |")
    limited = results["flood, flooder max_concurrency 4"]["p99"] / base
    body = "\n".join(lines) + (
        f"\n\nNine quiet tenants at {QUIET_RATE} req/s each (open loop, {DURATION_S:.0f} s), one flooder with "
        f"{FLOOD_WORKERS} closed-loop workers of `pg_sleep(0.05)`. PgBouncer and gateway pools of 20. "
        f"Goal: quiet p99 with the flood and limits on within 1.5x of no flood: **{limited:.2f}x**.")
    print(body)
    record("Noisy neighbour (issue 5)", body)


if __name__ == "__main__":
    run(main())
