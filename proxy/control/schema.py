"""The control catalog's schema, its versions, and the check `serve` makes before it starts.

The catalog lives in one schema (``tenant_proxy``) of a database reached directly, not
through PgBouncer's transaction pool (LISTEN needs a session).  It may share the default
cluster's database: nothing in it is granted to PUBLIC, so the gateway's own role (the
one tenants' SQL runs as) cannot read it.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from ..config import redact_dsn

SCHEMA = "tenant_proxy"
CHANNEL = "tenant_proxy_changes"

# Each step takes the catalog from the version before it to its own number; a step runs
# once, in the transaction that records its number.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, f"""
CREATE TABLE {SCHEMA}.tenants (
  id          text PRIMARY KEY,
  state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'suspended', 'moving')),
  cluster     text NOT NULL DEFAULT 'default',
  limits      jsonb NOT NULL DEFAULT '{{}}' CHECK (jsonb_typeof(limits) = 'object'),
  created_at  timestamptz NOT NULL DEFAULT now(),
  version     bigint NOT NULL
);
CREATE INDEX ON {SCHEMA}.tenants (version);
CREATE TABLE {SCHEMA}.api_keys (
  name                text PRIMARY KEY,
  sha256              text NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{{64}}$'),
  tenants             text[],          -- NULL: any registered tenant the caller names ("*")
  created_at          timestamptz NOT NULL DEFAULT now(),
  expires_at          timestamptz,
  revoked_at          timestamptz,
  previous_sha256     text,            -- the key before the last rotation ...
  previous_expires_at timestamptz,     -- ... valid until then
  version             bigint NOT NULL
);
CREATE INDEX ON {SCHEMA}.api_keys (version);
CREATE TABLE {SCHEMA}.instances (
  id              text PRIMARY KEY,
  address         text NOT NULL,
  started_at      timestamptz NOT NULL DEFAULT now(),
  heartbeat_at    timestamptz NOT NULL DEFAULT now(),
  -- the catalog version this instance serves, reported once every transaction it had in
  -- flight for a tenant that version pauses has ended
  applied_version bigint NOT NULL DEFAULT 0
);
CREATE TABLE {SCHEMA}.changes (
  id       bigserial PRIMARY KEY,
  at       timestamptz NOT NULL DEFAULT now(),
  actor    text NOT NULL,
  kind     text NOT NULL,
  subject  text NOT NULL,
  before   jsonb,
  after    jsonb,
  version  bigint NOT NULL
);
CREATE FUNCTION {SCHEMA}.changes_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'tenant_proxy.changes is append-only';
END $$;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {SCHEMA}.changes
  FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.changes_append_only();
"""),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_BOOTSTRAP = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {SCHEMA}.meta (
  singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  schema_version integer NOT NULL,
  version        bigint NOT NULL     -- the catalog version: every change bumps it
);
INSERT INTO {SCHEMA}.meta (schema_version, version) VALUES (0, 0) ON CONFLICT DO NOTHING;
"""


class CatalogError(Exception):
    """The catalog is missing, too old or too new, or a change to it was refused; the
    message says what to do."""


class CatalogNotFound(CatalogError):
    """The tenant or key named is not in the catalog."""


async def connect(dsn: str, *, checked: bool = True, timeout_s: float = 10.0) -> asyncpg.Connection:
    """A direct connection to the catalog's database, the catalog's version checked unless
    ``checked`` is false (control init); CatalogError names an unreachable one."""
    try:
        conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CatalogError(f"cannot reach the control catalog at {redact_dsn(dsn)}: "
                           f"{type(exc).__name__}: {exc}") from None
    if checked:
        try:
            await check(conn)
        except BaseException:
            conn.terminate()
            raise
    return conn


async def schema_version(conn: Any) -> int | None:
    """The catalog's schema version, or None when there is no catalog in this database."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.meta")
    if not exists:
        return None
    return int(await conn.fetchval(f"SELECT schema_version FROM {SCHEMA}.meta"))


async def check(conn: Any) -> None:
    """Raise CatalogError unless the catalog exists at exactly this code's version."""
    found = await schema_version(conn)
    if found is None or found == 0:
        raise CatalogError(f"no control catalog in this database (schema {SCHEMA}): "
                           "run `tenant-proxy control init --config FILE` first")
    if found < SCHEMA_VERSION:
        raise CatalogError(f"the control catalog is at version {found}, this gateway needs {SCHEMA_VERSION}: "
                           "run `tenant-proxy control init --config FILE` to upgrade it")
    if found > SCHEMA_VERSION:
        raise CatalogError(f"the control catalog is at version {found}, newer than this gateway's "
                           f"{SCHEMA_VERSION}: upgrade the gateway")


async def migrate(conn: Any) -> tuple[int, int]:
    """Create or upgrade the catalog, serialised against a concurrent init; (from, to)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", SCHEMA)
        await conn.execute(_BOOTSTRAP)
        found = int(await conn.fetchval(f"SELECT schema_version FROM {SCHEMA}.meta"))
        if found > SCHEMA_VERSION:
            raise CatalogError(f"the control catalog is at version {found}, newer than this tool's "
                               f"{SCHEMA_VERSION}: use a newer tenant-proxy")
        for number, sql in MIGRATIONS:
            if number > found:
                await conn.execute(sql)
        await conn.execute(f"UPDATE {SCHEMA}.meta SET schema_version = $1", SCHEMA_VERSION)
    return found, SCHEMA_VERSION
