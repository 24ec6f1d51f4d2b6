"""asyncpg pools and the one way caller SQL reaches the database: ``run_in_tenant_tx``.

Per request, through PgBouncer in transaction mode::

    BEGIN [ISOLATION LEVEL ...] [READ ONLY]; SET LOCAL <guc> = '<id>'; SET LOCAL statement_timeout = <ms>
        -- one simple-protocol round trip; the id was validated and canonicalised by tenancy
    <caller statements>   -- extended protocol only, unnamed statements (statement_cache_size=0)
    check the transaction is still open
    COMMIT                -- or ROLLBACK on any error

A connection whose state is not what the gateway expects is terminated, never reused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from .config import DatabaseConfig
from .encode import convert_params, type_label
from .errors import (
    DATABASE_UNAVAILABLE,
    INVALID_REQUEST,
    POOL_TIMEOUT,
    STATEMENT_REJECTED,
    STATEMENT_TIMEOUT,
    ApiError,
    from_sqlstate,
)

log = logging.getLogger("tenant_proxy.db")

ISOLATION_LEVELS = {"read committed": "READ COMMITTED", "repeatable read": "REPEATABLE READ",
                    "serializable": "SERIALIZABLE"}
# How much longer than statement_timeout the client waits before giving up on the server.
_CLIENT_TIMEOUT_MARGIN_S = 2.0
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.ConnectionDoesNotExistError,
                      asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Sequence[Any]
    command: str


@dataclass(slots=True)
class Result:
    columns: list[tuple[str, str]]
    rows: list[asyncpg.Record]
    row_count: int
    command: str
    truncated: bool


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's RESET ALL/UNLISTEN round trip: in transaction mode it would run on
    whichever backend PgBouncer picks.  Session state cannot be created (the guard and
    the database's grants forbid it), and asyncpg still rolls back an open transaction."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb pass through as the database's own text, embedded as-is in the response.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=lambda v: orjson.dumps(v).decode(),
                                  decoder=orjson.Fragment, format="text")
    # Intervals keep months and days apart as PostgreSQL's own text.
    await conn.set_type_codec("interval", schema="pg_catalog", encoder=str, decoder=str, format="text")


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Database:
    """One pool of connections to PgBouncer."""

    def __init__(self, cfg: DatabaseConfig, guc: str) -> None:
        self.cfg = cfg
        self.guc = guc
        self.pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        kwargs: dict[str, Any] = dict(
            dsn=self.cfg.dsn, max_size=self.cfg.pool_max_size, statement_cache_size=0,
            timeout=self.cfg.connect_timeout_ms / 1000, init=_init_connection, reset=_no_reset,
            max_inactive_connection_lifetime=300.0,
        )
        try:
            self.pool = await asyncpg.create_pool(min_size=self.cfg.pool_min_size, **kwargs)
        except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            # Start anyway and report not-ready; connections are made on demand once the database is back.
            log.warning("database not reachable at start-up (%s); starting with an empty pool",
                        type(exc).__name__)
            self.pool = await asyncpg.create_pool(min_size=0, **kwargs)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """A real round trip through PgBouncer."""
        assert self.pool is not None
        try:
            async with asyncio.timeout(timeout_s), self.pool.acquire() as conn:
                return bool(await conn.fetchval("SELECT 1"))
        except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError):
            return False

    async def run_in_tenant_tx(self, tenant_id: str, statements: Sequence[Statement], *, read_only: bool,
                               isolation: str | None, timeout_ms: int, max_rows: int) -> list[Result]:
        """Run ``statements`` in one transaction confined to ``tenant_id``; all or nothing."""
        assert self.pool is not None
        prefix = "BEGIN"
        if isolation is not None:
            prefix += " ISOLATION LEVEL " + ISOLATION_LEVELS[isolation]
        if read_only:
            prefix += " READ ONLY"
        prefix += (f"; SET LOCAL {self.guc} = {_quote_literal(tenant_id)}"
                   f"; SET LOCAL statement_timeout = {int(timeout_ms)}")
        client_timeout = timeout_ms / 1000 + _CLIENT_TIMEOUT_MARGIN_S

        try:
            conn = await self.pool.acquire(timeout=self.cfg.acquire_timeout_ms / 1000)
        except TimeoutError:
            raise ApiError(POOL_TIMEOUT, "no database connection became free in time", retry_after_s=1) from None
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise _unavailable(exc) from None
        try:
            return await self._run(conn, prefix, statements, client_timeout, max_rows)
        finally:
            await self.pool.release(conn)

    async def _run(self, conn: asyncpg.Connection, prefix: str, statements: Sequence[Statement],
                   client_timeout: float, max_rows: int) -> list[Result]:
        try:
            await conn.execute(prefix, timeout=client_timeout)
            results = [await _one(conn, st, client_timeout, max_rows) for st in statements]
            if not conn.is_in_transaction():
                # The caller ended the gateway's transaction: the rest would run outside the tenant.
                conn.terminate()
                raise ApiError(STATEMENT_REJECTED, "the statement ended the gateway's transaction")
            await conn.execute("COMMIT", timeout=client_timeout)
            return results
        except asyncpg.PostgresError as exc:
            await _rollback(conn)
            raise from_sqlstate(exc.sqlstate, getattr(exc, "message", None) or "database error") from None
        except ApiError:
            await _rollback(conn)
            raise
        except TimeoutError:
            conn.terminate()
            raise ApiError(STATEMENT_TIMEOUT, "statement cancelled: it ran past its time limit") from None
        except asyncpg.DataError as exc:
            await _rollback(conn)
            raise ApiError(INVALID_REQUEST, f"invalid parameter: {exc}") from None
        except _CONNECTION_ERRORS as exc:
            conn.terminate()
            raise _unavailable(exc) from None
        except BaseException:
            conn.terminate()
            raise


async def _one(conn: asyncpg.Connection, st: Statement, timeout: float, max_rows: int) -> Result:
    stmt = await conn.prepare(st.sql, timeout=timeout)
    params = convert_params(st.params, [_describe(t) for t in stmt.get_parameters()])
    columns = [(a.name, type_label(*_describe(a.type))) for a in stmt.get_attributes()]
    # A row limit on Execute (one more than allowed, to detect truncation) keeps a large
    # result on the server; asyncpg exposes it only through the statement's private bind_execute.
    rows: list[asyncpg.Record] = await stmt._PreparedStatement__bind_execute(params, max_rows + 1, timeout)
    truncated = len(rows) > max_rows
    if truncated:
        del rows[max_rows:]
    status = stmt.get_statusmsg()
    if status:
        tag, _, count = status.rpartition(" ")
        command = tag.split(" ")[0] if tag else status
        row_count = int(count) if count.isdigit() and not columns else len(rows)
    else:
        command, row_count = st.command, len(rows)
    return Result(columns=columns, rows=rows, row_count=row_count, command=command, truncated=truncated)


def _describe(t: Any) -> tuple[str, str, str | None]:
    element = None
    if t.kind == "array":
        # asyncpg names built-in arrays "int4[]" and introspected ones after pg_type ("_my_enum").
        element = t.name[:-2] if t.name.endswith("[]") else t.name.removeprefix("_")
    return t.name, t.kind, element


async def _rollback(conn: asyncpg.Connection) -> None:
    if conn.is_closed() or not conn.is_in_transaction():
        return
    try:
        await conn.execute("ROLLBACK", timeout=5)
    except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError):
        conn.terminate()


def _unavailable(exc: BaseException) -> ApiError:
    log.warning("database unavailable: %s", type(exc).__name__)
    sqlstate = exc.sqlstate if isinstance(exc, asyncpg.PostgresError) else None
    return ApiError(DATABASE_UNAVAILABLE, "the database is unavailable", sqlstate=sqlstate, retry_after_s=1)
