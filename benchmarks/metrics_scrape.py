"""Scrape cost with 10,000 distinct tenants having sent traffic through the real gateway.

Target (issue 4): /metrics under 50 ms and under 300 KB with the default label limit (50).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid

import aiohttp

from .harness import BENCH_KEY, gateway, gateway_settings, local_stack, record, rss_mb, run

TENANTS = 10_000
SCRAPES = 50


async def main() -> None:
    with local_stack() as stack:
        async with gateway(gateway_settings(stack)) as gw:
            base = f"http://127.0.0.1:{gw.port}/v1/query"
            rng = random.Random(1)
            tenants = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(TENANTS)]
            rss_before = rss_mb()
            async with aiohttp.ClientSession() as http:
                sem = asyncio.Semaphore(32)

                async def one(tenant: str) -> None:
                    async with sem, http.post(base, json={"sql": "SELECT 1"}, headers={
                            "Authorization": f"Bearer {BENCH_KEY}", "X-Tenant-Id": tenant}) as r:
                        assert r.status == 200, await r.text()

                # every tenant once, then a Zipf-shaped tail so the heaviest 50 keep their series busy
                weights = [1 / (rank + 1) ** 1.1 for rank in range(TENANTS)]
                stream = tenants + rng.choices(tenants, weights=weights, k=2 * TENANTS)
                started = time.perf_counter()
                await asyncio.gather(*(one(t) for t in stream))
                traffic_s = time.perf_counter() - started
                timings, sizes = [], []
                for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
                    for _ in range(SCRAPES):
                        t0 = time.perf_counter()
                        async with http.get(f"http://127.0.0.1:{gw.admin_port}/metrics",
                                            headers={"Accept": accept}) as r:
                            body = await r.read()
                        timings.append((accept, time.perf_counter() - t0))
                        sizes.append((accept, len(body)))
            rss_after = rss_mb()
    lines = ["| format | scrape p50 | scrape max | size |", "|---|---|---|---|"]
    for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
        ts = [t for a, t in timings if a == accept]
        size = max(s for a, s in sizes if a == accept)
        lines.append(f"| {accept.split(';')[0]} | {statistics.median(ts) * 1000:.1f} ms | {max(ts) * 1000:.1f} ms "
                     f"| {size / 1024:.1f} KiB |")
    text = "\n".join(lines) + (
        f"\n\n{TENANTS} distinct tenants sent {len(stream)} requests (each tenant once, then Zipf-distributed; "
        f"{len(stream) / traffic_s:.0f} req/s while doing so), "
        f"then {SCRAPES} scrapes per format. Label limit 50 (default). Process RSS (gateway and load generator "
        f"in one process): {rss_before:.0f} MiB before the traffic, {rss_after:.0f} MiB after.")
    print(text)
    record("Scrape cost at 10,000 tenants (issue 4)", text)


if __name__ == "__main__":
    run(main())
