"""`tenant-proxy serve --workers 2` as a real process tree: one port, two worker processes that
both answer, /metrics counting every request once, SIGHUP reaching both, a dead worker
restarted, SIGTERM stopping all of them cleanly; each a fleet instance of its own; and
the refused worker counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from proxy.tools.devstack import free_port

from ..fix_gateway import KEY_A, TENANT_A, base_config, merge
from ..fix_stack import Stack
from ..integration.test_metrics import sample

QUERY = "/v1/query"


class Tree:
    """The supervisor process, its ports and its HTTP client (a new connection per request,
    so that the kernel spreads them over the workers)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin_port: int, http: aiohttp.ClientSession,
                 raw: dict[str, Any], config: Path) -> None:
        self.proc, self.port, self.admin_port, self.http, self.raw, self.config = \
            proc, port, admin_port, http, raw, config

    def children(self) -> set[int]:
        pid = self.proc.pid
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}

    async def query(self, sql: str = "SELECT 1") -> int:
        async with self.http.post(f"http://127.0.0.1:{self.port}{QUERY}", json={"sql": sql},
                                  headers={"Authorization": f"Bearer {KEY_A}"}) as r:
            await r.read()
            return r.status

    async def metrics(self) -> str:
        async with self.http.get(f"http://127.0.0.1:{self.admin_port}/metrics") as r:
            assert r.status == 200
            return await r.text()

    async def worker_requests(self) -> dict[int, float]:
        """Requests per worker pid, from the merged scrape."""
        out = {}
        for line in (await self.metrics()).splitlines():
            if line.startswith("tenant_proxy_worker_requests_total{"):
                labels, value = line.rsplit(" ", 1)
                out[int(labels.split('pid="')[1].split('"')[0])] = float(value)
        return out


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if await check():
                return
        except (aiohttp.ClientError, AssertionError, OSError):
            pass
        assert time.monotonic() < deadline, f"not within {seconds} s"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def tree(stack: Stack, tmp_path: Path, overrides: dict[str, Any] | None = None) -> AsyncIterator[Tree]:
    port, admin_port = free_port(), free_port()
    raw = merge(base_config(stack), {"server": {"port": port, "admin_port": admin_port, "drain_s": 0.5,
                                                "shutdown_timeout_s": 10}, **(overrides or {})})
    config = tmp_path / "workers.yaml"
    config.write_text(yaml.safe_dump(raw))
    with (tmp_path / "stdout").open("wb") as out, (tmp_path / "stderr").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers", "2"],
                                stdout=out, stderr=err)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            t = Tree(proc, port, admin_port, http, raw, config)
            await within(30, lambda: _scraped(t, 2))
            yield t
    finally:
        if proc.poll() is None:  # the test failed: stop the tree, the workers included
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _scraped(t: Tree, n: int) -> bool:
    return sample(await t.metrics(), "tenant_proxy_workers_scraped") == n


async def test_two_workers_one_port_counted_once_reloaded_restarted_and_stopped(stack: Stack,
                                                                                tmp_path: Path) -> None:
    async with tree(stack, tmp_path) as t:
        workers = t.children()
        assert len(workers) == 2 and t.proc.pid not in workers

        # 60 requests, each on a new connection: both workers take some; every scrape (whichever
        # worker answers it) counts each request exactly once
        assert [await t.query() for _ in range(60)] == [200] * 60
        for _ in range(4):
            text = await t.metrics()
            assert sample(text, "tenant_proxy_requests_total", tenant=TENANT_A, endpoint=QUERY, code="200") == 60
            assert sample(text, "tenant_proxy_request_duration_seconds_count", tenant=TENANT_A, endpoint=QUERY) == 60
            assert sample(text, "tenant_proxy_build_info", version="0.1.0") == 1
        per_worker = await t.worker_requests()
        assert set(per_worker) == workers and all(n > 0 for n in per_worker.values())
        assert sum(per_worker.values()) == 60

        # SIGHUP to the parent: both workers reload (a suspension applies through either)
        t.config.write_text(yaml.safe_dump(merge(t.raw, {"tenants": {TENANT_A: {"suspended": True}}})))
        before = await t.worker_requests()
        t.proc.send_signal(signal.SIGHUP)
        await within(10, lambda: _all_status(t, 403, 20))
        after = await t.worker_requests()
        assert all(after[pid] - before[pid] >= 1 for pid in workers)  # both answered 403s
        assert sample(await t.metrics(), "tenant_proxy_config_reloads_total", result="ok") == 2
        sent = 60 + int(sum(after.values()) - sum(before.values()))

        # a worker killed outright: logged and started again, the port keeps answering
        await asyncio.sleep(0.5)  # its access-log lines written (a SIGKILL loses those still queued)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        await within(20, lambda: _replaced(t, victim))
        assert await t.query() == 403
        sent += 1
        workers = t.children()

        # SIGTERM at once: every worker drains and exits, then the parent, with 0
        t.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(t.proc.wait, 30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err
    assert f"pid {victim}) exited unexpectedly with signal 9" in err
    # the access log: one whole line per request from the three workers, the last one (sent
    # just before SIGTERM, still queued then) included
    lines = [json.loads(x) for x in (tmp_path / "stdout").read_text().splitlines()]
    assert len(lines) == sent and {x["endpoint"] for x in lines} == {QUERY}
    assert sum(1 for x in lines if x["status"] == 403) >= 21  # the 20 in a row, and the one after the kill


async def _all_status(t: Tree, status: int, n: int) -> bool:
    return [await t.query() for _ in range(n)] == [status] * n


async def _replaced(t: Tree, victim: int) -> bool:
    children = t.children()
    return len(children) == 2 and victim not in children and await _scraped(t, 2)


async def test_each_worker_is_an_instance_of_the_fleet(stack: Stack, tmp_path: Path) -> None:
    name = f"control_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(stack.admin_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = stack.admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    try:
        cfg = tmp_path / "init.yaml"
        cfg.write_text(yaml.safe_dump(merge(base_config(stack), {"control": {"dsn": dsn}})))
        subprocess.run([sys.executable, "-m", "proxy", "control", "init", "--config", str(cfg)], check=True,
                       capture_output=True)
        async with tree(stack, tmp_path, {"control": {"dsn": dsn, "heartbeat_s": 0.3}}) as t:
            ids = [r["id"] for r in await _catalog(dsn, "SELECT id FROM tenant_proxy.instances")]
            assert len(ids) == 2 and len(set(ids)) == 2
            assert sorted(i.split("-w")[1][0] for i in ids) == ["0", "1"]
            assert {int(i.split("-w")[0].rsplit("-", 1)[1]) for i in ids} == t.children()
            t.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(t.proc.wait, 30) == 0
        assert await _catalog(dsn, "SELECT id FROM tenant_proxy.instances") == []  # both left the fleet
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def _catalog(dsn: str, sql: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


@pytest.mark.parametrize("workers", ["0", "-1", str((os.cpu_count() or 1) * 4 + 1)])
def test_a_refused_worker_count_is_a_clear_error(workers: str, stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(merge(base_config(stack), {"server": {"port": 18080, "admin_port": 18081}})))
    r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers", workers],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith(f"serve: --workers {workers}:"), r.stderr
    assert "Traceback" not in r.stderr


def test_several_workers_need_fixed_ports(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_config(stack)))  # port 0
    r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers", "2"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "needs fixed ports" in r.stderr and "Traceback" not in r.stderr
