"""The one place where whatever went wrong with a request's transaction becomes one of
the gateway's API errors (errors.py), and where it is decided what becomes of the
connection: kept (rolled back), or terminated.

Its input is the exception and the ``Phase`` it happened in: before the caller's
statements (taking a connection, the transaction's prefix), during them, while the
COMMIT of a read-write transaction is on its way, or while a result streams to the
client.  The phase matters for one thing above all: a connection lost at COMMIT leaves
the outcome unknown, which is a different answer from "the database is unavailable".
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass

import asyncpg

from ..errors import (
    CLIENT_CLOSED,
    DATABASE_UNAVAILABLE,
    INVALID_REQUEST,
    OUTCOME_UNKNOWN,
    POOL_TIMEOUT,
    SQL_ERROR,
    STATEMENT_REJECTED,
    STATEMENT_TIMEOUT,
    ApiError,
    from_sqlstate,
    server_gone,
)
from ._asyncpg import driver_failure

log = logging.getLogger("tenant_proxy.db")

# Failures of the connection itself (asyncpg's InterfaceError among them: a connection in
# a state it cannot use).
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError, asyncpg.PostgresConnectionError, asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)
# Exceptions that mean "the database refused or could not be reached" (for the tools).
DATABASE_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)

# In the message of the error the pool wall raises (pg/transaction.py): no statement
# produces it by accident (the random part differs per process), and a caller who
# produces it on purpose only gets their own request refused.
WALL_MARK = "pg-tenant-proxy: the tenant setting changed " + os.urandom(6).hex()


class Phase(enum.Enum):
    ACQUIRE = "acquire"        # waiting for a pooled connection, or opening one
    STATEMENTS = "statements"  # the prefix and the caller's statements: nothing is committed yet
    COMMIT = "commit"          # a read-write transaction's COMMIT is on its way
    STREAM = "stream"          # writing a streamed result to the client


class UndecodableValue(Exception):
    """The driver could not turn a value of the result into a Python one (a date past
    9999 or before 1 AD, a time of 24:00).  ``cause``: what the driver raised."""

    def __init__(self, cause: ValueError | OverflowError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Overread(Exception):
    """The read meter (pg/wire.py) cut the connection: the result passed its read limit."""

    def __init__(self, per_element_bytes: int, max_bytes: int) -> None:
        super().__init__("overread")
        self.per_element_bytes = per_element_bytes  # 0: the limit was max_bytes's
        self.max_bytes = max_bytes


class Fate(enum.Enum):
    """What becomes of the connection a transaction failed on."""

    KEEP = "keep"                    # rolled back, and reused
    CLOSE = "close"                  # terminated: its protocol or transaction state is unknown
    ROLL_BACK_AND_CLOSE = "rollback"  # rolled back (so PgBouncer keeps its backend clean), then closed


@dataclass(frozen=True, slots=True)
class Failure:
    """What became of a transaction: the error to answer with (None: an unexpected
    failure, re-raised as it is: a 500, with its traceback in the log), and the fate of
    its connection."""

    error: ApiError | None
    fate: Fate


@dataclass(frozen=True, slots=True)
class Context:
    """What the classifier needs to know of the transaction that failed."""

    phase: Phase
    connection_closed: bool = False
    deadline_s: float = 0.0        # the transaction's deadline (transaction_timeout_ms)...
    deadline_expired: bool = False  # ... and whether it is what ran out
    write_timeout_s: float = 0.0    # a streamed response's per-write limit


def classify(exc: BaseException, ctx: Context) -> Failure:
    """``exc``, raised in ``ctx.phase``, as an API error and a fate for the connection."""
    if isinstance(exc, ApiError):
        return Failure(exc, fate=Fate.KEEP)
    if isinstance(exc, Overread):
        return Failure(_overread(exc), fate=Fate.CLOSE)
    if ctx.phase is Phase.ACQUIRE:
        return _acquire(exc)
    if ctx.phase is Phase.STREAM and isinstance(exc, (TimeoutError, ConnectionError)):
        return Failure(_hang_up(exc, ctx.write_timeout_s), fate=Fate.KEEP)
    if isinstance(exc, asyncpg.PostgresError):
        return _server_error(exc, ctx)
    if isinstance(exc, TimeoutError):
        return Failure(_timeout(ctx), fate=Fate.CLOSE)
    if isinstance(exc, (asyncpg.UnsupportedClientFeatureError, asyncpg.InternalClientError)):
        return _driver_error(exc, ctx)
    if isinstance(exc, UndecodableValue):
        if isinstance(exc.cause, asyncpg.InterfaceError):
            return classify(exc.cause, ctx)
        return Failure(ApiError(SQL_ERROR, f"the result holds a value the gateway cannot return ({exc}); "
                                "cast it to text"), fate=Fate.CLOSE)
    if isinstance(exc, CONNECTION_ERRORS):
        return Failure(_outcome_unknown() if ctx.phase is Phase.COMMIT else _unavailable(exc), fate=Fate.CLOSE)
    return Failure(None, fate=Fate.CLOSE)


def _acquire(exc: BaseException) -> Failure:
    if isinstance(exc, TimeoutError):
        return Failure(ApiError(POOL_TIMEOUT, "no database connection became free in time", retry_after_s=1),
                       fate=Fate.KEEP)
    if isinstance(exc, DATABASE_ERRORS):
        return Failure(_unavailable(exc), fate=Fate.KEEP)
    return Failure(None, fate=Fate.KEEP)


def _server_error(exc: asyncpg.PostgresError, ctx: Context) -> Failure:
    state = exc.sqlstate or ""
    message = getattr(exc, "message", None) or ""
    if ctx.phase is Phase.COMMIT and (state.startswith("08") or server_gone(state)):
        return Failure(_outcome_unknown(), fate=Fate.CLOSE)
    if state == "22P02" and WALL_MARK in message:
        # Rolled back first: the backend PgBouncer gives the next client is then clean
        # (a session-level change in the aborted transaction is undone with it).
        return Failure(ApiError(STATEMENT_REJECTED, "the statement changed the tenant setting"),
                       fate=Fate.ROLL_BACK_AND_CLOSE)
    if state == "08P01" and not ctx.connection_closed:
        # The server refused a message about this statement (a parameter its receive
        # function cannot read), the connection is fine: not the database being down,
        # which would take a replica out of rotation for every tenant.
        return Failure(ApiError(SQL_ERROR, f"the database could not read a parameter: {message or exc}",
                                sqlstate="08P01"), fate=Fate.KEEP)
    if type(exc) is asyncpg.DataError:
        # asyncpg's own (the server's data errors are subclasses): a parameter its codec refused
        return Failure(ApiError(INVALID_REQUEST, f"invalid parameter: {exc}"), fate=Fate.KEEP)
    return Failure(from_sqlstate(exc.sqlstate, message or "database error"), fate=Fate.KEEP)


def _timeout(ctx: Context) -> ApiError:
    if ctx.phase is Phase.COMMIT:
        return _outcome_unknown()
    if ctx.deadline_expired:
        return ApiError(STATEMENT_TIMEOUT, f"transaction cancelled: it held its connection past the tenant's "
                        f"limit of {ctx.deadline_s:g} s (transaction_timeout_ms)")
    return ApiError(STATEMENT_TIMEOUT, "statement cancelled: it ran past its time limit")


def _driver_error(exc: asyncpg.UnsupportedClientFeatureError | asyncpg.InternalClientError,
                  ctx: Context) -> Failure:
    what = driver_failure(exc)
    if what == "unhandled_type":
        return Failure(ApiError(SQL_ERROR, "a parameter's or column's type cannot be handled as such; pass "
                                "text and cast it in the statement ($1::text::the_type), or select it ::text"),
                       fate=Fate.KEEP)
    # From here the connection's protocol state is unknown.
    if what == "protocol_broken" or ctx.connection_closed:
        return Failure(_outcome_unknown() if ctx.phase is Phase.COMMIT else _unavailable(exc), fate=Fate.CLOSE)
    if what == "outdated_schema":
        return Failure(ApiError(SQL_ERROR, "a type the statement uses was altered meanwhile; send it again"),
                       fate=Fate.CLOSE)
    if what == "unexpected":
        return Failure(None, fate=Fate.CLOSE)
    return Failure(ApiError(SQL_ERROR, "the result holds a value of a type the gateway cannot return; "
                            "select its fields instead, or cast it to text"), fate=Fate.CLOSE)


def _hang_up(exc: BaseException, write_timeout_s: float) -> ApiError:
    """The client of a streamed response took nothing for ``write_timeout_s`` or hung up:
    not the database's connection failing (which would take a replica out of rotation)."""
    if isinstance(exc, TimeoutError):
        return ApiError(CLIENT_CLOSED, f"the client took no data for {write_timeout_s:g} s; cut off")
    return ApiError(CLIENT_CLOSED, "the client closed the connection during the response")


def _overread(exc: Overread) -> ApiError:
    """The transaction never reached its COMMIT (a READ ONLY one's may have, and wrote nothing)."""
    if exc.per_element_bytes:
        return ApiError(SQL_ERROR, f"a result with array or composite columns may bring at most "
                        f"{exc.per_element_bytes >> 20} MiB from the database (they are decoded element by element); "
                        "nothing was committed. Select array_to_json(...) or fewer rows", sqlstate="54000")
    return ApiError(SQL_ERROR, f"the result is far larger than this tenant's max_response_bytes "
                    f"({exc.max_bytes} bytes) and was refused before it was read; nothing was committed. "
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
