"""Shared benchmark plumbing: a real stack, a running gateway, and result recording."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import resource
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from proxy.config import Settings, parse_config
from proxy.http.app import RunningGateway, start_gateway
from proxy.policy.auth import hash_key
from proxy.tools.devstack import LocalStack

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BENCH_KEY = "bench-any-tenant-key"


@contextlib.contextmanager
def local_stack(pool_size: int = 20) -> Iterator[LocalStack]:
    root = Path(tempfile.mkdtemp(prefix="tenant-proxy-bench-"))
    stack = LocalStack(root, pool_size=pool_size)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def gateway_settings(stack: LocalStack, **overrides: Any) -> Settings:
    raw: dict[str, Any] = {
        "server": {"port": 0, "admin_port": 0},
        "database": {"dsn": stack.gateway_dsn, "pool_min_size": 4, "pool_max_size": 20},
        "auth": {"api_keys": [{"name": "bench", "sha256": hash_key(BENCH_KEY), "tenants": ["*"]}]},
        "logging": {"access_log": False},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw, os.environ)


@contextlib.asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(settings)
    try:
        yield running
    finally:
        await running.stop()


def rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(section: str, body: str) -> None:
    """Replace (or append) one ``## section`` of benchmarks/RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by `make bench`.\n"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = f"## {section}\n\n_Measured {stamp} on {os.cpu_count()} cores._\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def run(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro) if hasattr(uvloop, "run") else asyncio.run(coro)


@contextlib.contextmanager
def gateway_process(stack: LocalStack, workdir: Path, *, source: Path | None = None,
                    prepare: Callable[[Path], None] | None = None, extra_args: tuple[str, ...] = (),
                    **overrides: Any) -> Iterator[tuple[int, int]]:
    """Run `tenant-proxy serve` in its own process (so the load generator does not share its
    event loop or core); yields (port, admin_port).  ``source``: another checkout whose
    ``proxy`` package to run (benchmarks/ab_gateway.py --b-tree); ``prepare``: called with
    the config file before the gateway starts (to set up a control catalog); ``extra_args``:
    more `serve` arguments (``--workers 2``)."""
    import subprocess
    import sys
    import time
    import urllib.request

    import yaml

    from proxy.tools.devstack import free_port

    port, admin_port = free_port(), free_port()
    raw: dict[str, Any] = {
        "server": {"port": port, "admin_port": admin_port},
        # steady state: every connection opened up front (a new one costs a SCRAM exchange)
        "database": {"dsn": stack.gateway_dsn, "pool_min_size": 20, "pool_max_size": 20},
        "auth": {"api_keys": [{"name": "bench", "sha256": hash_key(BENCH_KEY), "tenants": ["*"]}]},
        "logging": {"access_log": False, "level": "WARNING"},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    config = workdir / f"gateway-{port}.yaml"
    config.write_text(yaml.safe_dump(raw))
    if prepare is not None:
        prepare(config)
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
    # stdout (the access log, when on) to a file, as a log shipper would read it
    with (workdir / f"gateway-{port}.out").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), *extra_args],
                                cwd=source, env=env, stdout=out)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        yield port, admin_port
    finally:
        proc.terminate()
        proc.wait(15)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
