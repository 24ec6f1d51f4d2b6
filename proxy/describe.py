"""Statement descriptions remembered per SQL text, and the wire messages that use them.

Through PgBouncer 1.18 in transaction mode asyncpg cannot keep prepared statements
(``statement_cache_size=0``), so it parses and describes every statement: Parse+Describe,
wait for the types, then Bind+Execute+Sync.  The first time the gateway runs a SQL text
it does the same, and remembers what PostgreSQL described (asyncpg's statement state:
parameter types and their codecs, result columns and theirs).  Afterwards, as the first
statement of a transaction, the statement goes out as::

    BEGIN, SET LOCAL ..., SET LOCAL ...    Parse/Bind/Execute each (``pipelined``)
    Parse <sql> with the remembered parameter types
    Bind+Execute+Sync                      (asyncpg's bind_execute)
    ...
    SELECT <pool wall>, tenant_ddl.check_schema_version(<v>); COMMIT

in one round trip before the COMMIT, where an undescribed statement needs two.

Never a stale description: every DDL transaction bumps ``tenant_ddl.schema_version`` as
part of itself (deploy/sql/006_schema_version.sql), and the transaction commits only if
the version is still the one the description was remembered under.  Under READ
COMMITTED that check reads the version with a snapshot taken after the statement was
parsed, so whatever catalog the Parse saw, the check sees its version too (a description
is remembered under the version known *before* it was described, never newer than the
catalog it came from).  A mismatch (SQLSTATE TPSV1; the message ends with the current
version) fails the COMMIT: the transaction rolls back, nothing was answered yet, and the
gateway runs the request again, described, having forgotten its descriptions.  So does
any error a changed schema could cause before that (a Parse that no longer type-checks,
a row that does not decode).  A result large enough to stream checks the version before
the first row leaves.  Other isolation levels take their snapshot at the first Parse,
before the check could, so they always describe.  Without the SQL file the gateway
describes every statement.
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

log = logging.getLogger("tenant_proxy.db")

SCHEMA_CHANGED = "TPSV1"
# Errors a statement parsed with remembered types can meet when the catalog changed
# before the check could run: undefined or mismatched types, columns, functions (class
# 42, except 42501: privileges and row-level security), a Bind that no longer fits.
_STALE_STATES = frozenset({"08P01", "22P03", "0A000"})

# Bind (unnamed portal, unnamed statement, no parameters, default result format) + Execute (all rows).
_BIND_EXECUTE = (b"B" + struct.pack("!i", 4 + 2 + 6) + b"\0\0" + b"\0\0" * 3
                 + b"E" + struct.pack("!i", 4 + 1 + 4) + b"\0" + b"\0\0\0\0")


def parse_message(sql: str, param_oids: Sequence[int] = ()) -> bytes:
    """Parse into the unnamed statement, with explicit parameter types when given."""
    query = sql.encode()
    body = b"\0" + query + b"\0" + struct.pack(f"!h{len(param_oids)}I", len(param_oids), *param_oids)
    return b"P" + struct.pack("!i", 4 + len(body)) + body


def pipelined(statements: Sequence[str]) -> bytes:
    """``statements`` as Parse/Bind/Execute messages with no Sync after them.

    Written straight onto the connection just before asyncpg's own messages, they run
    in the same round trip, ahead of them: asyncpg's prepare and bind-execute states
    skip the ParseComplete/BindComplete/CommandComplete replies they produce, and an
    error among them ends asyncpg's operation with that error."""
    return b"".join(parse_message(sql) + _BIND_EXECUTE for sql in statements)


@dataclass(frozen=True, slots=True)
class Described:
    state: Any                                 # asyncpg's PreparedStatementState (types, codecs)
    params: list[tuple[str, str, str | None]]  # (type name, kind, element) per parameter
    columns: list[tuple[str, str]]
    oids: list[int]
    parse: bytes                               # Parse for the unnamed statement, with the parameter types
    version: int


class Descriptions:
    """A bounded LRU of descriptions, valid for one schema version."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.version: int | None = None          # None until learnt
        self.available = size > 0                # False once the database lacks the check
        self.read_committed_default = False      # the role's default isolation
        self._entries: OrderedDict[str, Described] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stale = 0

    def __len__(self) -> int:
        return len(self._entries)

    def usable(self, isolation: str | None) -> bool:
        if not self.available or self.version is None:
            return False
        return isolation == "read committed" or (isolation is None and self.read_committed_default)

    def lookup(self, sql: str) -> Described | None:
        entry = self._entries.get(sql)
        if entry is None or entry.version != self.version:
            self.misses += 1
            return None
        self._entries.move_to_end(sql)
        self.hits += 1
        return entry

    def remember(self, sql: str, state: Any, params: list[tuple[str, str, str | None]], param_oids: list[int],
                 columns: list[tuple[str, str]], oids: list[int], version: int) -> None:
        self._entries[sql] = Described(state, params, columns, oids, parse_message(sql, param_oids), version)
        self._entries.move_to_end(sql)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    @staticmethod
    def check_sql(version: int) -> str:
        """The check on its own, before a result starts streaming (the COMMIT's round
        trip has it as a column of the pool wall's statement)."""
        return f"SELECT WHERE NOT tenant_ddl.check_schema_version({int(version)})"

    def is_stale(self, exc: BaseException, sql: str) -> bool:
        """Whether a transaction that used the remembered description of ``sql`` failed
        for a reason a fresh description may not have; the caller then rolls back and
        runs the transaction again, described.  Those reasons: the failed check (every
        description is forgotten: they all predate the schema change), errors PostgreSQL
        raises while parsing or binding (class 42, except 42501: privileges and row-level
        security) and trouble encoding parameters or decoding rows with the remembered
        codecs (that one description is forgotten: the others meet the check themselves)."""
        if isinstance(exc, asyncpg.PostgresError):
            state = exc.sqlstate or ""
            if state == SCHEMA_CHANGED:
                self._learn_from(exc)
                self._entries.clear()
            elif state in _STALE_STATES or (state.startswith("42") and state != "42501"):
                self._entries.pop(sql, None)
            else:
                return False
        else:
            self._entries.pop(sql, None)
        self.stale += 1
        return True

    def _learn_from(self, exc: asyncpg.PostgresError) -> None:
        message = getattr(exc, "message", "") or ""
        tail = message.rsplit(" ", 1)[-1]
        self.version = int(tail) if tail.lstrip("-").isdigit() else None

    async def learn(self, conn: asyncpg.Connection, timeout: float) -> None:
        """The schema version and default isolation, once (and again after a failure that
        left them unknown); turns descriptions off when the database lacks the check."""
        try:
            iso = await conn.fetchval("SELECT pg_catalog.current_setting('default_transaction_isolation')",
                                      timeout=timeout)
            self.read_committed_default = iso == "read committed"
            await conn.fetchval("SELECT tenant_ddl.check_schema_version(NULL)", timeout=timeout)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == SCHEMA_CHANGED:
                self._learn_from(exc)
            elif exc.sqlstate in ("42883", "3F000", "42501"):
                self.available = False
                log.info("statement descriptions are not remembered: the database lacks "
                         "tenant_ddl.check_schema_version (deploy/sql/006_schema_version.sql)")
            else:
                log.warning("could not read the schema version (%s); describing every statement for now",
                            exc.sqlstate)
