"""Throughput vs pgbench (issue 6): what the gateway costs over talking to PgBouncer directly.

One run, one stack (PostgreSQL 15 + PgBouncer in transaction mode, pool 20), 32 clients
throughout, the same transaction everywhere, random tenant and event type each time::

    BEGIN; SET LOCAL app.tenant_id = '<tenant>'
    SELECT id, event_type, data, created_at FROM events WHERE event_type = $1 ORDER BY created_at DESC LIMIT 10
    COMMIT

on a 500,000-row `events` table (100 tenants, 10 event types, created_at over the last
120 days) with forced RLS (over its monthly partitions, where the schema has them).  Every
server runs in its own process and stays up for the whole run.
Back to back:

1. saturation (closed loop, 15 s each after a 3 s warm-up): pgbench straight into
   PgBouncer; wrk into the bare reference server (benchmarks/bare_reference.py), into the
   gateway with an API key (the request as the issue states it, and again with
   `"read_only": true`, as a reading client sends it), and into the gateway with
   per-tenant JWTs;
2. latency at 25/50/75% of the gateway's (API key) ceiling, 10 s each, the four paths
   taking turns at each rate, three rounds (the median p50 and p99 count; every round's
   p99 is written down too): pgbench -R into PgBouncer, hey into the bare server and
   into the gateway, with and without `read_only` (see loadtools.hey for why it is 32
   staggered hey processes);
3. the gateway's RSS after that, and after 10,000 distinct tenants each sent a request.

Targets: gateway >= 0.5x pgbench and >= 1.0x bare; p99 added over pgbench at 50% <= 2 ms;
RSS <= 150 MB with 10,000 tenants seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from proxy.tools.devstack import REPO, LocalStack

from .bare_reference import SQL
from .harness import BENCH_KEY, gateway_process, local_stack, record, run
from .loadtools import (
    Latency,
    Pgbench,
    bare_reference_process,
    cpu_snapshot,
    hey,
    machine_share,
    need,
    pid_of,
    require_ready,
    rss_mb_of,
    status_codes,
    write_requests,
    wrk,
)

ROWS = 500_000
TENANT_COUNT = 100
EVENT_TYPES = [f"ev_{i}" for i in range(10)]
CLIENTS, THREADS = 32, 2
SATURATION_S, LATENCY_S, WARMUP_S = 15, 10, 3
ROUNDS = 2  # saturation rounds per path
LAT_ROUNDS = 3  # latency rounds per path and rate: one stall on a busy 2-core machine can own a 10 s p99
SHARES = (0.25, 0.50, 0.75)
DISTINCT_TENANTS = 10_000
DAYS = 120  # created_at over the last 120 days: the monthly partitions pg_partman keeps, if events has them
PREBUILT = 300  # requests in each wrk request file, sent round-robin
JWT_SECRET = "throughput-benchmark-hs256-secret-0123456789"
# Generous per-tenant limits: the rate and concurrency code paths run but never refuse.
LIMITS = {"rate_per_s": 100_000, "burst": 100_000, "max_concurrency": CLIENTS}


def tenant_id(n: int) -> str:
    """Tenant n (1..100): 00000000-0000-4000-8000-1000000000NN, so pgbench can build it from a number."""
    return f"00000000-0000-4000-8000-{100_000_000_000 + n}"


TENANTS = [tenant_id(n) for n in range(1, TENANT_COUNT + 1)]

LOAD_SQL = f"""
INSERT INTO events (id, tenant_id, event_type, data, metadata, created_at)
SELECT md5('event-' || g)::uuid,
       ('00000000-0000-4000-8000-' || (100000000000 + g % {TENANT_COUNT} + 1))::uuid,
       'ev_' || (g / {TENANT_COUNT}) % {len(EVENT_TYPES)},
       jsonb_build_object('n', g, 'amount', (g * 7) % 1000, 'source', (ARRAY['web', 'api', 'import'])[g % 3 + 1]),
       NULL,
       date_trunc('day', now()) - ((g::bigint * 7919) % ({DAYS} * 86400)) * interval '1 second'
