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
    python -m benchmarks.ab_gateway --access-log [--rounds N] [--round-s S]
        B with the shipped default access log on (one JSON line per request, stdout to a
        file), A with it off: the log's cost, recorded as its own row in RESULTS.md;
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

from proxy.tools.devstack import RedisServer

from .harness import gateway_process, local_stack, record
from .loadtools import cpu_seconds_of, pid_of, write_requests, wrk
from .throughput import LIMITS, api_key_headers, gateway_body, mix

ROUND_S = 8
ROUNDS = 6


def _gateway_pid(port: int) -> int:
    """The process serving on ``port`` (harness.gateway_process names its config after the port)."""
    return pid_of("proxy", "serve", f"gateway-{port}.yaml")


def _round(url: str, pid: int, requests: Path, round_s: int = ROUND_S) -> tuple[float, float]:
    """One wrk round: (req/s, gateway CPU ms per request)."""
    before = cpu_seconds_of(pid)
    rate = wrk(url, requests, duration_s=round_s).ok_per_s
    return rate, (cpu_seconds_of(pid) - before) * 1000 / max(rate * round_s, 1)


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


def _flag(args: list[str], name: str) -> bool:
    if name in args:
        args.remove(name)
        return True
    return False


def _option(args: list[str], name: str, default: float) -> float:
    if name in args:
        i = args.index(name)
        value = float(args[i + 1])
        del args[i:i + 2]
        return value
    return default


def main() -> None:
    args = sys.argv[1:]
    b_tree = None
    catalog = _flag(args, "--catalog")
    access_log = _flag(args, "--access-log")
    use_redis = _flag(args, "--redis")
    rounds, round_s = int(_option(args, "--rounds", ROUNDS)), int(_option(args, "--round-s", ROUND_S))
    if args[:1] == ["--b-tree"] and len(args) > 1:
        b_tree, args = Path(args[1]).resolve(), args[2:]
    b_overrides: dict[str, Any] = _overrides(args)
    limits = {**LIMITS, **b_overrides.pop("defaults", {})}
    if access_log:
        b_overrides["logging"] = {"access_log": True, "level": "WARNING"}
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
            alone = [_round(a_url, _gateway_pid(a_port), requests) for _ in range(3)]
            print(f"gateway: {max(r for r, _ in alone):.0f} req/s (best of 3 x {ROUND_S} s), "
                  f"{statistics.median(c for _, c in alone):.3f} ms CPU per request (median)")
            return
        b_port, _ = servers.enter_context(gateway_process(stack, work, source=b_tree, defaults=limits,
                                                          prepare=prepare, **b_overrides))
        label = "access log on" if access_log else " ".join(sys.argv[1:])
        _compare(a_port, b_port, requests, label, rounds, round_s, record_as="Access log cost" if access_log else None)


def _compare(a_port: int, b_port: int, requests: Path, label: str, n: int, round_s: int,
             record_as: str | None) -> None:
    """A and B take turns for ``n`` rounds; print (and with ``record_as``, record) the medians."""
    a_url, b_url = (f"http://127.0.0.1:{p}/v1/query" for p in (a_port, b_port))
    for url in (a_url, b_url):
        wrk(url, requests, duration_s=3)
    a_pid, b_pid = _gateway_pid(a_port), _gateway_pid(b_port)
    a_rounds, b_rounds = [], []
    for _ in range(n):
        a_rounds.append(_round(a_url, a_pid, requests, round_s))
        b_rounds.append(_round(b_url, b_pid, requests, round_s))
    lines = []
    for name, rounds in (("A (as configured)", a_rounds), (f"B ({label})", b_rounds)):
        lines.append(f"{name}: {statistics.median(r for r, _ in rounds):.0f} req/s, "
                     f"{statistics.median(c for _, c in rounds):.3f} ms gateway CPU per request; "
                     f"rounds {[round(r) for r, _ in rounds]}")
    (a_rate, a_cpu), (b_rate, b_cpu) = ((statistics.median(r for r, _ in x), statistics.median(c for _, c in x))
                                        for x in (a_rounds, b_rounds))
    rate, cpu = b_rate / a_rate, b_cpu / a_cpu
    lines.append(f"B / A: {rate:.3f} req/s, {cpu:.3f} CPU per request")
    print("\n".join(lines))
    if record_as is not None:
        record(record_as, f"""`python -m benchmarks.ab_gateway --access-log --rounds {n} --round-s {round_s:g}`: one
gateway with `logging.access_log: false` (A) and one with the shipped default `true` (B,
stdout to a file), taking turns at saturation (wrk, 32 connections, the throughput mix).
Target: the log costs at most 3 % of throughput.

| | req/s (median) | gateway CPU ms / request |
|---|---|---|
| A: access log off | {a_rate:.0f} | {a_cpu:.3f} |
| B: access log on | {b_rate:.0f} | {b_cpu:.3f} |
| **cost of the access log** | **{(1 - rate) * 100:+.1f} %** | **{(cpu - 1) * 100:+.1f} %** |
""")

if __name__ == "__main__":
    main()
