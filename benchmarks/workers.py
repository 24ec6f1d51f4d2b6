"""`serve --workers 2` against one worker, at saturation (wrk, 32 connections, the throughput mix).

Not part of `make bench`:

    python -m benchmarks.workers [--rounds N] [--round-s S]

Two gateways on one stack, one with the default single process (A) and one with
`--workers 2` (B), taking turns for N rounds each (default 6 x 8 s); the median req/s of
each, B / A, and the gateways' CPU per request (every process of the tree), recorded in
benchmarks/RESULTS.md.

What it can and cannot show: on a machine with two cores that also runs PostgreSQL,
PgBouncer and wrk, a second worker has no free core to use: the gateway, the database
and the load generator already share the two.  There the figure shows what a second
worker *costs* (two event loops, two sets of pools, the kernel spreading connections),
not what it gains; B / A near 1 is the expected result, and well below 1 would be a
regression.  The gain (towards 2x while the gateway's process is the bottleneck)
needs a machine where the gateway has spare cores and the database does not share them.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from .ab_gateway import _option
from .harness import gateway_process, local_stack, record
from .loadtools import cpu_seconds_of, pid_of, write_requests, wrk
from .throughput import LIMITS, api_key_headers, gateway_body, mix

ROUND_S = 8
ROUNDS = 6


def _tree(pid: int) -> list[int]:
    """The process and its children (the workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


def _round(url: str, root: int, requests: Path, round_s: int) -> tuple[float, float]:
    """One wrk round: (req/s, CPU ms per request of every gateway process)."""
    pids = _tree(root)
    before = sum(cpu_seconds_of(p) for p in pids)
    rate = wrk(url, requests, duration_s=round_s).ok_per_s
    return rate, (sum(cpu_seconds_of(p) for p in pids) - before) * 1000 / max(rate * round_s, 1)


def _medians(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r for r, _ in rounds), statistics.median(c for _, c in rounds)


def main() -> None:
    args = sys.argv[1:]
    n, round_s = int(_option(args, "--rounds", ROUNDS)), int(_option(args, "--round-s", ROUND_S))
    with local_stack(pool_size=20) as stack, tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        work = Path(tmp)
        stack.psql("INSERT INTO events (tenant_id, event_type, data, created_at) "
                   "SELECT ('00000000-0000-4000-8000-' || lpad((100000000000 + g % 100 + 1)::text, 12, '0'))::uuid, "
                   "'type-' || (g % 10), jsonb_build_object('n', g), now() - (g || ' seconds')::interval "
                   "FROM generate_series(1, 50000) g")
        stack.psql("ANALYZE events")
        requests = write_requests(work / "requests.txt", [(gateway_body(e), api_key_headers(t))
                                                           for t, e in mix(300, 1)])
        # 10 connections per worker: B opens as many to PgBouncer as A
        a_port, _ = servers.enter_context(gateway_process(stack, work, defaults=LIMITS,
                                                          database={"pool_min_size": 20, "pool_max_size": 20}))
        b_port, _ = servers.enter_context(gateway_process(
            stack, work, defaults=LIMITS, extra_args=("--workers", "2"),
            database={"pool_min_size": 10, "pool_max_size": 10}))
        a_root = pid_of("proxy", "serve", f"gateway-{a_port}.yaml")
        b_root = pid_of("proxy", "serve", f"gateway-{b_port}.yaml", "--workers")
        urls = {p: f"http://127.0.0.1:{p}/v1/query" for p in (a_port, b_port)}
        for url in urls.values():
            wrk(url, requests, duration_s=3)
        a_rounds, b_rounds = [], []
        for _ in range(n):
            a_rounds.append(_round(urls[a_port], a_root, requests, round_s))
            b_rounds.append(_round(urls[b_port], b_root, requests, round_s))
    (a_rate, a_cpu), (b_rate, b_cpu) = _medians(a_rounds), _medians(b_rounds)
    print(f"1 worker: {a_rate:.0f} req/s, {a_cpu:.3f} ms CPU/request; rounds {[round(r) for r, _ in a_rounds]}")
    print(f"2 workers: {b_rate:.0f} req/s, {b_cpu:.3f} ms CPU/request; rounds {[round(r) for r, _ in b_rounds]}")
    print(f"2 / 1: {b_rate / a_rate:.3f} req/s")
    record("serve --workers 2 against one worker", f"""`python -m benchmarks.workers --rounds {n} --round-s {round_s}`:
one gateway as a single process (A) and one with `--workers 2` (B), the same 20 database
connections in all (B: 10 per worker), taking turns at saturation (wrk, 32 connections,
the throughput mix); medians of {n} rounds of {round_s} s.

| | req/s | gateway CPU ms / request (every process) |
|---|---|---|
| A: 1 worker | {a_rate:.0f} | {a_cpu:.3f} |
| B: `--workers 2` | {b_rate:.0f} | {b_cpu:.3f} |
| **B / A** | **{b_rate / a_rate:.3f}** | **{b_cpu / a_cpu:.3f}** |

Machine: {os.cpu_count()} cores shared by the gateway, PostgreSQL, PgBouncer and wrk. With two
cores a second worker has no core of its own: this measures what the second worker costs,
not what it gains (B / A near 1 is expected; well below 1 would be a regression). The gain,
towards 2x while the gateway process is the bottleneck, needs a host where the gateway has
spare cores that the database and the load generator do not use.
""")


if __name__ == "__main__":
    main()
