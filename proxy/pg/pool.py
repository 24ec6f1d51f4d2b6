"""asyncpg pools and the one way caller SQL reaches the database: ``run_in_tenant_tx``.

Per request, through PgBouncer in transaction mode::

    BEGIN [ISOLATION LEVEL ...] [READ ONLY]; SET LOCAL <guc> = '<id>'; SET LOCAL statement_timeout = <ms>
        -- the id was validated and canonicalised by tenancy; sent as Parse/Bind/Execute
        -- messages in the same round trip as the first statement's Parse+Describe
    <caller statements>   -- extended protocol only, unnamed statements (statement_cache_size=0):
                          -- Parse+Describe, then Bind+Execute+Sync with a row limit (statement.py)
    the pool wall: the tenant setting is still the one set, or the transaction aborts
    COMMIT                -- or ROLLBACK on any error

When the last statement returns rows in a READ ONLY transaction, the wall and the COMMIT
travel as extended-protocol messages in front of its Sync (``GatewayConnection.gateway_writer``,
connection.py and wire.py): one round trip less.

A connection whose state is not what the gateway expects is terminated, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..config import DatabaseConfig
from ..errors import (
    DATABASE_UNAVAILABLE,
    INVALID_REQUEST,
    OUTCOME_UNKNOWN,
    POOL_TIMEOUT,
    SQL_ERROR_DATA,
    STATEMENT_REJECTED,
    STATEMENT_TIMEOUT,
    ApiError,
    from_sqlstate,
)
from ..observe.pools import PoolStats
from ..observe.trace import RequestTrace
from ..policy import idempotency
from .connection import GatewayConnection, init_connection, no_reset
from .statement import (
    ELEMENT_READ_BYTES,
    Result,
    RowSink,
    Statement,
    UndecodableValue,
    cap_bytes,
    pipelined,
    run_statement,
)
from .wire import SplicingTransport, connect

log = logging.getLogger("tenant_proxy.db")

ISOLATION_LEVELS = {"read committed": "READ COMMITTED", "repeatable read": "REPEATABLE READ",
                    "serializable": "SERIALIZABLE"}
# How much longer than statement_timeout the client waits before giving up on the server.
_CLIENT_TIMEOUT_MARGIN_S = 2.0
_DEADLINE_MARGIN_S = 0.5
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.ConnectionDoesNotExistError,
                      asyncpg.InterfaceError)


# Exceptions that mean "the database refused or could not be reached" (for callers outside this module).
DATABASE_ERRORS: tuple[type[Exception], ...] = (*_CONNECTION_ERRORS, asyncpg.PostgresError)


@dataclass(frozen=True, slots=True)
class TxRequest:
    """One request's transaction: the tenant, its statements and the limits it runs under."""

    tenant_id: str
    statements: Sequence[Statement]
    read_only: bool
    isolation: str | None
    timeout_ms: int
    max_rows: int
    # With an idempotency claim, the response is rendered inside the transaction and
    # stored with it, so ``render`` is required then.
    claim: idempotency.Claim | None = None
    render: Callable[[list[Result]], bytes] | None = None
    # Large results of a single statement go here as they are read (read requests only).
    sink: RowSink | None = None
    deferrable: bool = False
    # More rows than max_rows fail the transaction (SQLSTATE 54000) instead of being cut off.
    strict_rows: bool = False
    # The most time the statements (and a streamed result) may hold the connection; 0: no limit.
    deadline_s: float = 0.0
    # Rows past about this many bytes are cut off ("truncated"); 0: no limit.
    max_bytes: int = 0

    @property
    def read_limit(self) -> int:
        """The most bytes the connection may bring in for this transaction's rows before
        they are cut (a streamed result: per batch): twice ``max_bytes`` and a MiB, so
        that only a result far past the cap is refused instead of cut."""
        return 2 * self.max_bytes + (1 << 20) if self.max_bytes else 0


