"""A running gateway over the real stack, seeded tenants, and an HTTP helper."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio

from proxy.config import Settings, parse_config
from proxy.http.app import RunningGateway, start_gateway
from proxy.policy.auth import hash_key

from .fix_stack import Stack

TENANT_A = "aaaaaaaa-0000-4000-8000-00000000000a"
TENANT_B = "bbbbbbbb-0000-4000-8000-00000000000b"
TENANT_C = "cccccccc-0000-4000-8000-00000000000c"
TENANT_SUSPENDED = "dddddddd-0000-4000-8000-00000000000d"
KEY_A, KEY_B, KEY_ANY, KEY_AC = "test-key-a", "test-key-b", "test-key-any", "test-key-a-or-c"
JWT_SECRET = "jwt-test-secret-that-is-long-enough-0123456789"

# Rows every test may rely on (written by the superuser, which RLS does not confine).
SEED = {
    TENANT_A: ["a-1", "a-2", "a-3"],
    TENANT_B: ["b-1", "b-2"],
}

# A table with one column of every type the API promises to round-trip, under the same
# forced-RLS pattern as deploy/sql's events.
TYPED_TABLE = """
DROP TABLE IF EXISTS public.typed;
DROP TYPE IF EXISTS public.mood;
CREATE TYPE public.mood AS ENUM ('happy', 'sad');
CREATE TABLE public.typed (
  id serial PRIMARY KEY,
  tenant_id uuid NOT NULL DEFAULT public.current_tenant_id(),
  u uuid, t text, i2 smallint, i4 integer, i8 bigint, b boolean, n numeric, f8 double precision,
  ts timestamptz, tsn timestamp, d date, j json, jb jsonb, by bytea, ai integer[], at text[],
  au uuid[], iv interval, m public.mood
);
ALTER TABLE public.typed OWNER TO app_owner;
ALTER TABLE public.typed ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.typed FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON public.typed USING (tenant_id = public.current_tenant_id())
  WITH CHECK (tenant_id = public.current_tenant_id());
GRANT SELECT, INSERT, UPDATE, DELETE ON public.typed TO app;
GRANT USAGE ON SEQUENCE public.typed_id_seq TO app;
CREATE OR REPLACE FUNCTION public.internal_boom() RETURNS int LANGUAGE plpgsql AS
  $$ BEGIN RAISE EXCEPTION 'secret internal detail' USING ERRCODE = 'XX000'; END $$;
GRANT EXECUTE ON FUNCTION public.internal_boom() TO app;
"""


def base_config(stack: Stack) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "admin_host": "127.0.0.1", "admin_port": 0},
        "database": {"dsn": stack.gateway_dsn, "pool_min_size": 1, "pool_max_size": 4,
                     "acquire_timeout_ms": 2000},
        "tenancy": {"guc": "app.tenant_id", "id_format": "uuid", "header": "X-Tenant-Id"},
        "defaults": {"statement_timeout_ms": 5000, "max_rows": 1000},
        "tenants": {TENANT_SUSPENDED: {"suspended": True}, TENANT_B: {"max_rows": 500}},
        "auth": {
            "api_keys": [
                {"name": "svc-a", "sha256": hash_key(KEY_A), "tenant": TENANT_A},
                {"name": "svc-b", "sha256": hash_key(KEY_B), "tenant": TENANT_B},
                {"name": "svc-any", "sha256": hash_key(KEY_ANY), "tenants": ["*"]},
                {"name": "svc-ac", "sha256": hash_key(KEY_AC), "tenants": [TENANT_A, TENANT_C]},
            ],
            "jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET, "issuer": "test-idp",
                    "audience": "tenant-proxy", "tenant_claim": "tenant_id"},
        },
    }


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def make_settings(stack: Stack, **overrides: Any) -> Settings:
    return parse_config(merge(base_config(stack), overrides), env={})


@dataclass
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def code(self) -> str | None:
        return self.body["error"]["code"] if isinstance(self.body, dict) and "error" in self.body else None


class Api:
    """HTTP helper bound to one running gateway."""

    def __init__(self, session: aiohttp.ClientSession, running: RunningGateway) -> None:
        self.session = session
        self.running = running
        self.base = f"http://127.0.0.1:{running.port}"
        self.admin = f"http://127.0.0.1:{running.admin_port}"

    async def request(self, method: str, path: str, *, key: str | None = KEY_A, tenant: str | None = None,
                      json: Any = None, data: bytes | None = None, headers: Mapping[str, str] | None = None,
                      admin: bool = False) -> Reply:
        hdrs = dict(headers or {})
        if key is not None:
            hdrs.setdefault("Authorization", f"Bearer {key}")
        if tenant is not None:
            hdrs["X-Tenant-Id"] = tenant
        url = (self.admin if admin else self.base) + path
        async with self.session.request(method, url, json=json, data=data, headers=hdrs) as resp:
            raw = await resp.read()
            try:
                body: Any = await resp.json(content_type=None) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            return Reply(resp.status, body, resp.headers)

    async def query(self, sql: str, *params: Any, key: str | None = KEY_A, tenant: str | None = None,
                    **options: Any) -> Reply:
        return await self.request("POST", "/v1/query", key=key, tenant=tenant,
                                  json={"sql": sql, "params": list(params), **options})

    async def open_raw_query(self, body: dict[str, Any],
                             key: str = KEY_A) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """POST /v1/query on a bare TCP connection, for tests that control the socket
        (reading slowly, resetting it): the caller reads the answer and closes it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.running.port)
        data = orjson.dumps(body)
        writer.write(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        return reader, writer

    async def transaction(self, statements: list[dict[str, Any]], *, key: str | None = KEY_A,
                          tenant: str | None = None, **options: Any) -> Reply:
        return await self.request("POST", "/v1/transaction", key=key, tenant=tenant,
                                  json={"statements": statements, **options})


@pytest_asyncio.fixture(scope="session")
async def admin_db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection straight to PostgreSQL: sets up fixtures and checks what really happened."""
    conn = await asyncpg.connect(stack.admin_dsn)
    await conn.execute(TYPED_TABLE)
    await conn.execute("DELETE FROM public.events")
    for tenant, types in SEED.items():
        for event_type in types:
            await conn.execute("INSERT INTO public.events (tenant_id, event_type, data) VALUES ($1, $2, $3)",
                               tenant, event_type, '{"seed": true}')
    yield conn
    await conn.close()


@asynccontextmanager
async def running_gateway(settings: Settings, config_path: Path | None = None) -> AsyncIterator[Api]:
    running = await start_gateway(settings, config_path)
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(session, running)
    finally:
        await running.stop()


@pytest_asyncio.fixture(scope="session")
async def api(stack: Stack, admin_db: asyncpg.Connection) -> AsyncIterator[Api]:
    """The gateway with the base test config."""
    async with running_gateway(make_settings(stack)) as a:
        yield a


@pytest.fixture
def gateway_with(stack: Stack, admin_db: asyncpg.Connection) -> Any:
    """Start a gateway with config overrides: ``async with gateway_with(database={...}) as api``."""
    def start(**overrides: Any) -> Any:
        return running_gateway(make_settings(stack, **overrides))
    return start
