"""Metrics through the real stack: exact counts, PgBouncer figures, a real Prometheus and promtool."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.tools.devstack import free_port

from ..fix_gateway import KEY_A, KEY_B, TENANT_A, TENANT_B, Api
from ..fix_stack import Stack


def sample(text: str, name: str, **labels: str) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{want} not in exposition")


async def scrape(api: Api) -> str:
    r = await api.request("GET", "/metrics", key=None, admin=True)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    return str(r.body)


async def test_known_traffic_gives_exact_counts(gateway_with: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tenant_proxy.access")
    async with gateway_with() as api:
        for _ in range(3):
            assert (await api.query("SELECT g FROM generate_series(1, 4) g", key=KEY_A)).status == 200
        for _ in range(2):
            assert (await api.query("SELECT 1", key=KEY_B)).status == 200
        assert (await api.query("SELECT 1", key="bad-key")).status == 401
        assert (await api.query("SET app.tenant_id = 'x'", key=KEY_A)).status == 400
        r = await api.query("SELECT $1::text AS secret_param", "hunter2", key=KEY_B)
        assert r.status == 200
        timing = r.headers["Server-Timing"]
        assert [p.split(";")[0] for p in timing.split(", ")] == ["auth", "guard", "wait", "db", "encode"]

        text = await scrape(api)
        q = "/v1/query"
        assert sample(text, "tenant_proxy_requests_total", tenant=TENANT_A, endpoint=q, code="200") == 3
        assert sample(text, "tenant_proxy_requests_total", tenant=TENANT_B, endpoint=q, code="200") == 3
        assert sample(text, "tenant_proxy_requests_total", tenant="__none__", endpoint=q, code="401") == 1
        assert sample(text, "tenant_proxy_requests_total", tenant=TENANT_A, endpoint=q, code="400") == 1
        assert sample(text, "tenant_proxy_rejected_total", tenant="__none__", reason="auth") == 1
        assert sample(text, "tenant_proxy_rejected_total", tenant=TENANT_A, reason="guard") == 1
        assert sample(text, "tenant_proxy_rows_returned_total", tenant=TENANT_A) == 12
        assert sample(text, "tenant_proxy_request_duration_seconds_count", tenant=TENANT_A, endpoint=q) == 4
        assert sample(text, "tenant_proxy_db_duration_seconds_count", tenant=TENANT_B) == 3
        # the refused SET was admitted (a slot taken) before the guard parsed it
        assert sample(text, "tenant_proxy_pool_wait_seconds_count", tenant=TENANT_A) == 4
        assert sample(text, "tenant_proxy_pool_max", pool="primary") == 4
        assert sample(text, "tenant_proxy_build_info", version="0.1.0") == 1
        assert "tenant_proxy_tenant_load_share{" in text

        hot = await api.request("GET", "/admin/hotspots", key=None, admin=True)
        tenants = {t["tenant"]: t for t in hot.body["tenants"]}
        assert set(tenants) == {TENANT_A, TENANT_B}
        assert tenants[TENANT_A]["latency_p99_s_recent"] > 0 and tenants[TENANT_A]["inflight"] == 0
        one = await api.request("GET", f"/admin/tenants/{TENANT_B.upper()}", key=None, admin=True)
        assert one.body["tenant"] == TENANT_B and one.body["requests_per_s_estimate"] > 0
        assert (await api.request("GET", "/admin/tenants/nope", key=None, admin=True)).status == 400

    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "tenant_proxy.access"]
    assert len(lines) == 8
    last = lines[-1]
    assert last["tenant"] == TENANT_B and last["caller"] == "svc-b" and last["status"] == 200
    assert len(last["fingerprint"]) == 16 and last["db_ms"] > 0
    logged = caplog.text
    assert "hunter2" not in logged and "secret_param" not in logged and KEY_A not in logged
    assert any(line["error"] == "statement_rejected" for line in lines)


async def test_pgbouncer_figures_and_pgbouncer_down(gateway_with: Any, stack: Stack) -> None:
    async with gateway_with(database={"pgbouncer_admin_dsn": stack.pgbouncer_admin_dsn}) as api:
        await api.query("SELECT 1")
        text = await scrape(api)
        assert sample(text, "pgbouncer_up") == 1
        assert sample(text, "pgbouncer_pools_server_active_connections", database="appdb", user="app") >= 0
        assert sample(text, "pgbouncer_stats_totals_queries_pooled_total", database="appdb") > 0
        assert sample(text, "pgbouncer_pools_client_maxwait_seconds", database="appdb", user="app") >= 0
    dead = f"postgresql://postgres:x@127.0.0.1:{free_port()}/pgbouncer"
    async with gateway_with(database={"pgbouncer_admin_dsn": dead}) as api:
        text = await scrape(api)
        assert sample(text, "pgbouncer_up") == 0


async def test_promtool_and_a_real_prometheus(gateway_with: Any) -> None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool, "the prometheus package is installed by `make test` set-up"
    async with gateway_with() as api:
        for _ in range(5):
            await api.query("SELECT 1", key=KEY_A)
        text = await scrape(api)
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

        tmp = Path(tempfile.mkdtemp(prefix="prom-"))
        port = free_port()
        (tmp / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: tenant-proxy\n    static_configs: [{{targets: ['127.0.0.1:{api.running.admin_port}']}}]\n")
        proc = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        promql = ('histogram_quantile(0.99, sum by (le) (rate(tenant_proxy_request_duration_seconds_bucket'
                  f'{{tenant="{TENANT_A}"}}[30s])))')
        value = None
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(60):
                    for _ in range(5):
                        await api.query("SELECT 1", key=KEY_A)
                    await asyncio.sleep(0.5)
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql}) as r:
                            result = (await r.json())["data"]["result"]
                    except aiohttp.ClientError:
                        continue
                    if result and result[0]["value"][1] not in ("NaN", "0"):
                        value = float(result[0]["value"][1])
                        break
        finally:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(tmp, ignore_errors=True)
        assert value is not None and 0 < value <= 30