@dataclass(slots=True)
class Outcome:
    results: list[Result]
    body: bytes | None = None                 # rendered inside the transaction (idempotent requests)
    replay: idempotency.Replay | None = None  # the stored answer to an earlier identical request


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# In the message of the error the pool wall raises: no statement produces it by accident
# (the random part differs per process), and a caller who produces it on purpose only
# gets their own request refused.
WALL_MARK = "pg-tenant-proxy: the tenant setting changed " + os.urandom(6).hex()


@dataclass(frozen=True, slots=True)
class _TxSql:
    prefix: str           # BEGIN ...; SET LOCAL ...; SET LOCAL ... as one simple query
    prefix_messages: bytes  # the same statements as pipelined Parse/Bind/Execute messages
    commit: str           # the pool wall, then COMMIT, as one simple query
    commit_messages: bytes  # the same as messages to send in front of the last statement's Sync


@functools.lru_cache(maxsize=4096)
def _tx_sql(guc: str, tenant_id: str, isolation: str | None, read_only: bool, deferrable: bool,
            timeout_ms: int) -> _TxSql:
    """A transaction's prefix and its pool wall + COMMIT.  Cached: the same tenants send
    the same kinds of transaction over and over.  ``tenant_id`` was canonicalised by
    tenancy, and is quoted here as a literal besides."""
    begin = "BEGIN"
    if isolation is not None:
        begin += " ISOLATION LEVEL " + ISOLATION_LEVELS[isolation]
    if read_only:
        begin += " READ ONLY"
    if deferrable:
        begin += " DEFERRABLE"
    quoted = _quote_literal(tenant_id)
    statements = (begin, f"SET LOCAL {guc} = {quoted}", f"SET LOCAL statement_timeout = {timeout_ms}")
    # The pool wall: COMMIT only if the tenant setting is still the one we set.  It
    # returns no row; on a mismatch it fails (a text that is no integer, with WALL_MARK
    # in the message; random() keeps the planner from trying that cast in advance), which
    # aborts the transaction before COMMIT runs, in the same round trip as the COMMIT.
    wall = (f"SELECT WHERE CASE WHEN pg_catalog.current_setting('{guc}', true) IS NOT DISTINCT FROM {quoted} "
            f"THEN false ELSE ('{WALL_MARK} ' || pg_catalog.random())::int = 0 END")
    return _TxSql(prefix="; ".join(statements), prefix_messages=pipelined(statements),
                  commit=wall + "; COMMIT", commit_messages=pipelined((wall, "COMMIT")))


def _tripped_wall(exc: asyncpg.PostgresError) -> bool:
    return exc.sqlstate == "22P02" and WALL_MARK in (getattr(exc, "message", None) or "")


