"""Peak gateway RSS for one 100,000-row response, buffered vs streamed (issue 6, item 4).

"Before" is the gateway with streaming disabled (threshold above the result size), which
holds every row and the whole JSON body; "after" streams from a server-side cursor in
batches of 1,000 rows.  Peak RSS is the gateway process's VmHWM.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from .harness import BENCH_KEY, gateway_process, local_stack, record, run

ROWS = 100_000
SQL = ("SELECT g AS id, 'event ' || g AS event_type, jsonb_build_object('n', g, 'tag', 'x') AS data, "
       "now() AS created_at FROM generate_series(1, $1::int) g")


def _vm(port: int, field: str) -> float:
    pid = subprocess.run(["pgrep", "-f", f"gateway-{port}.yaml"], capture_output=True, text=True).stdout.split()[0]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


async def measure(port: int) -> tuple[float, float, float, int]:
    base_rss = _vm(port, "VmRSS")
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        async with http.post(f"http://127.0.0.1:{port}/v1/query", json={"sql": SQL, "params": [ROWS]},
                             headers={"Authorization": f"Bearer {BENCH_KEY}",
                                      "X-Tenant-Id": "00000000-0000-4000-8000-000000000001"}) as r:
            size = 0
            async for chunk in r.content.iter_chunked(1 << 16):
                size += len(chunk)
            assert r.status == 200
        elapsed = time.perf_counter() - started
    return base_rss, _vm(port, "VmHWM"), elapsed, size


async def main() -> None:
    rows = {}
    limits: dict[str, Any] = {"defaults": {"max_rows": ROWS, "max_response_bytes": 1 << 30}}
    with local_stack() as stack, tempfile.TemporaryDirectory() as tmp:
        for name, threshold in (("buffered (before)", ROWS + 1), ("streamed (after)", 1000)):
            with gateway_process(stack, Path(tmp), server={"stream_threshold_rows": threshold}, **limits) as (port, _):
                rows[name] = await measure(port)
    lines = ["| response | gateway RSS before | peak RSS | time | body |", "|---|---|---|---|---|"]
    for name, (base, peak, elapsed, size) in rows.items():
        lines.append(f"| {name} | {base:.0f} MiB | {peak:.0f} MiB | {elapsed:.2f} s | {size / 1e6:.1f} MB |")
    body = "\n".join(lines) + f"\n\nOne `/v1/query` returning {ROWS:,} rows (id, text, jsonb, timestamptz)."
    print(body)
    record("Streaming a 100,000-row response (issue 6)", body)


if __name__ == "__main__":
    run(main())
