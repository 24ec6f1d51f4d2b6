"""The compose stack's start-up path, without Docker: the same scripts, in the same order,
with the environment docker-compose.yml gives them, against a real PostgreSQL and
PgBouncer on this machine, ending with a gateway that is ready and answers a query with
a demo key.  What differs is only what a container network provides: host names and
ports (postgres:5432, pgbouncer:6432) become 127.0.0.1 and free ports, and the container
paths the scripts read become the checkout's (docs/deploy.md lists what this cannot
prove)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import parse_config
from proxy.http.app import start_gateway
from proxy.tools.devstack import SUPERUSER, SUPERUSER_PASSWORD, LocalStack, free_port, pgbouncer_binary
from proxy.tools.migrate import SQL_DIR

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose"
_DEFAULT = re.compile(r"^\$\{([A-Z_]+):-([^}]*)\}$")


def _compose_environment(service: str) -> dict[str, str]:
    """A service's environment as docker-compose.yml gives it (every ${VAR:-default} its default)."""
    env = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"][service]["environment"]
    out = {}
    for key, value in env.items():
        m = _DEFAULT.match(str(value))
        out[key] = m.group(2) if m else str(value)
    return out


def _as_postgres() -> dict[str, Any]:
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}


def _give_to_postgres(*paths: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for path in paths:
            os.chown(path, pw.pw_uid, pw.pw_gid)


@pytest.fixture
def bare_postgres() -> Iterator[LocalStack]:
    """An empty cluster with the superuser and the compose database, as the postgres image
    has it when it runs /docker-entrypoint-initdb.d: nothing of ours in it yet."""
    stack = LocalStack(Path(tempfile.mkdtemp(prefix="tenant-proxy-compose-")))
    stack._prepare_dirs()
    stack._initdb()
    stack._configure_pg()
    stack._run(str(stack.bindir / "pg_ctl"), "-D", str(stack.data), "-l", str(stack.root / "postgresql.log"),
               "-w", "-t", "60", "start")
    try:
        stack.psql(f"CREATE DATABASE {_compose_environment('postgres')['POSTGRES_DB']}", database="postgres")
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(stack.root, ignore_errors=True)


def _run_init_scripts(stack: LocalStack, env: dict[str, str]) -> list[str]:
    """/docker-entrypoint-initdb.d in name order, as the image runs them (psql over the
    server's socket, as the superuser)."""
    ran = []
    for script in sorted((COMPOSE / "initdb").glob("*.sh")):
        done = subprocess.run(["bash", str(script)], env={
            **os.environ, **env, "PGHOST": str(stack.run_dir), "PGPORT": str(stack.pg_port),
            "PATH": f"{stack.bindir}:{os.environ['PATH']}",
            "TENANT_PROXY_SQL_DIR": str(SQL_DIR), "TENANT_PROXY_DEMO_SQL": str(REPO / "deploy/dev/demo.sql")},
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (script.name, done.stderr[-2000:])
        ran.append(script.name)
    return ran


def _start_pgbouncer(stack: LocalStack, work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """pgbouncer/entrypoint.sh as the pgbouncer service runs it, with overrides.ini's
    network values (the postgres host, the ports, the container's paths) made local."""
    scripts = work / "pgbouncer"
    shutil.copytree(COMPOSE / "pgbouncer", scripts)
    shutil.copy(REPO / "pgbouncer.ini", work / "reference.ini")
    port, run = free_port(), work / "run"
    overrides = (scripts / "overrides.ini").read_text()
    overrides = overrides.replace("host=postgres port=5432", f"host=127.0.0.1 port={stack.pg_port}")
    overrides = overrides.replace("listen_addr = 0.0.0.0", f"listen_addr = 127.0.0.1\nlisten_port = {port}")
    overrides = overrides.replace("auth_file = /tmp/pgbouncer/userlist.txt", f"auth_file = {run}/userlist.txt")
    assert str(stack.pg_port) in overrides and str(run) in overrides, "overrides.ini changed: update this test"
    (scripts / "overrides.ini").write_text(overrides)
    for path in (work, scripts, *scripts.iterdir(), work / "reference.ini"):
        _give_to_postgres(path)
    with (work / "pgbouncer.log").open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(["sh", str(scripts / "entrypoint.sh")], cwd="/", env={
            **os.environ, **env, "PGBOUNCER_RUN_DIR": str(run), "PGBOUNCER_REFERENCE_INI": str(work / "reference.ini"),
            "PATH": f"{Path(pgbouncer_binary()).parent}:{os.environ['PATH']}"},
            stdout=log, stderr=subprocess.STDOUT, **_as_postgres())  # type: ignore[call-overload]
    return proc, port


async def test_the_compose_start_up_path_ends_with_a_ready_gateway_that_answers(bare_postgres: LocalStack,
                                                                                tmp_path: Path) -> None:
    stack, postgres_env = bare_postgres, _compose_environment("postgres")
    # 1. the postgres service's first start: passwords first, then the migrations and demo data
    assert _run_init_scripts(stack, postgres_env) == ["000_passwords.sh", "010_migrate.sh"]
    # 2. the migrate service, as its command says: it adopts what the init scripts applied
    migrate = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]["migrate"]["command"]
    dsn = f"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{stack.pg_port}/{postgres_env['POSTGRES_DB']}"
    assert migrate[2].startswith("postgresql://postgres:") and migrate[2].endswith("@postgres:5432/appdb")
    for _ in range(2):  # every start: the second finds everything recorded
        done = subprocess.run([sys.executable, "-m", "proxy", *migrate[:2], dsn], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("nothing to apply")
    # 3. the pgbouncer service
    work = Path(tempfile.mkdtemp(prefix="tenant-proxy-compose-bouncer-"))
    bouncer, port = _start_pgbouncer(stack, work, _compose_environment("pgbouncer"))
    try:
        for _ in range(100):
            ready = subprocess.run([str(stack.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            assert bouncer.poll() is None, (work / "pgbouncer.log").read_text()
            time.sleep(0.1)
        # 4. the gateway service with deploy/compose/gateway.yaml and the compose environment
        raw = (COMPOSE / "gateway.yaml").read_text().replace("@pgbouncer:6432/", f"@127.0.0.1:{port}/")
        config = yaml.safe_load(raw)
        config["server"].update({"host": "127.0.0.1", "port": 0, "admin_host": "127.0.0.1", "admin_port": 0})
        running = await start_gateway(parse_config(config, _compose_environment("gateway")))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{running.admin_port}/readyz") as r:
                    assert r.status == 200, await r.text()
                async with http.post(f"http://127.0.0.1:{running.port}/v1/query",
                                     json={"sql": "SELECT DISTINCT tenant_id::text AS t FROM events"},
                                     headers={"Authorization": "Bearer demo-acme-key"}) as r:
                    body = await r.json()
            assert r.status == 200, body
            assert body["rows"] == [{"t": "11111111-1111-4111-8111-111111111111"}]  # acme's demo rows, only
        finally:
            await running.stop()
    finally:
        bouncer.send_signal(signal.SIGTERM)
        bouncer.wait(10)
        shutil.rmtree(work, ignore_errors=True)
