"""The tenant transaction: the one way caller SQL reaches the database.

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

This module is the happy path; classify.py decides what any failure means, and whether
the connection is rolled back and kept or terminated (a connection whose state is not
what the gateway expects is never reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from ..errors import SQL_ERROR, STATEMENT_REJECTED, ApiError
from ..policy import idempotency
from . import _asyncpg
from .classify import CONNECTION_ERRORS, WALL_MARK, Context, Fate, Overread, Phase, classify
from .statement import ELEMENT_READ_BYTES, Result, RowSink, Statement, cap_bytes, pipelined, run_statement
from .wire import SplicingTransport

ISOLATION_LEVELS = {"read committed": "READ COMMITTED", "repeatable read": "REPEATABLE READ",
                    "serializable": "SERIALIZABLE"}
# How much longer than statement_timeout the client waits before giving up on the server.
_CLIENT_TIMEOUT_MARGIN_S = 2.0
# Past the tenant's transaction deadline, so that a single statement meets the server's
# own statement_timeout first (which keeps the connection).
_DEADLINE_MARGIN_S = 0.5


@dataclass(frozen=True, slots=True)
class TxRequest:
    """One request's transaction: the tenant, its statements and the limits it runs under."""

    tenant_id: str
    statements: Sequence[Statement]
    read_only: bool
    isolation: str | None
    timeout_ms: int
    max_rows: int
    # With an idempotency claim, the response body is made inside the transaction and
    # stored with it: ``encode`` (the results -> the body) is required then.
    claim: idempotency.Claim | None = None
    encode: Callable[[list[Result]], bytes] | None = None
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


async def run_tenant_tx(conn: asyncpg.Connection, writer: SplicingTransport | None, tx: TxRequest,
                        guc: str) -> Outcome:
    """Run ``tx.statements`` in one transaction confined to ``tx.tenant_id``; all or nothing.
    ``conn`` is the connection itself (not the pool's proxy), ``writer`` its transport."""
    sql = _tx_sql(guc, tx.tenant_id, tx.isolation, tx.read_only, tx.deferrable, int(tx.timeout_ms))
    timeout = tx.timeout_ms / 1000 + _CLIENT_TIMEOUT_MARGIN_S
    # One deadline for all statements and the streaming of a result: statement_timeout is
    # per statement, and a slow reader of a stream holds the connection between batches.
    deadline = asyncio.timeout(tx.deadline_s + _DEADLINE_MARGIN_S if tx.deadline_s else None)
    phase = Phase.STATEMENTS
    try:
        if tx.claim is None and tx.statements:  # the usual case: nothing to wait for
            _open_ahead(conn, writer, sql)
        else:
            replay = await _begin(conn, writer, tx, sql, timeout)
            if replay is not None:
                await _rollback(conn)
                return Outcome(results=[], replay=replay)
        async with deadline:
            results = await _statements(conn, tx, sql, timeout)
        if writer is not None:
            writer.read_limit = 0  # the rows are in; what follows is the gateway's own
        if tx.max_bytes:
            cap_bytes(results, tx.max_bytes)
        if results and results[-1].committed:
            conn.set_gateway_tx_open(False)
            return Outcome(results=results)
        _check_before_commit(conn, tx, results)
        body = None
        if tx.claim is not None:
            assert tx.encode is not None
            body = tx.encode(results)
            await conn.execute(idempotency.STORE_SQL, tx.claim.key, 200, body, timeout=timeout)
        if not tx.read_only:  # a READ ONLY one wrote nothing, whatever became of its COMMIT
            phase = Phase.COMMIT
        await conn.execute(sql.commit, timeout=timeout)
        conn.set_gateway_tx_open(False)
        return Outcome(results=results, body=body)
    except asyncio.CancelledError:
        # The client hung up.  asyncpg has sent PostgreSQL a cancel request for the
        # running statement; releasing the connection waits for it, then rolls back.
        raise
    except Exception as exc:
        failed: Exception = exc
        if writer is not None and writer.overread:  # whatever the driver was doing when the meter cut it
            failed = Overread(ELEMENT_READ_BYTES if writer.per_element else 0, tx.max_bytes)
        failure = classify(failed, Context(phase, conn.is_closed(), tx.deadline_s, deadline.expired()))
        if failure.fate is not Fate.CLOSE:
            await _rollback(conn)
        if failure.fate is not Fate.KEEP:
            terminate(conn)
        if failure.error is None:
            raise
        raise failure.error from None
    except BaseException:
        terminate(conn)
        raise


async def _begin(conn: asyncpg.Connection, writer: SplicingTransport | None, tx: TxRequest, sql: _TxSql,
                 timeout: float) -> idempotency.Replay | None:
    """Open the transaction; with an idempotency claim, claim the key (a replay, when
    an identical request was answered already)."""
    if tx.claim is None and not tx.statements:
        await conn.execute(sql.prefix, timeout=timeout)
        return None
    _open_ahead(conn, writer, sql)
    return None if tx.claim is None else await _claim(conn, writer, tx.claim, timeout)


def _open_ahead(conn: asyncpg.Connection, writer: SplicingTransport | None, sql: _TxSql) -> None:
    """The prefix, to travel in front of what follows, which is always a Parse+Describe
    (asyncpg's prepare): in the same round trip (and send)."""
    _send_ahead(conn, writer, sql.prefix_messages)
    conn.set_gateway_tx_open(True)


async def _statements(conn: asyncpg.Connection, tx: TxRequest, sql: _TxSql, timeout: float) -> list[Result]:
    """The caller's statements.  The wall and COMMIT go with the last one (when it returns
    rows) if nothing must be done between the two (store an idempotency record, check a
    row count) and the transaction is READ ONLY: once they are sent, a failure on the
    gateway's side (a connection lost, a value it cannot decode, its own timeout) leaves
    unknown whether the COMMIT ran, which must not matter.  A SELECT's text cannot prove
    it writes nothing (owner functions, views)."""
    tail = sql.commit_messages if tx.claim is None and not tx.strict_rows and tx.read_only else None
    last = len(tx.statements) - 1
    return [await run_statement(conn, st, timeout, tx.max_rows, tx.sink, commit=tail if i == last else None)
            for i, st in enumerate(tx.statements)]


def _check_before_commit(conn: asyncpg.Connection, tx: TxRequest, results: list[Result]) -> None:
    if tx.strict_rows and any(r.truncated for r in results):
        raise ApiError(SQL_ERROR, f"a statement returned more than {tx.max_rows} rows (the tenant's "
                       "max_rows); add a LIMIT", sqlstate="54000")
    if not conn.is_in_transaction():
        # The caller ended the gateway's transaction: the rest would run outside the tenant.
        terminate(conn)
        raise ApiError(STATEMENT_REJECTED, "the statement ended the gateway's transaction")


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
        _asyncpg.write_raw(conn, messages)
    else:
        writer.front = (writer.front or b"") + messages


def terminate(conn: asyncpg.Connection) -> None:
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
    except (TimeoutError, *CONNECTION_ERRORS, asyncpg.PostgresError):
        terminate(conn)
