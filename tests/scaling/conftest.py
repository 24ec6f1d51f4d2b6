"""Stacks of their own for scaling tests: a primary with a streaming replica (each behind
its own PgBouncer), and a second, independent cluster for tenant placement."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from proxy.tools.devstack import LocalStack

from ..fix_gateway import make_settings, running_gateway
from ..fix_stack import stack_of, temporary_stack


def _stack(**kwargs: Any) -> Iterator[LocalStack]:
    yield from temporary_stack("tenant-proxy-scaling-", pool_size=4, **kwargs)


@pytest.fixture(scope="session")
def primary() -> Iterator[LocalStack]:
    yield from _stack()


@pytest.fixture(scope="session")
def replica(primary: LocalStack) -> Iterator[LocalStack]:
    yield from _stack(replica_of=primary)


@pytest.fixture(scope="session")
def second_cluster() -> Iterator[LocalStack]:
    yield from _stack()


@pytest.fixture(scope="session")
def logical() -> Iterator[LocalStack]:
    """A cluster that can publish (wal_level = logical): the online move's source."""
    yield from _stack(logical=True)


@pytest.fixture
def scaled_gateway(primary: LocalStack) -> Any:
    def start(**overrides: Any) -> Any:
        return running_gateway(make_settings(stack_of(primary), **overrides))
    return start


async def rows(stack: LocalStack, sql: str, *args: Any) -> list[Any]:
    """What a superuser sees straight in PostgreSQL (RLS does not confine it)."""
    conn = await asyncpg.connect(stack.admin_dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()