class Database:
    """One pool of connections to PgBouncer."""

    def __init__(self, cfg: DatabaseConfig, guc: str, name: str = "primary") -> None:
        self.cfg = cfg
        self.guc = guc
        self.name = name
        self.pool: asyncpg.Pool | None = None
        self.waiting = 0
        self.timeouts = 0
        # (finished at, pool wait, transaction time) of recent transactions, for /admin/pool.
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=20000)

    def stats(self) -> PoolStats:
        pool = self.pool
        size = pool.get_size() if pool is not None else 0
        idle = pool.get_idle_size() if pool is not None else 0
        return PoolStats(name=self.name, size=size, idle=idle, max=self.cfg.pool_max_size, waiting=self.waiting,
                         timeouts=self.timeouts)

    async def start(self) -> None:
        kwargs: dict[str, Any] = dict(
            dsn=self.cfg.dsn, max_size=self.cfg.pool_max_size, statement_cache_size=0,
            timeout=self.cfg.connect_timeout_ms / 1000, init=init_connection, reset=no_reset,
            connection_class=GatewayConnection, connect=connect,
            max_inactive_connection_lifetime=300.0,
        )
        try:
            self.pool = await asyncpg.create_pool(min_size=self.cfg.pool_min_size, **kwargs)
            async with self.pool.acquire():  # with min_size 0, still check the role once now
                pass
        except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            # Start anyway and report not-ready; connections are made on demand once the database is back.
            log.warning("database not reachable at start-up (%s); starting with an empty pool",
                        type(exc).__name__)
            if self.pool is not None:
                await self.pool.close()
            self.pool = await asyncpg.create_pool(min_size=0, **kwargs)

    async def close(self) -> None:
        """Close every connection of the pool."""
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

    async def run_in_tenant_tx(self, tx: TxRequest, trace: RequestTrace) -> Outcome:
        """Run ``tx.statements`` in one transaction confined to ``tx.tenant_id``; all or nothing."""
        assert self.pool is not None
        sql = _tx_sql(self.guc, tx.tenant_id, tx.isolation, tx.read_only, tx.deferrable, int(tx.timeout_ms))
        client_timeout = tx.timeout_ms / 1000 + _CLIENT_TIMEOUT_MARGIN_S

        started = time.perf_counter()
        self.waiting += 1
        try:
            timeout = None if _connected_holder_free(self.pool) else self.cfg.acquire_timeout_ms / 1000
            conn = await self.pool.acquire(timeout=timeout)
        except TimeoutError:
            self.timeouts += 1
            raise ApiError(POOL_TIMEOUT, "no database connection became free in time", retry_after_s=1) from None
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise _unavailable(exc) from None
        finally:
            self.waiting -= 1
            trace.wait_s = time.perf_counter() - started
        started = time.perf_counter()
        # The request works on the connection itself: each call through the pool's proxy
        # costs a check and an indirection.  Only the release goes through the proxy.
        raw: GatewayConnection = conn._con
        writer = raw.gateway_writer
        if writer is not None:
            writer.arm_read_limit(tx.read_limit)
        try:
            return await self._run(raw, writer, tx, sql, client_timeout)
        except Exception:
            # The meter cut the connection (wire.py), which surfaces as whatever the driver
            # was doing then.  It is disarmed before any COMMIT is sent, so nothing committed.
            if writer is not None and writer.overread:
                _terminate(raw)
                raise _overread(tx, writer) from None
            raise
        finally:
            done = time.perf_counter()
            trace.db_s = done - started
            self.recent.append((time.monotonic(), trace.wait_s or 0.0, trace.db_s))
            if writer is not None:
                writer.front = None  # a prefix that never went out (the request failed first)
                writer.read_limit = 0
            await _release(self.pool, conn, self.cfg.acquire_timeout_ms / 1000)

    async def _run(self, conn: asyncpg.Connection, writer: SplicingTransport | None, tx: TxRequest, sql: _TxSql,
                   client_timeout: float) -> Outcome:
        committing = False  # a read-write transaction's COMMIT is on its way
        # One deadline for every statement and the streaming of a result: statement_timeout
        # is per statement, and a slow reader of a stream holds the connection between
        # batches.  A little past the tenant's limit, so that a single statement meets
        # the server's own statement_timeout first (which keeps the connection).
        deadline = asyncio.timeout(tx.deadline_s + _DEADLINE_MARGIN_S if tx.deadline_s else None)
        try:
            if tx.claim is None and not tx.statements:
                await conn.execute(sql.prefix, timeout=client_timeout)
            else:
                # The first thing below is always a Parse+Describe (asyncpg's prepare); the
                # prefix travels in front of it in the same round trip (and send).
                _send_ahead(conn, writer, sql.prefix_messages)
                conn.set_gateway_tx_open(True)
            if tx.claim is not None:
                replay = await _claim(conn, writer, tx.claim, client_timeout)
                if replay is not None:
                    await _rollback(conn)
                    return Outcome(results=[], replay=replay)
            # The wall and COMMIT can go with the last statement (when it returns rows) if
            # nothing must be done between the two (store an idempotency record, check a
            # row count) and the transaction is READ ONLY: once they are sent, a failure on
            # the gateway's side (a connection lost, a value it cannot decode, its own
            # timeout) leaves unknown whether the COMMIT ran, which must not matter.  A
            # SELECT's text cannot prove it writes nothing (owner functions, views).
            tail = sql.commit_messages if tx.claim is None and not tx.strict_rows and tx.read_only else None
            last = len(tx.statements) - 1
            async with deadline:
                results = [await run_statement(conn, st, client_timeout, tx.max_rows, tx.sink,
                                               commit=tail if i == last else None)
                           for i, st in enumerate(tx.statements)]
            if writer is not None:
                writer.read_limit = 0  # the rows are in; what follows is the gateway's own
            if tx.max_bytes:
                cap_bytes(results, tx.max_bytes)
            if results and results[-1].committed:
                conn.set_gateway_tx_open(False)
                return Outcome(results=results)
            if tx.strict_rows and any(r.truncated for r in results):
                raise ApiError(SQL_ERROR_DATA, f"a statement returned more than {tx.max_rows} rows (the tenant's "
                               "max_rows); add a LIMIT", sqlstate="54000")
            if not conn.is_in_transaction():
                # The caller ended the gateway's transaction: the rest would run outside the tenant.
                _terminate(conn)
                raise ApiError(STATEMENT_REJECTED, "the statement ended the gateway's transaction")
            body = None
            if tx.claim is not None:
                assert tx.render is not None
                body = tx.render(results)
                await conn.execute(idempotency.STORE_SQL, tx.claim.key, 200, body, timeout=client_timeout)
            committing = not tx.read_only  # a READ ONLY one wrote nothing, whatever became of it
            await conn.execute(sql.commit, timeout=client_timeout)
            conn.set_gateway_tx_open(False)
            return Outcome(results=results, body=body)
        except asyncpg.PostgresError as exc:
            if committing and _connection_lost(exc):
                _terminate(conn)
                raise _outcome_unknown() from None
            await _rollback(conn)
            if _tripped_wall(exc):
                _terminate(conn)
                raise ApiError(STATEMENT_REJECTED, "the statement changed the tenant setting") from None
            if exc.sqlstate == "08P01" and not conn.is_closed():
                # The server refused a message about this statement (a parameter its receive
                # function cannot read), the connection is fine: not the database being down,
                # which would take a replica out of rotation for every tenant.
                raise ApiError(SQL_ERROR_DATA, f"the database could not read a parameter: "
                               f"{getattr(exc, 'message', None) or exc}", sqlstate="08P01") from None
            if type(exc) is asyncpg.DataError:
                # asyncpg's own (the server's data errors are subclasses): a parameter its codec refused
                raise ApiError(INVALID_REQUEST, f"invalid parameter: {exc}") from None
            raise from_sqlstate(exc.sqlstate, getattr(exc, "message", None) or "database error") from None
        except ApiError:
            await _rollback(conn)
            raise
        except TimeoutError:
            _terminate(conn)
            if committing:
                raise _outcome_unknown() from None
            if deadline.expired():
                raise ApiError(STATEMENT_TIMEOUT, f"transaction cancelled: it held its connection past the "
                               f"tenant's limit of {tx.deadline_s:g} s (transaction_timeout_ms)") from None
            raise ApiError(STATEMENT_TIMEOUT, "statement cancelled: it ran past its time limit") from None
        except (asyncpg.UnsupportedClientFeatureError, asyncpg.InternalClientError) as exc:
            message = str(exc)
            if message.startswith(("no encoder", "could not resolve query result and/or argument types")):
                # A type asyncpg can neither send nor look up, found while preparing: the
                # connection is between two steps, in a clean state.
                await _rollback(conn)
                raise ApiError(SQL_ERROR_DATA, "a parameter's or column's type cannot be handled as such; pass "
                               "text and cast it in the statement ($1::text::the_type), or select it ::text") from None
            broken = "cannot switch to state" in message or conn.is_closed()
            _terminate(conn)  # the connection's protocol state is unknown
            if broken:
                # A message nobody asked for took the protocol over between two steps
                # (PgBouncer passing on the FATAL of a backend that was terminated).
                raise (_outcome_unknown() if committing else _unavailable(exc)) from None
            if isinstance(exc, asyncpg.OutdatedSchemaCacheError):
                raise ApiError(SQL_ERROR_DATA, "a type the statement uses was altered meanwhile; send it again") \
                    from None
            if isinstance(exc, asyncpg.InternalClientError) and not message.startswith("no decoder"):
                raise  # unexpected: a 500, with the traceback in the log
            # Raised while decoding a result (a composite element of a type asyncpg has
            # no decoder for).
            raise ApiError(SQL_ERROR_DATA, "the result holds a value of a type the gateway cannot return; "
                           "select its fields instead, or cast it to text") from None
        except UndecodableValue as exc:
            _terminate(conn)
            raise ApiError(SQL_ERROR_DATA, f"the result holds a value the gateway cannot return ({exc}); "
                           "cast it to text") from None
        except _CONNECTION_ERRORS as exc:
            _terminate(conn)
            raise (_outcome_unknown() if committing else _unavailable(exc)) from None
        except asyncio.CancelledError:
            # The client hung up.  asyncpg has sent PostgreSQL a cancel request for the
            # running statement; releasing the connection waits for it, then rolls back.
            raise
        except BaseException:
            _terminate(conn)
            raise


