"""`make run` and the test fixtures from a checkout only its owner may enter (mode 0700, as
root's home directory is).  Run as root, every server process is the ``postgres`` user, which
cannot read a file inside such a checkout: SQL goes to psql on standard input and the
cluster lives where that user can reach it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.tools.devstack import REPO, free_port

PARTS = ("proxy", "deploy", "config", "pgbouncer.ini")


@pytest.fixture
def private_checkout() -> Iterator[Path]:
    """A copy of the checkout's runtime parts inside a 0700 directory."""
    home = Path(tempfile.mkdtemp(prefix="tenant-proxy-home-"))
    home.chmod(0o700)
    checkout = home / "pg-tenant-proxy"
    checkout.mkdir()
    for part in PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, checkout / part)
    try:
        yield checkout
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _dev_config(checkout: Path, bouncer_port: int) -> tuple[Path, int, int]:
    cfg = yaml.safe_load((checkout / "config" / "dev.yaml").read_text())
    port, admin_port = free_port(), free_port()
    cfg["server"].update(port=port, admin_port=admin_port)
    cfg["database"]["dsn"] = f"postgresql://app:secret@127.0.0.1:{bouncer_port}/appdb"
    path = checkout / "config" / "test-dev.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port, admin_port


def _dev(checkout: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    with (checkout / "dev.log").open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "proxy", "dev", *args], cwd=checkout,
                                env={**os.environ, "PYTHONPATH": str(checkout), **env},
                                stdout=subprocess.DEVNULL, stderr=log)


async def test_make_run_serves_the_demo_from_a_private_checkout(private_checkout: Path) -> None:
    bouncer_port = free_port()
    config, port, admin_port = _dev_config(private_checkout, bouncer_port)
    # The default cluster directory is under the temp dir: give this run a temp dir of its own.
    tmp = Path(tempfile.mkdtemp(prefix="tenant-proxy-tmp-"))
    tmp.chmod(0o755)
    proc = _dev(private_checkout, {"TMPDIR": str(tmp)}, "--config", str(config), "--pg-port", str(free_port()),
                "--bouncer-port", str(bouncer_port))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                assert proc.poll() is None, (private_checkout / "dev.log").read_text()
                try:
                    async with http.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the demo gateway never became ready")
            async with http.post(f"http://127.0.0.1:{port}/v1/query",
                                 json={"sql": "SELECT count(*) AS n FROM events"},
                                 headers={"Authorization": "Bearer demo-acme-key"}) as r:
                assert r.status == 200
                assert (await r.json())["rows"][0]["n"] > 0  # the demo data was loaded
        assert list(tmp.glob("pg-tenant-proxy-dev-*/pgdata/PG_VERSION"))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0,  # allowed-skip: only root can hand a cluster to postgres; CI runs as root
                    reason="only root hands the cluster to the postgres user")
def test_a_cluster_dir_the_postgres_user_cannot_reach_is_named(private_checkout: Path) -> None:
    config, _, _ = _dev_config(private_checkout, free_port())
    proc = _dev(private_checkout, {}, "--config", str(config), "--dir", str(private_checkout / ".dev"),
                "--pg-port", str(free_port()), "--bouncer-port", str(free_port()))
    assert proc.wait(60) != 0
    err = (private_checkout / "dev.log").read_text()
    assert "the postgres user cannot reach" in err
    assert "Traceback" not in err
