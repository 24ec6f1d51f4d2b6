"""The real test stack: PostgreSQL 15 + PgBouncer (transaction mode) on free ports.

Three ways to get one, in this order:
  1. reuse: TEST_GATEWAY_DSN (the gateway role through PgBouncer), TEST_ADMIN_DSN (a
     superuser straight to PostgreSQL) and TEST_PGBOUNCER_ADMIN_DSN (PgBouncer's console
     as a stats user) name a running stack with deploy/sql applied;
  2. docker: TEST_STACK=docker, or a Docker engine answers and TEST_STACK is unset:
     testcontainers runs postgres:15 and PgBouncer 1.18 containers;
  3. local: the machine's PostgreSQL and PgBouncer binaries in a temp dir (what CI uses).
A stack that cannot start is an error, never a skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.tools.devstack import APP_PASSWORD, APP_USER, DATABASE, SQL_DIR, LocalStack

# PgBouncer's pool: 1 server connection, so every client (attacker and victim alike)
# shares one PostgreSQL backend, which is exactly what isolation must survive.
TEST_POOL_SIZE = 1


@dataclass
class Stack:
    gateway_dsn: str
    admin_dsn: str
    pgbouncer_admin_dsn: str
    local: LocalStack | None = None


def _docker_answers() -> bool:
    if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return False
    import docker  # type: ignore[import-untyped]

    try:
        client = docker.from_env()
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except docker.errors.DockerException:
        return False
    finally:
        client.close()


def _docker_stack() -> Iterator[Stack]:  # pragma: no cover - needs a Docker engine
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network
    from testcontainers.postgres import PostgresContainer

    with Network() as net:
        pg = PostgresContainer("postgres:15", username="postgres", password="postgres", dbname=DATABASE)
        pg.with_network(net).with_network_aliases("pg")
        with pg:
            # deploy/sql installs pg_partman; the postgres image has the PGDG apt source for it.
            code, output = pg.exec(["sh", "-c", "apt-get update -qq && apt-get install -y -qq postgresql-15-partman"])
            if code != 0:
                raise RuntimeError(f"installing pg_partman in the postgres container failed: {output!r}")
            admin_dsn = pg.get_connection_url(driver=None)
            import asyncio

            import asyncpg

            async def migrate() -> None:
                conn = await asyncpg.connect(admin_dsn)
                for path in sorted(SQL_DIR.glob("*.sql")):
                    await conn.execute(path.read_text())
                await conn.execute(f"ALTER ROLE {APP_USER} PASSWORD '{APP_PASSWORD}'")
                await conn.close()

            asyncio.run(migrate())
            bouncer = (DockerContainer("edoburu/pgbouncer:v1.18.0-p0")
                       .with_network(net)
                       .with_env("DB_HOST", "pg").with_env("DB_NAME", DATABASE)
                       .with_env("DB_USER", APP_USER).with_env("DB_PASSWORD", APP_PASSWORD)
                       .with_env("POOL_MODE", "transaction").with_env("AUTH_TYPE", "scram-sha-256")
                       .with_env("DEFAULT_POOL_SIZE", str(TEST_POOL_SIZE))
                       .with_env("STATS_USERS", APP_USER)
                       .with_exposed_ports(5432))
            with bouncer:
                host = bouncer.get_container_host_ip()
                port = bouncer.get_exposed_port(5432)
                yield Stack(gateway_dsn=f"postgresql://{APP_USER}:{APP_PASSWORD}@{host}:{port}/{DATABASE}",
                            admin_dsn=admin_dsn,
                            pgbouncer_admin_dsn=f"postgresql://{APP_USER}:{APP_PASSWORD}@{host}:{port}/pgbouncer")


def temporary_stack(prefix: str, **kwargs: Any) -> Iterator[LocalStack]:
    """A LocalStack in a fresh temp dir, removed afterwards (for stacks of a test module's own)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    local = LocalStack(root, **kwargs)
    try:
        local.start()
        yield local
    finally:
        local.stop()
        shutil.rmtree(root, ignore_errors=True)


def stack_of(local: LocalStack) -> Stack:
    return Stack(gateway_dsn=local.gateway_dsn, admin_dsn=local.admin_dsn,
                 pgbouncer_admin_dsn=local.pgbouncer_admin_dsn, local=local)


def _local_stack() -> Iterator[Stack]:
    for local in temporary_stack("tenant-proxy-test-", pool_size=TEST_POOL_SIZE):
        yield stack_of(local)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    reuse = ("TEST_GATEWAY_DSN", "TEST_ADMIN_DSN", "TEST_PGBOUNCER_ADMIN_DSN")
    if all(os.environ.get(v) for v in reuse):
        yield Stack(*(os.environ[v] for v in reuse))
        return
    mode = os.environ.get("TEST_STACK", "")
    if mode == "docker" or (mode == "" and _docker_answers()):
        yield from _docker_stack()
    else:
        yield from _local_stack()