async def _claim(conn: asyncpg.Connection, writer: SplicingTransport | None, claim: idempotency.Claim,
                 timeout: float) -> idempotency.Replay | None:
    """Claim the key: a short lock_timeout for the claim's wait on a running request with
    the same key, the tenant's own for the caller's statements after it (that SET goes
    out ahead of the first statement's Parse)."""
    _send_ahead(conn, writer, _CLAIM_TIMEOUT)
    try:
        row = await conn.fetchrow(idempotency.CLAIM_SQL, claim.key, claim.request_hash, claim.retention_s,
                                  timeout=timeout)
    except asyncpg.LockNotAvailableError:
        raise idempotency.in_progress() from None
    replay = idempotency.decide(claim, row["claimed"], row["request_hash"], row["status"], row["response"],
                                row["expired"])
    if replay is None:  # statements follow (a simple-query ROLLBACK must not carry it)
        _send_ahead(conn, writer, _DEFAULT_LOCK_TIMEOUT)
        if not row["claimed"] and row["request_hash"] is not None:
            await conn.execute(idempotency.RECLAIM_SQL, claim.key, claim.request_hash, timeout=timeout)
    return replay


_CLAIM_TIMEOUT = pipelined((f"SET LOCAL lock_timeout = {idempotency.CLAIM_LOCK_TIMEOUT_MS}",))
_DEFAULT_LOCK_TIMEOUT = pipelined(("SET LOCAL lock_timeout TO DEFAULT",))


