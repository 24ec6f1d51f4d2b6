"""Stacks of their own for scaling tests: a primary with a streaming replica (each behind
its own PgBouncer), and a second, independent cluster for tenant placement."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import start_gateway
from proxy.config import parse_config
from proxy.devstack import LocalStack

from ..fix_gateway import Api, base_config, merge
from ..fix_stack import Stack


def _stack(**kwargs: Any) -> Iterator[LocalStack]:
    root = Path(tempfile.mkdtemp(prefix="tenant-proxy-scaling-"))
    local = LocalStack(root, pool_size=4, **kwargs)
    local.start()
    try:
        yield local
    finally:
        local.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def primary() -> Iterator[LocalStack]:
    yield from _stack()


@pytest.fixture(scope="session")
def replica(primary: LocalStack) -> Iterator[LocalStack]:
    yield from _stack(replica_of=primary)


@pytest.fixture(scope="session")
def second_cluster() -> Iterator[LocalStack]:
    yield from _stack()


@pytest.fixture
def scaled_gateway(primary: LocalStack) -> Any:
    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Api]:
        stack = Stack(gateway_dsn=primary.gateway_dsn, admin_dsn=primary.admin_dsn,
                      pgbouncer_admin_dsn=primary.pgbouncer_admin_dsn)
        raw = merge(base_config(stack), overrides)
        running = await start_gateway(parse_config(raw, {}))
        try:
            async with aiohttp.ClientSession() as session:
                yield Api(session, running)
        finally:
            await running.stop()
    return start
