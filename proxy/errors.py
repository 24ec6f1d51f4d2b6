"""The closed set of errors the gateway answers with (http/errors.py turns them into responses).

Every error has a stable ``code``, an HTTP status and a flag saying whether the same
request may succeed if retried.  PostgreSQL errors are mapped by SQLSTATE through
:func:`from_sqlstate`; only the message is kept, never DETAIL or HINT, which can
carry other rows' values (a unique violation's DETAIL names the conflicting key).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tenant_proxy")


@dataclass(frozen=True, slots=True)
class ErrorKind:
    code: str
    status: int
    retryable: bool = False


UNAUTHENTICATED = ErrorKind("unauthenticated", 401)
TENANT_REQUIRED = ErrorKind("tenant_required", 400)
TENANT_FORBIDDEN = ErrorKind("tenant_forbidden", 403)
TENANT_SUSPENDED = ErrorKind("tenant_suspended", 403)
TENANT_MOVING = ErrorKind("tenant_moving", 503, retryable=True)
TENANT_UNKNOWN = ErrorKind("tenant_unknown", 403)  # not registered in the control catalog
# This instance's view of the control catalog is older than control.lease_s: it cannot
# know where a tenant lives now, so it serves reads and refuses writes.
CONTROL_UNAVAILABLE = ErrorKind("control_unavailable", 503, retryable=True)
INVALID_REQUEST = ErrorKind("invalid_request", 400)
CONFIG_INVALID = ErrorKind("config_invalid", 400)
NOT_FOUND = ErrorKind("not_found", 404)
METHOD_NOT_ALLOWED = ErrorKind("method_not_allowed", 405)
PAYLOAD_TOO_LARGE = ErrorKind("payload_too_large", 413)
REQUEST_TIMEOUT = ErrorKind("request_timeout", 408)
STATEMENT_REJECTED = ErrorKind("statement_rejected", 400)
RLS_VIOLATION = ErrorKind("rls_violation", 403)
CONFLICT = ErrorKind("conflict", 409)
IDEMPOTENCY_IN_PROGRESS = ErrorKind("idempotency_in_progress", 409, retryable=True)
IDEMPOTENCY_KEY_REUSED = ErrorKind("idempotency_key_reused", 422)
SERIALIZATION_FAILURE = ErrorKind("serialization_failure", 409, retryable=True)
DEADLOCK_DETECTED = ErrorKind("deadlock_detected", 409, retryable=True)
STATEMENT_TIMEOUT = ErrorKind("statement_timeout", 504)
POOL_TIMEOUT = ErrorKind("pool_timeout", 503, retryable=True)
RATE_LIMITED = ErrorKind("rate_limited", 429, retryable=True)
CONCURRENCY_LIMITED = ErrorKind("concurrency_limited", 503, retryable=True)
DATABASE_UNAVAILABLE = ErrorKind("database_unavailable", 503, retryable=True)
# The connection was lost while a read-write transaction's COMMIT was on its way: it may
# have committed.  Not retryable blindly (a retry could write twice); with an
# Idempotency-Key a retry replays the answer if it did.
OUTCOME_UNKNOWN = ErrorKind("transaction_outcome_unknown", 502)
SQL_INVALID = ErrorKind("sql_invalid", 400)  # not a statement this database can run: syntax, unknown names, privileges
SQL_ERROR = ErrorKind("sql_error", 422)  # a valid statement that failed on its data
INTERNAL = ErrorKind("internal", 500)

ALL_KINDS = tuple(v for v in list(globals().values()) if isinstance(v, ErrorKind))
# Not in ALL_KINDS, the codes a client can receive: there is no one to send it to.  What
# metrics and the access log record when the client hung up on a response already under
# way (nginx's 499).
CLIENT_CLOSED = ErrorKind("client_closed_request", 499)


class ApiError(Exception):
    """An error that the middleware turns into the standard JSON error body."""

    def __init__(self, kind: ErrorKind, message: str, *, sqlstate: str | None = None,
                 retry_after_s: int | None = None, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.sqlstate = sqlstate
        self.retry_after_s = retry_after_s
        self.problems = problems


# The server shut the backend down (admin_shutdown, crash_shutdown, cannot_connect_now):
# like class 08, the connection is gone.
_SERVER_GONE = ("57P01", "57P02", "57P03")


def server_gone(sqlstate: str) -> bool:
    return sqlstate in _SERVER_GONE


# Exact SQLSTATEs first, then two-character classes.
_BY_SQLSTATE: dict[str, ErrorKind] = {
    "42501": RLS_VIOLATION,
    "23505": CONFLICT,
    "23503": CONFLICT,
    "23P01": CONFLICT,
    "40001": SERIALIZATION_FAILURE,
    "40P01": DEADLOCK_DETECTED,
    "57014": STATEMENT_TIMEOUT,
    **dict.fromkeys(_SERVER_GONE, DATABASE_UNAVAILABLE),
    "53300": DATABASE_UNAVAILABLE,
    "53400": SQL_ERROR,     # configuration_limit_exceeded: the statement passed temp_file_limit
    "25006": SQL_ERROR,
}
_BY_CLASS: dict[str, ErrorKind] = {
    "08": DATABASE_UNAVAILABLE,  # connection exceptions, also PgBouncer's own errors
    "42": SQL_INVALID,             # syntax error or access rule violation
    "0A": SQL_INVALID,             # feature not supported
    "22": SQL_ERROR,        # data exception
    "23": SQL_ERROR,        # other integrity violations (not null, check)
    "21": SQL_ERROR,        # cardinality violation
    "2F": SQL_ERROR,
    "P0": SQL_ERROR,        # raised by a PL/pgSQL function
    "53": DATABASE_UNAVAILABLE,  # insufficient resources
    "58": INTERNAL,
    # A built-in raising an internal error on the caller's arguments
    # (pg_identify_object_as_address(0, 0, 0)): the statement's doing, not the gateway's.
    "XX": SQL_ERROR,
}


_QUOTED = re.compile(r'"(?s:.*)"')
_BYTES = re.compile(r"0x[0-9a-fA-F]{2}(?: 0x[0-9a-fA-F]{2})*")


def withhold_values(message: str) -> str:
    """A data exception's message without the value it quotes (PostgreSQL puts it in
    double quotes, ``invalid input syntax for type integer: "..."``, or as bytes,
    ``0xe2 0x82``): the value may come from a row the caller does not see (RLS checks an
    ON CONFLICT's conflicting row only after its WHERE ran)."""
    return _BYTES.sub("0x…", _QUOTED.sub('"…"', message))


def from_sqlstate(sqlstate: str | None, message: str) -> ApiError:
    """Map a PostgreSQL error (SQLSTATE + primary message only) to an ApiError."""
    state = sqlstate or ""
    kind = _BY_SQLSTATE.get(state) or _BY_CLASS.get(state[:2], SQL_ERROR)
    if kind is INTERNAL or state.startswith("XX"):
        message = "the database reported an internal error"
    elif state.startswith("22"):
        message = withhold_values(message)
    elif kind is STATEMENT_TIMEOUT:
        message = "statement cancelled: it ran past its time limit"
    retry = 1 if kind.retryable else None
    return ApiError(kind, message, sqlstate=state or None, retry_after_s=retry)


def error_body(err: ApiError, request_id: str) -> dict[str, Any]:
    """The error object every error response carries (docs/api.md)."""
    body: dict[str, Any] = {"code": err.kind.code, "message": err.message, "sqlstate": err.sqlstate,
            "retryable": err.kind.retryable, "request_id": request_id}
    if err.problems is not None:
        body["problems"] = err.problems
    return body
