"""The online move (issue 20): tenants of 100,000 and 1,000,000 rows moved while a client
writes every 10 ms.

For each size: the move's total time, its write pause as the CLI reports it, the longest
stretch the writing client went without an acknowledged write, and the WAL the source
wrote during the move beside what the client's writes alone write in the same time (the
rate measured just before), with the most WAL the replication slot held back.  The
offline move (export, import, writes paused throughout) of the 100,000-row tenant is the
comparison.  Source and target are real clusters (the source with wal_level = logical),
the gateway runs in this process, the client writes with Idempotency-Keys.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from proxy.client import AsyncClient
from proxy.tools.devstack import LocalStack
from proxy.tools.move import MoveReport, move_tenant

from .harness import BENCH_KEY, gateway, gateway_settings, record, run

SIZES = (100_000, 1_000_000)
BASELINE_S = 5.0

FILL = """
INSERT INTO public.events (tenant_id, event_type, data, created_at)
SELECT $1::uuid, 'type-' || (g % 10), jsonb_build_object('n', g, 'text', repeat('x', 40 + g % 50)),
       now() - (g % 180) * interval '1 day'
FROM generate_series(1, $2::int) AS g
"""


async def _lsn(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))


async def _wal_since(conn: asyncpg.Connection, lsn: str) -> int:
    return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)", lsn))


class Writer:
    """Writes one row every 10 ms through the gateway, retrying as the client does."""

    def __init__(self, base: str, tenant: str) -> None:
        self.client = AsyncClient(base, BENCH_KEY, tenant=tenant, retries=1000, backoff_s=0.02, max_backoff_s=0.05)
        self.acked: list[float] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            await self.client.query("INSERT INTO events (event_type, data) VALUES ('live', "
                                    "jsonb_build_object('n', $1::int))", n)
            self.acked.append(time.monotonic())
            n += 1
            await asyncio.sleep(0.01)

    def longest_gap(self, start: float, end: float) -> float:
        times = [start, *(t for t in self.acked if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))


async def _measure(source: LocalStack, target: LocalStack, rows: int, offline: bool) -> dict[str, Any]:
    tenant = str(uuid.uuid4())
    admin = await asyncpg.connect(source.admin_dsn)
    try:
        await admin.execute(FILL, tenant, rows)
        await admin.execute("CHECKPOINT")
        settings = gateway_settings(source, database={"admin_dsn": source.admin_dsn},
                                    clusters={"eu": {"dsn": target.gateway_dsn, "admin_dsn": target.admin_dsn}})
        async with gateway(settings) as running:
            writer = Writer(f"http://127.0.0.1:{running.port}", tenant)
            task = asyncio.create_task(writer.run())
            lsn = await _lsn(admin)
            await asyncio.sleep(BASELINE_S)
            baseline_rate = await _wal_since(admin, lsn) / BASELINE_S
            held = 0

            watch = await asyncpg.connect(source.admin_dsn)  # its own: `admin` is used meanwhile

            async def watch_slot() -> None:
                nonlocal held
                while True:
                    value = await watch.fetchval("SELECT max(pg_wal_lsn_diff(pg_current_wal_insert_lsn(), "
                                                 "restart_lsn)) FROM pg_replication_slots")
                    held = max(held, int(value or 0))
                    await asyncio.sleep(0.2)

            watcher = asyncio.create_task(watch_slot())
            lsn, started = await _lsn(admin), time.monotonic()
            report: MoveReport = await move_tenant(settings, tenant, "eu",
                                                   f"http://127.0.0.1:{running.admin_port}",
                                                   say=lambda _: None, offline=offline)
            ended = time.monotonic()
            wal = await _wal_since(admin, lsn)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await watch.close()
            await asyncio.sleep(0.5)
            writer.stop.set()
            await task
            await writer.client.close()
    finally:
        await admin.close()
    return {"rows": rows, "offline": offline, "total_s": report.total_s, "pause_ms": report.pause_ms,
            "steps": report.steps_ms, "gap_s": writer.longest_gap(started, ended), "wal": wal,
            "writer_wal": baseline_rate * (ended - started), "slot_held": held}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


async def main() -> None:
    source = LocalStack(Path(tempfile.mkdtemp(prefix="tenant-proxy-bench-source-")), pool_size=10, logical=True)
    target = LocalStack(Path(tempfile.mkdtemp(prefix="tenant-proxy-bench-target-")), pool_size=10)
    source.start()
    try:
        target.start()
        try:
            started = time.monotonic()
            results = [await _measure(source, target, n, offline=False) for n in SIZES]
            results.append(await _measure(source, target, SIZES[0], offline=True))
            total = time.monotonic() - started
        finally:
            target.stop()
            shutil.rmtree(target.root, ignore_errors=True)
    finally:
        source.stop()
        shutil.rmtree(source.root, ignore_errors=True)
    lines = ["| tenant rows | move | total time | writes paused (CLI) | longest stretch without an acknowledged "
             "write | source WAL during the move | of which the writer's own | most WAL held by the slot |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {'offline' if r['offline'] else 'online'} | {r['total_s']:.1f} s | "
                     f"{r['pause_ms']:,.0f} ms | {r['gap_s'] * 1000:,.0f} ms | {_mib(r['wal'])} | "
                     f"{_mib(r['writer_wal'])} | {_mib(r['slot_held']) if not r['offline'] else '-'} |")
    steps = "; ".join(f"{r['rows']:,} rows: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} ms"
                                                          for k, v in r["steps"].items())
                      for r in results if not r["offline"])
    record("Online tenant move (issue 20)", "\n".join(lines) + f"""

The online move's cut-over, step by step ({steps}): pause and drain is the admin call
that pauses the tenant's writes and the wait for its write transactions in flight; catch
up is the wait for the subscription to confirm the source's WAL position taken after
the pause; verify counts the tenant's rows on both sides at once; then the target's
sequences and the flip with the resume.

- The longest stretch without an acknowledged write is what the writing client saw: a
  write that meets the pause waits in the gateway (`server.write_hold_s`) and runs on the
  target once the tenant is resumed there, so it is about the pause plus one write.
- The source's WAL during the move counts everything it wrote from the first step to
  the purge: the client's writes (the same client's rate over the {BASELINE_S:g} s before the
  move, times the move's length, in the next column), the publication and slot, and the
  purge of the tenant's rows at the end (the largest part: one DELETE of every row).  The
  slot holds WAL back only while the copy runs and catches up.
- Offline keeps the tenant's writes paused for the whole export, verification and import.
- Data: events with jsonb `data` (~100 bytes) over 180 days (monthly partitions), one
  tenant per row; source and target are local clusters on this machine, sharing its cores
  with the gateway and the client.
- Whole benchmark: {total / 60:.1f} min.
""")
    for r in results:
        print(r)


if __name__ == "__main__":
    run(main())