FROM generate_series(1, {ROWS}) AS g;
ANALYZE events;
"""

# pgbench: the same three round trips as the gateway and the bare server (-M simple: `\\;` joins BEGIN and
# SET LOCAL into one query).  Tenant and event type are substituted into the text before sending.
PGBENCH_SCRIPT = f"""\\set tid 100000000000 + random(1, {TENANT_COUNT})
\\set ev random(0, {len(EVENT_TYPES) - 1})
BEGIN \\; SET LOCAL app.tenant_id = '00000000-0000-4000-8000-:tid';
{SQL.replace("$1", "'ev_:ev'")};
COMMIT;
"""


def say(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gateway_body(event_type: str, read_only: bool = False) -> bytes:
    """The read as the issue states it (a read-write transaction), or as a reading client would send it
    (`"read_only": true`: BEGIN READ ONLY, which lets the COMMIT travel with the query)."""
    body: dict[str, Any] = {"sql": SQL, "params": [event_type]}
    if read_only:
        body["read_only"] = True
    return orjson.dumps(body)


def bare_body(tenant: str, event_type: str) -> bytes:
    return orjson.dumps({"tenant": tenant, "event_type": event_type})


def api_key_headers(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {BENCH_KEY}", "X-Tenant-Id": tenant}


def sign_tokens() -> dict[str, str]:
    exp = int(time.time()) + 3600
    return {t: jwt.encode({"sub": "bench", "tenant_id": t, "exp": exp}, JWT_SECRET, algorithm="HS256")
            for t in TENANTS}


def mix(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(TENANTS), rng.choice(EVENT_TYPES)) for _ in range(n)]


async def distinct_tenants(port: int, n: int) -> Counter[int]:
    """Each of n random tenants sends one request (BENCH_KEY + X-Tenant-Id), 32 at a time."""
    rng = random.Random(n)
    url = f"http://127.0.0.1:{port}/v1/query"
    codes: Counter[int] = Counter()
    sem = asyncio.Semaphore(CLIENTS)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as http:
        async def one(tenant: str, event_type: str) -> None:
            async with sem, http.post(url, data=gateway_body(event_type), headers={
                    **api_key_headers(tenant), "Content-Type": "application/json"}) as r:
                await r.read()
                codes[r.status] += 1

        await asyncio.gather(*(one(str(uuid.UUID(int=rng.getrandbits(128), version=4)), rng.choice(EVENT_TYPES))
                               for _ in range(n)))
    return codes


def non2xx(codes: Counter[str] | dict[str, int]) -> dict[str, int]:
    return {c: n for c, n in sorted(codes.items()) if not c.startswith("2") and n}


def median_latency(runs: list[Latency]) -> Latency:
    """The median p50 and the median p99 of several runs at one rate; achieved: their mean."""
    codes: Counter[str] = Counter()
    for run_ in runs:
        codes.update(run_.codes)
    return Latency(rate=runs[0].rate, achieved=statistics.mean(x.achieved for x in runs),
                   p50_ms=statistics.median(x.p50_ms for x in runs), p99_ms=statistics.median(x.p99_ms for x in runs),
                   codes=dict(codes))


def code_version() -> str:
    """The commit under test, and whether proxy/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "proxy"], capture_output=True, text=True,
                               cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes in proxy/" if dirty else "")


