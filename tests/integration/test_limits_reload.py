"""Limits through the real stack, and live tuning: reload, per-tenant limits, pool report."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
import yaml

from proxy.http.app import start_gateway
from proxy.policy.auth import hash_key
from proxy.tools.devstack import free_port

from ..fix_gateway import KEY_A, KEY_ANY, KEY_B, TENANT_A, TENANT_B, Api, base_config, merge
from ..fix_stack import Stack
from .test_metrics import sample, scrape


async def test_rate_limit_answers_429_with_retry_after(gateway_with: Any) -> None:
    async with gateway_with(tenants={TENANT_A: {"rate_per_s": 0.5, "burst": 2}}) as api:
        assert [(await api.query("SELECT 1")).status for _ in range(2)] == [200, 200]
        r = await api.query("SELECT 1")
        assert r.status == 429 and r.code == "rate_limited" and r.headers["Retry-After"] == "2"
        assert r.body["error"]["retryable"] is True
        assert (await api.query("SELECT 1", key=KEY_B)).status == 200  # other tenants unaffected
        assert sample(await scrape(api), "tenant_proxy_rejected_total", tenant=TENANT_A, reason="rate") == 1


async def test_concurrency_queue_and_its_timeout(gateway_with: Any) -> None:
    limits = {"max_concurrency": 1, "queue_timeout_ms": 300}
    async with gateway_with(tenants={TENANT_A: limits}) as api:
        slow = asyncio.create_task(api.query("SELECT pg_sleep(1)"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        r = await api.query("SELECT 1")
        waited = time.monotonic() - started
        assert r.status == 503 and r.code == "concurrency_limited" and r.headers["Retry-After"] == "1"
        assert 0.25 < waited < 0.9
        assert (await api.query("SELECT 1", key=KEY_B)).status == 200  # B is not behind A's cap
        assert (await slow).status == 200
    async with gateway_with(tenants={TENANT_A: {"max_concurrency": 1, "queue_timeout_ms": 3000}}) as api:
        slow = asyncio.create_task(api.query("SELECT pg_sleep(0.5)"))
        await asyncio.sleep(0.1)
        r = await api.query("SELECT 1")  # queued, then served
        assert r.status == 200 and (await slow).status == 200
        text = await scrape(api)
        assert sample(text, "tenant_proxy_pool_wait_seconds_bucket", tenant=TENANT_A, le="0.25") < \
            sample(text, "tenant_proxy_pool_wait_seconds_count", tenant=TENANT_A)


async def test_per_tenant_request_size(gateway_with: Any) -> None:
    async with gateway_with(tenants={TENANT_A: {"max_request_bytes": 200}}) as api:
        r = await api.query("SELECT $1::text", "x" * 500)
        assert r.status == 413 and r.code == "payload_too_large"
        assert (await api.query("SELECT $1::text", "x" * 500, key=KEY_B)).status == 200


async def test_runtime_limits_and_pool_report(gateway_with: Any) -> None:
    async with gateway_with() as api:
        r = await api.request("PUT", f"/admin/tenants/{TENANT_A}/limits", admin=True, key=None,
                              json={"max_rows": 2, "statement_timeout_ms": 800})
        assert r.status == 200 and r.body["limits"]["max_rows"] == 2
        q = await api.query("SELECT g FROM generate_series(1, 10) g")
        assert q.body["row_count"] == 2 and q.body["truncated"] is True
        assert (await api.query("SELECT g FROM generate_series(1, 10) g", key=KEY_B)).body["row_count"] == 10
        bad = await api.request("PUT", f"/admin/tenants/{TENANT_A}/limits", admin=True, key=None,
                                json={"max_rows": -1, "colour": "red"})
        assert bad.status == 400 and bad.code == "invalid_request"
        assert "limits.max_rows: must be >= 1, got -1" in bad.body["error"]["problems"]
        assert any(p.startswith("limits.colour: unknown key") for p in bad.body["error"]["problems"])
        cfg = await api.request("GET", "/admin/config", admin=True, key=None)
        assert cfg.body["runtime_overrides"][TENANT_A]["max_rows"] == 2
        assert cfg.body["tenants"][TENANT_A]["max_rows"] == 2
        text = str(cfg.body)
        assert "secret@" not in text and hash_key(KEY_A) not in text and "<redacted>" in text

        for _ in range(20):
            await api.query("SELECT 1", key=KEY_B)
        report = (await api.request("GET", "/admin/pool", admin=True, key=None)).body["pools"][0]
        assert report["pool"] == "primary" and report["max"] == 4
        assert report["inputs"]["transactions"] >= 20 and report["recommended_size"] >= 2
        assert report["acquire_wait_p99_s"] is not None and 0 <= report["utilisation"] <= 1


@pytest_asyncio.fixture
async def config_file(stack: Stack, tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base_config(stack)))
    yield path


async def test_reload_swaps_keys_and_limits_and_refuses_broken_files(stack: Stack, config_file: Path) -> None:
    from proxy.config import load_config

    running = await start_gateway(load_config(config_file, {}), config_file, {})
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, running)
            assert (await api.query("SELECT 1", key="new-key", tenant=TENANT_B)).status == 401
            in_flight = asyncio.create_task(api.query("SELECT pg_sleep(0.8)", key=KEY_A))
            await asyncio.sleep(0.2)

            cfg = merge(base_config(stack), {"tenants": {TENANT_A: {"max_rows": 3}},
                                             "database": {"pool_max_size": 6}})
            cfg["auth"]["api_keys"].append({"name": "new", "sha256": hash_key("new-key"), "tenant": TENANT_B})
            config_file.write_text(yaml.safe_dump(cfg))
            r = await api.request("POST", "/admin/reload", admin=True, key=None)
            assert r.status == 200 and r.body == {"status": "reloaded"}
            assert (await in_flight).status == 200  # finished on the pool it started on
            assert (await api.query("SELECT 1 AS x", key="new-key")).status == 200
            q = await api.query("SELECT g FROM generate_series(1, 10) g", key=KEY_A)
            assert q.body["row_count"] == 3
            assert running.gateway.database.stats().max == 6

            config_file.write_text("database: {pool_max_size: lots}\nauth: 7\n")
            r = await api.request("POST", "/admin/reload", admin=True, key=None)
            assert r.status == 400 and r.code == "config_invalid"
            assert "database.pool_max_size: must be an integer, got str" in r.body["error"]["problems"]
            assert (await api.query("SELECT 1", key="new-key")).status == 200  # old config still in force
            text = await scrape(api)
            assert sample(text, "tenant_proxy_config_reloads_total", result="ok") == 1
            assert sample(text, "tenant_proxy_config_reloads_total", result="error") == 1
    finally:
        await running.stop()


async def test_sighup_reloads_and_sigterm_stops_a_real_process(stack: Stack, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    cfg = merge(base_config(stack), {"server": {"port": port, "admin_port": admin_port}})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ})
    try:
        async with aiohttp.ClientSession() as http:
            async def status(key: str) -> int:
                async with http.post(f"http://127.0.0.1:{port}/v1/query", json={"sql": "SELECT 1"},
                                     headers={"Authorization": f"Bearer {key}", "X-Tenant-Id": TENANT_B}) as r:
                    return r.status

            for _ in range(100):
                try:
                    if await status(KEY_ANY) == 200:
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            assert await status("sighup-key") == 401
            cfg["auth"]["api_keys"].append({"name": "hup", "sha256": hash_key("sighup-key"), "tenants": ["*"]})
            path.write_text(yaml.safe_dump(cfg))
            proc.send_signal(signal.SIGHUP)
            for _ in range(50):
                if await status("sighup-key") == 200:
                    break
                await asyncio.sleep(0.1)
            assert await status("sighup-key") == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()
