"""Quick A/B of the gateway alone at saturation (wrk, 32 connections), for one change at a time.

Not part of `make bench`.  Two ways:

    python -m benchmarks.ab_gateway
        the current code alone: best of three 8 s rounds (run before and after a change);
    python -m benchmarks.ab_gateway database.pool_max_size=10 [section.key=value ...]
    python -m benchmarks.ab_gateway --b-tree /path/to/other/checkout [section.key=value ...]
    python -m benchmarks.ab_gateway --catalog
        B with a control catalog (control.dsn on the stack's database, every tenant of the
        mix registered), to show that the request path does not pay for it;
    python -m benchmarks.ab_gateway --redis [defaults.rate_per_s=100 defaults.burst=100]
        B with the fleet's rate limits in a Redis of its own (limits.redis_url); `defaults.*`
        overrides go to both gateways (a lower rate means smaller leases: more round trips);
        two gateways on the same stack, the second with those config overrides or that
        checkout's code (`git worktree add /tmp/before HEAD~1`), taking turns for six 8 s
        rounds each: the median of each, and B / A.  Turns cancel most of the drift a
        busy two-core machine shows between runs minutes apart (+-5 % and more).

Beside req/s, each round reports the gateway process's own CPU time per request (user +
system, from /proc): a steadier figure than throughput on a machine whose other processes
come and go, and the one that says whether a change made the gateway's Python cheaper.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from proxy.devstack import RedisServer

from .harness import gateway_process, local_stack
from .loadtools import cpu_seconds_of, pid_of, write_requests, wrk
from .throughput import LIMITS, api_key_headers, gateway_body, mix

ROUND_S = 8


def _gateway_pid(port: int) -> int:
    """The process serving on ``port`` (harness.gateway_process names its config after the port)."""
    return pid_of("proxy", "serve", f"gateway-{port}.yaml")


def _round(url: str, pid: int, requests: Path) -> tuple[float, float]:
    """One wrk round: (req/s, gateway CPU ms per request)."""
    before = cpu_seconds_of(pid)
    rate = wrk(url, requests, duration_s=ROUND_S).ok_per_s
    return rate, (cpu_seconds_of(pid) - before) * 1000 / max(rate * ROUND_S, 1)


def _overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arg in args:
        path, _, value = arg.partition("=")
        section, _, key = path.partition(".")
        if not (section and key and value):
            raise SystemExit(f"ab_gateway: expected section.key=value, got {arg!r}")
        out.setdefault(section, {})[key] = yaml.safe_load(value)
    return out


def _catalog(stack: Any, config: Path) -> None:
    """Create the control catalog and register the benchmark's tenants in it."""
    subprocess.run([sys.executable, "-m", "proxy", "control", "init", "--config", str(config)], check=True)
    stack.psql("WITH v AS (UPDATE tenant_proxy.meta SET version = version + 1 RETURNING version) "
               "INSERT INTO tenant_proxy.tenants (id, version) "
               "SELECT ('00000000-0000-4000-8000-' || lpad((100000000000 + g)::text, 12, '0')), v.version "
               "FROM generate_series(1, 100) g, v ON CONFLICT DO NOTHING")


def main() -> None:
    args = sys.argv[1:]
    b_tree = None
    catalog = args[:1] == ["--catalog"]
    if catalog:
        args = args[1:]
    use_redis = args[:1] == ["--redis"]
    if use_redis:
        args = args[1:]
    if args[:1] == ["--b-tree"] and len(args) > 1:
        b_tree, args = Path(args[1]).resolve(), args[2:]
    b_overrides = _overrides(args)
    limits = {**LIMITS, **b_overrides.pop("defaults", {})}
    with local_stack(pool_size=20) as stack, tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        work = Path(tmp)
        if use_redis:
            redis = RedisServer(Path(tempfile.mkdtemp(prefix="tenant-proxy-bench-redis-")))
            redis.start()
            servers.callback(redis.stop)
            b_overrides["limits"] = {"redis_url": redis.url}
        stack.psql("INSERT INTO events (tenant_id, event_type, data, created_at) "
                   "SELECT ('00000000-0000-4000-8000-' || lpad((100000000000 + g % 100 + 1)::text, 12, '0'))::uuid, "
                   "'type-' || (g % 10), jsonb_build_object('n', g), now() - (g || ' seconds')::interval "
                   "FROM generate_series(1, 50000) g")
        stack.psql("ANALYZE events")
        requests = write_requests(work / "requests.txt", [(gateway_body(e), api_key_headers(t))
                                                           for t, e in mix(300, 1)])
        a_port, _ = servers.enter_context(gateway_process(stack, work, defaults=limits))
        a_url = f"http://127.0.0.1:{a_port}/v1/query"
        prepare = None
        if catalog:
            b_overrides["control"] = {"dsn": stack.admin_dsn}
            prepare = lambda config: _catalog(stack, config)  # noqa: E731
        if not b_overrides and b_tree is None:
            wrk(a_url, requests, duration_s=3)
            rounds = [_round(a_url, _gateway_pid(a_port), requests) for _ in range(3)]
            print(f"gateway: {max(r for r, _ in rounds):.0f} req/s (best of 3 x {ROUND_S} s), "
                  f"{statistics.median(c for _, c in rounds):.3f} ms CPU per request (median)")
            return
        b_port, _ = servers.enter_context(gateway_process(stack, work, source=b_tree, defaults=limits,
                                                          prepare=prepare, **b_overrides))
        b_url = f"http://127.0.0.1:{b_port}/v1/query"
        for url in (a_url, b_url):
            wrk(url, requests, duration_s=3)
        a_pid, b_pid = _gateway_pid(a_port), _gateway_pid(b_port)
        a_rounds, b_rounds = [], []
        for _ in range(6):
            a_rounds.append(_round(a_url, a_pid, requests))
            b_rounds.append(_round(b_url, b_pid, requests))
        for label, rounds in (("A (as configured)", a_rounds), (f"B ({' '.join(sys.argv[1:])})", b_rounds)):
            print(f"{label}: {statistics.median(r for r, _ in rounds):.0f} req/s, "
                  f"{statistics.median(c for _, c in rounds):.3f} ms gateway CPU per request; "
                  f"rounds {[round(r) for r, _ in rounds]}")
        rate = statistics.median(r for r, _ in b_rounds) / statistics.median(r for r, _ in a_rounds)
        cpu = statistics.median(c for _, c in b_rounds) / statistics.median(c for _, c in a_rounds)
        print(f"B / A: {rate:.3f} req/s, {cpu:.3f} CPU per request")


if __name__ == "__main__":
    main()