def benchmark(stack: LocalStack, work: Path) -> dict[str, Any]:
    r: dict[str, Any] = {"errors": {}, "version": code_version()}
    started = time.perf_counter()
    stack.psql(LOAD_SQL)
    r["load_s"] = time.perf_counter() - started
    # As pgbench does before its runs: no autovacuum of the fresh rows, nor a checkpoint of
    # the load, landing in the middle of a measurement.
    stack.psql("VACUUM events")
    stack.psql("CHECKPOINT")
    parts = stack.psql("SELECT count(*) FROM pg_catalog.pg_inherits WHERE inhparent = 'public.events'::regclass")
    r["layout"] = f"partitioned ({int(parts)} partitions)" if int(parts) else "a plain table"
    say(f"loaded {ROWS:,} events in {r['load_s']:.1f} s; events is {r['layout']}")
    script = work / "tenant_tx.sql"
    script.write_text(PGBENCH_SCRIPT)
    pgbench = Pgbench(stack, script, work)
    tokens = sign_tokens()
    jwt_auth = {"jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET, "tenant_claim": "tenant_id"}}
    postmaster = int((stack.data / "postmaster.pid").read_text().split()[0])
    mine = (os.getpid(), postmaster)

    # Every server up for the whole run (an idle one costs nothing but 20 idle PgBouncer clients),
    # so the runs follow each other closely and the latency runs can take turns rate by rate.
    with contextlib.ExitStack() as servers:
        bare_port = servers.enter_context(bare_reference_process(stack))
        # The shipped defaults: the access log on (one JSON line per request, to a file here).
        shipped = {"access_log": True, "level": "WARNING"}
        gw_port, gw_admin = servers.enter_context(gateway_process(stack, work, defaults=LIMITS, logging=shipped))
        jwt_port, jwt_admin = servers.enter_context(gateway_process(stack, work, defaults=LIMITS, auth=jwt_auth,
                                                                    logging=shipped))
        require_ready(gw_admin)
        require_ready(jwt_admin)
        gw_pid = pid_of("proxy", "serve", str(work / f"gateway-{gw_port}.yaml"))
        bare_url, gw_url = f"http://127.0.0.1:{bare_port}/", f"http://127.0.0.1:{gw_port}/v1/query"
        before = {"API key": status_codes(gw_admin), "JWT": status_codes(jwt_admin)}
        files = {"bare": write_requests(work / "bare.requests",
                                        [(bare_body(t, e), {}) for t, e in mix(PREBUILT, seed=1)]),
                 "gateway": write_requests(work / "gateway.requests",
                                           [(gateway_body(e), api_key_headers(t)) for t, e in mix(PREBUILT, seed=2)]),
                 "gateway_ro": write_requests(work / "gateway_ro.requests",
                                              [(gateway_body(e, read_only=True), api_key_headers(t))
                                               for t, e in mix(PREBUILT, seed=4)]),
                 "jwt": write_requests(work / "jwt.requests",
                                       [(gateway_body(e), {"Authorization": f"Bearer {tokens[t]}"})
                                        for t, e in mix(PREBUILT, seed=3)])}
        urls = {"bare": bare_url, "gateway": gw_url, "gateway_ro": gw_url,
                "jwt": f"http://127.0.0.1:{jwt_port}/v1/query"}

        # 1. saturation: a warm-up each, then ROUNDS rounds taking turns; the best round counts
        #    (interference from anything else on the machine only ever lowers a figure).
        snap = cpu_snapshot(mine)
        pgbench.tps(CLIENTS, THREADS, WARMUP_S)
        for name in urls:
            wrk(urls[name], files[name], CLIENTS, THREADS, WARMUP_S)
        rounds: dict[str, list[float]] = {name: [] for name in ("pgbench", *urls)}
        for i in range(ROUNDS):
            rounds["pgbench"].append(pgbench.tps(CLIENTS, THREADS, SATURATION_S))
            say(f"round {i + 1}: pgbench {rounds['pgbench'][-1]:.0f} tps")
            for name in urls:
                sat = wrk(urls[name], files[name], CLIENTS, THREADS, SATURATION_S)
                rounds[name].append(sat.ok_per_s)
                say(f"round {i + 1}: {name} {sat.ok_per_s:.0f} ok/s ({sat.non2xx} non-2xx, "
                    f"{sat.socket_errors} socket errors)")
                if sat.non2xx or sat.socket_errors:
                    r["errors"][f"wrk: {name}, round {i + 1}"] = {"non-2xx": sat.non2xx,
                                                                  "socket error": sat.socket_errors}
        r["rounds"] = rounds
        r["tps"] = {name: max(values) for name, values in rounds.items()}
        r["machine_saturation"] = machine_share(snap, cpu_snapshot(mine))

        # 2. latency at fixed rates, taking turns at each rate
        snap = cpu_snapshot(mine)
        r["rates"] = [share * r["tps"]["gateway"] for share in SHARES]
        r["lat_pgbench"], r["lat_bare"], r["lat_gateway"], r["lat_gateway_ro"] = [], [], [], []

        def at_rate(name: str, rate: float, tenant: str, event_type: str) -> Latency:
            if name == "pgbench":
                return pgbench.latency(rate, CLIENTS, THREADS, LATENCY_S)
            if name == "bare":
                return hey(bare_url, bare_body(tenant, event_type), {}, rate, work, LATENCY_S, CLIENTS)
            return hey(gw_url, gateway_body(event_type, read_only=name == "gateway_ro"), api_key_headers(tenant),
                       rate, work, LATENCY_S, CLIENTS)

        r["lat_rounds"] = []
        for i, rate in enumerate(r["rates"]):
            tenant, event_type = TENANTS[(17 + 31 * i) % TENANT_COUNT], EVENT_TYPES[(3 + 7 * i) % len(EVENT_TYPES)]
            runs: dict[str, list[Latency]] = {"pgbench": [], "bare": [], "gateway": [], "gateway_ro": []}
            for _ in range(LAT_ROUNDS):
                for name in runs:
                    result = at_rate(name, rate, tenant, event_type)
                    say(f"{name} at {rate:.0f}/s: achieved {result.achieved:.0f}/s, p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms, {result.codes}")
                    runs[name].append(result)
                    if non2xx(result.codes):
                        r["errors"][f"{name} at {rate:.0f}/s"] = non2xx(result.codes)
            for name, results in runs.items():
                r[f"lat_{name}"].append(median_latency(results))
            r["lat_rounds"].append({name: [x.p99_ms for x in results] for name, results in runs.items()})
        r["machine_latency"] = machine_share(snap, cpu_snapshot(mine))
        for name, admin in (("API key", gw_admin), ("JWT", jwt_admin)):
            r["errors"][f"gateway ({name}) /metrics"] = non2xx(status_codes(admin) - before[name])

        # 3. memory
        r["rss_after_run"] = rss_mb_of(gw_pid)
        say(f"gateway RSS after the run: {r['rss_after_run']:.1f} MiB; now {DISTINCT_TENANTS:,} distinct tenants")
        t0 = time.perf_counter()
        codes = run(distinct_tenants(gw_port, DISTINCT_TENANTS))
        r["distinct_rps"] = DISTINCT_TENANTS / (time.perf_counter() - t0)
        r["errors"][f"{DISTINCT_TENANTS:,} distinct tenants"] = non2xx({str(k): v for k, v in codes.items()})
        r["rss_10k"] = rss_mb_of(gw_pid)
        say(f"gateway RSS after {DISTINCT_TENANTS:,} tenants: {r['rss_10k']:.1f} MiB")
    return r


def report(r: dict[str, Any], total_s: float) -> str:
    tps, rounds = r["tps"], r["rounds"]
    pg, bare = tps["pgbench"], tps["bare"]
    rows = [("pgbench -> PgBouncer (`-M simple`)", "pgbench"), ("wrk -> bare aiohttp + asyncpg", "bare"),
            ("wrk -> gateway, API key", "gateway"), ("wrk -> gateway, API key, `read_only`", "gateway_ro"),
            ("wrk -> gateway, JWT (HS256)", "jwt")]
    lines = [f"| path (32 clients, closed loop, {SATURATION_S} s) | tx/s | vs pgbench | vs bare | rounds |",
             "|---|---|---|---|---|"]
    lines += [f"| {label} | {tps[k]:.0f} | {tps[k] / pg:.2f}x | {tps[k] / bare:.2f}x | "
              f"{' / '.join(f'{v:.0f}' for v in rounds[k])} |" for label, k in rows]
    lines += ["", "| rate (share of gateway ceiling) | pgbench p50 / p99 | bare p50 / p99 | gateway p50 / p99 "
              "| gateway `read_only` p50 / p99 | p99 added over pgbench: gateway / `read_only` |",
              "|---|---|---|---|---|---|"]
    added: dict[str, list[float]] = {"gateway": [], "gateway_ro": []}
    for share, p, b, g, ro in zip(SHARES, r["lat_pgbench"], r["lat_bare"], r["lat_gateway"], r["lat_gateway_ro"],
                                  strict=True):
        added["gateway"].append(g.p99_ms - p.p99_ms)
        added["gateway_ro"].append(ro.p99_ms - p.p99_ms)
        lines.append(f"| {g.rate:.0f}/s ({share:.0%}) | {p.p50_ms:.2f} / {p.p99_ms:.2f} ms "
                     f"| {b.p50_ms:.2f} / {b.p99_ms:.2f} ms | {g.p50_ms:.2f} / {g.p99_ms:.2f} ms "
                     f"| {ro.p50_ms:.2f} / {ro.p99_ms:.2f} ms "
                     f"| {added['gateway'][-1]:+.2f} / {added['gateway_ro'][-1]:+.2f} ms |")
    targets = []
    for k, label in (("gateway", "gateway (API key)"), ("gateway_ro", "gateway (API key, `read_only`)")):
        targets += [(f"{label} / pgbench >= 0.5", tps[k] / pg >= 0.5, f"{tps[k] / pg:.2f}"),
                    (f"{label} >= 1.0x bare", tps[k] / bare >= 1.0, f"{tps[k] / bare:.2f}x"),
                    (f"{label}: p99 added over pgbench at 50% <= 2 ms", added[k][1] <= 2.0, f"{added[k][1]:+.2f} ms")]
    targets.append((f"RSS <= 150 MB with {DISTINCT_TENANTS:,} tenants seen", r["rss_10k"] <= 150,
                    f"{r['rss_10k']:.0f} MiB"))
    lines += ["", "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'PASS' if ok else 'FAIL'} |" for name, ok, value in targets]
    errors = {k: v for k, v in r["errors"].items() if v}
    error_text = "none." if not errors else "; ".join(
        f"{k}: " + ", ".join(f"{n} x {c}" for c, n in v.items()) for k, v in errors.items()) + "."
    if any("499" in v for v in errors.values()):
        error_text += (" (499: the client hung up before the answer; wrk closes its 32 connections with requests "
                       "in flight at the end of each run.)")
    achieved = ", ".join(f"{p.achieved:.0f}/{b.achieved:.0f}/{g.achieved:.0f}/{ro.achieved:.0f}"
                         for p, b, g, ro in zip(r["lat_pgbench"], r["lat_bare"], r["lat_gateway"],
                                                r["lat_gateway_ro"], strict=True))
    (sat_other, sat_steal), (lat_other, lat_steal) = r["machine_saturation"], r["machine_latency"]
    lines += [
        "",
        f"Gateway RSS (its own process, VmRSS): **{r['rss_after_run']:.0f} MiB** after the runs above (100 tenants), "
        f"**{r['rss_10k']:.0f} MiB** after {DISTINCT_TENANTS:,} distinct tenants each sent one request "
        f"(random ids, API key + X-Tenant-Id, {r['distinct_rps']:.0f} req/s).",
        "",
        f"- Code: {r['version']}. Data: {ROWS:,} events (100 tenants x 10 event types, created_at over the last "
        f"{DAYS} days; events is {r['layout']}), forced RLS, loaded set-based in {r['load_s']:.0f} s, then "
        "ANALYZE, VACUUM and a CHECKPOINT. The transaction everywhere: "
        "`BEGIN; SET LOCAL app.tenant_id`, the `event_type = $1 ORDER BY created_at DESC LIMIT 10` "
        "query, `COMMIT`; random tenant and event type each time. Round trips: pgbench 3 (`BEGIN \\; SET LOCAL`, "
        "the query, `COMMIT`), bare 4 (asyncpg adds Parse/Describe), gateway 3 (its prefix with the "
        "Parse/Describe, the query, the pool wall and `COMMIT`), gateway with `\"read_only\": true` 2 (the wall "
        "and `COMMIT` travel before the query's Sync: docs/tuning.md, \"Round trips per request\"). The gateway's "
        "prefix is `BEGIN [READ ONLY]` with `SET LOCAL` of the tenant and `statement_timeout`.",
        f"- One PgBouncer (transaction mode, pool 20); gateway and bare server pools of 20, each server in its own "
        f"process, all up for the whole run. {CLIENTS} clients everywhere. Gateway: guard, metrics and per-tenant "
        f"limits on (rate {LIMITS['rate_per_s']:,}/s, max_concurrency {LIMITS['max_concurrency']}: never refusing), "
        "access log on (the shipped default, written to a file); JWT run: one HS256 token per tenant.",
        f"- Saturation: pgbench `-M simple -c {CLIENTS} -j {THREADS} -T {SATURATION_S}` (`BEGIN \\; SET LOCAL` needs "
        f"the simple protocol); wrk `-c {CLIENTS} -t {THREADS} -d {SATURATION_S}s` over {PREBUILT} pre-built "
        f"requests (benchmarks/wrk_post.lua). A {WARMUP_S} s warm-up each, then {ROUNDS} rounds taking turns; tx/s "
        "is the best round (2xx answers only).",
        f"- Latency: {LATENCY_S} s per rate, the four paths taking turns at each rate, {LAT_ROUNDS} rounds; the "
        "table gives the median p50 and the median p99 of the rounds. Every round's p99 (ms), "
        "pgbench / bare / gateway / `read_only`: " + "; ".join(
            f"{share:.0%}: " + " / ".join(",".join(f"{v:.1f}" for v in rounds_[k])
                                          for k in ("pgbench", "bare", "gateway", "gateway_ro"))
            for share, rounds_ in zip(SHARES, r["lat_rounds"], strict=True)) + ". pgbench `-R rate -l`: "
        "service time (the log's latency minus its schedule lag, which is what hey measures). HTTP: 32 "
        "`hey -c 1 -q rate/32` processes started 1/rate apart (one `hey -c 32` sends its requests in bursts of 32), "
        "first and last second of each dropped; one tenant and event type per rate. Achieved rates "
        f"pgbench/bare/gateway/`read_only`: {achieved} per s.",
        "- Load generators, servers, PgBouncer and PostgreSQL share the machine's "
        f"{os.cpu_count()} cores; the HTTP load generators cost more CPU per request than pgbench's client. "
        f"Other processes on the machine used about {sat_other:.0%} of its CPU during the saturation runs and "
        f"{lat_other:.0%} during the latency runs; the hypervisor took {sat_steal:.0%} and {lat_steal:.0%}.",
        f"- Non-2xx and errors: {error_text}",
        f"- Whole benchmark: {total_s / 60:.1f} min.",
    ]
    return "\n".join(lines)


def main() -> None:
    for tool in ("wrk", "hey"):
        need(tool)
    started = time.perf_counter()
    root: Path | None = None
    try:
        with local_stack(pool_size=20) as stack, tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
            root = stack.root
            results = benchmark(stack, Path(tmp))
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)  # the stopped cluster: 500,000 rows are ~600 MB
    body = report(results, time.perf_counter() - started)
    print(body)
    record("Throughput vs pgbench (issue 6)", body)


if __name__ == "__main__":
    main()
