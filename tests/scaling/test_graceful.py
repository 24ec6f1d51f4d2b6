"""SIGTERM: not ready at once, in-flight requests finish, then the process exits cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml

from proxy.tools.devstack import free_port

from ..fix_gateway import KEY_A, base_config, merge
from ..fix_stack import Stack


async def test_sigterm_drains_in_flight_requests(stack: Stack, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    cfg = merge(base_config(stack), {"server": {"port": port, "admin_port": admin_port, "drain_s": 1,
                                                "shutdown_timeout_s": 10}})
    path = tmp_path / "graceful.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        async with aiohttp.ClientSession() as http:
            ready_url = f"http://127.0.0.1:{admin_port}/readyz"
            for _ in range(100):
                try:
                    async with http.get(ready_url) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)

            async def slow() -> int:
                async with http.post(f"http://127.0.0.1:{port}/v1/query", json={"sql": "SELECT pg_sleep(2)"},
                                     headers={"Authorization": f"Bearer {KEY_A}"}) as r:
                    await r.read()
                    return r.status

            in_flight = asyncio.create_task(slow())
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with http.get(ready_url) as r:  # draining: still answering, but not ready
                assert r.status == 503 and (await r.json())["status"] == "draining"
            assert await in_flight == 200
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()