def _send_ahead(conn: asyncpg.Connection, writer: SplicingTransport | None, messages: bytes) -> None:
    """Messages to travel in front of asyncpg's next Parse (pipelined, statement.py)."""
    if writer is None:
        conn._transport.write(messages)
    else:
        writer.front = (writer.front or b"") + messages


def _connected_holder_free(pool: asyncpg.Pool) -> bool:
    """Whether asyncpg's pool hands out a connected connection without waiting: a holder
    in its queue has a live one (the queue prefers those, newest first).  Then acquire
    needs no timer (the scheduler keeps transactions within the pool, so this is the
    usual case).  Reads asyncpg's private state; anything unexpected answers False, the
    timed path."""
    try:
        return any(holder.is_connected() for holder in reversed(pool._queue._queue))
    except AttributeError:
        return False


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection, timeout: float) -> None:
    """Hand a connection back; ``timeout`` bounds what the release may have to wait for
    (a cancellation in progress, the ROLLBACK): past it the connection is terminated.

    ``Pool.release`` runs the holder's release in a task of its own (``asyncio.shield``),
    so that a cancellation cannot interrupt it half-way.  A connection with no
    transaction, no cancellation in progress and the gateway's BEGIN closed goes back
    without suspending once (asyncpg's reset and connection.py's ``no_reset`` have nothing to send), so
    nothing can interrupt it: it is released directly, without that task per request.
    Anything else, or asyncpg internals not as expected, takes ``Pool.release``.

    When the server side dies at that very moment, asyncpg's connection-lost callback
    can free the holder between release's own check and its shielded task: the
    connection is already gone from the pool then, which is all release would do."""
    try:
        if _releases_at_once(conn):
            holder = conn._holder
            conn._con._on_release()
            await holder.release(timeout)
            return
        await pool.release(conn, timeout=timeout)
    except asyncpg.InternalClientError as exc:
        log.warning("connection already returned to the pool: %s", exc)


