"""A real Redis for the fleet's rate limits: the machine's redis-server on a free port in a
temp dir (`make test` installs it).  A server that cannot start is an error, never a skip."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tools.devstack import RedisServer

__all__ = ["RedisServer", "redis_server"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    root = Path(tempfile.mkdtemp(prefix="tenant-proxy-redis-"))
    server = RedisServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