def _releases_at_once(conn: asyncpg.Connection) -> bool:
    try:
        con = conn._con  # the pool's proxy -> the connection; None once released
        return (con is not None and not con.gateway_tx_open and not con.is_closed() and not con.is_in_transaction()
                and not con._protocol._is_cancelling() and con._top_xact is None)
    except AttributeError:
        return False


def _terminate(conn: asyncpg.Connection) -> None:
    """Close a connection for good; a no-op when it broke and went back to the pool already."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


async def _rollback(conn: asyncpg.Connection) -> None:
    """ROLLBACK the gateway's transaction, or any asyncpg knows of.  asyncpg's transaction
    status comes from the last ReadyForQuery, and the pipelined prefix has none of its
    own (a failure between the first Parse+Describe and its Bind+Execute would otherwise
    leave BEGIN open): the connection's ``gateway_tx_open`` covers that."""
    try:
        if conn.is_closed() or not (getattr(conn, "gateway_tx_open", False) or conn.is_in_transaction()):
            return
    except asyncpg.InterfaceError:
        return  # it broke and went back to the pool already
    try:
        await conn.execute("ROLLBACK", timeout=5)
        conn.set_gateway_tx_open(False)
    except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError):
        _terminate(conn)


def _connection_lost(exc: asyncpg.PostgresError) -> bool:
    """The server's word that the connection is gone (class 08, or the backend shut down)."""
    return (exc.sqlstate or "").startswith("08") or exc.sqlstate in ("57P01", "57P02", "57P03")


def _overread(tx: TxRequest, writer: SplicingTransport) -> ApiError:
    """The meter cut the connection (wire.py): the result passed ``tx.read_limit``.  The
    transaction never reached its COMMIT (a READ ONLY one's may have, and wrote nothing)."""
    if writer.per_element:
        return ApiError(SQL_ERROR_DATA, f"a result with array or composite columns may bring at most "
                        f"{ELEMENT_READ_BYTES >> 20} MiB from the database (they are decoded element by element); "
                        "nothing was committed. Select array_to_json(...) or fewer rows", sqlstate="54000")
    return ApiError(SQL_ERROR_DATA, f"the result is far larger than this tenant's max_response_bytes "
                    f"({tx.max_bytes} bytes) and was refused before it was read; nothing was committed. "
                    "Add a LIMIT, or select less", sqlstate="54000")


def _outcome_unknown() -> ApiError:
    log.warning("connection lost during COMMIT: outcome unknown")
    return ApiError(OUTCOME_UNKNOWN, "the connection to the database was lost while the transaction was "
                    "committing: it may have committed. Retry only with an Idempotency-Key (a retry then "
                    "returns the first answer if it did)")


def _unavailable(exc: BaseException) -> ApiError:
    log.warning("database unavailable: %s", type(exc).__name__)
    sqlstate = exc.sqlstate if isinstance(exc, asyncpg.PostgresError) else None
    return ApiError(DATABASE_UNAVAILABLE, "the database is unavailable", sqlstate=sqlstate, retry_after_s=1)


async def connect_direct(dsn: str, timeout_s: float = 10.0) -> asyncpg.Connection:
    """One plain connection (for the CLI's catalog reads); safe through PgBouncer."""
    return await asyncpg.connect(dsn, statement_cache_size=0, timeout=timeout_s)
