"""Statement descriptions remembered per SQL text, and the wire messages that use them.

Through PgBouncer 1.18 in transaction mode asyncpg cannot keep prepared statements
(``statement_cache_size=0``), so it parses and describes every statement: Parse+Describe,
wait for the types, then Parse+Bind+Execute+Sync (it parses unnamed statements again in
front of their Bind).  The first time the gateway runs a SQL text it does the same, and
remembers what PostgreSQL described (asyncpg's statement state: parameter types and
their codecs, result columns and theirs).  Afterwards, as the first statement of a
transaction, the statement goes out as::

    BEGIN, SET LOCAL ..., SET LOCAL ...    Parse/Bind/Execute each (``pipelined``)
    Parse+Bind+Execute+Sync                (asyncpg's bind_execute, remembered state)
    ...
    <pool wall>; SELECT WHERE NOT tenant_ddl.check_schema_version(<v>, <search_path>); COMMIT

in one round trip before the COMMIT, where an undescribed statement needs two.

Never a stale description.  Types depend on the catalog and on the session's
search_path; every DDL transaction bumps ``tenant_ddl.schema_version`` as part of itself
(deploy/sql/006_schema_version.sql), and the check fails (SQLSTATE TPSV1, the message
ends with the current version) unless the version, the backend's search_path and the
transaction's isolation (READ COMMITTED) are what descriptions were remembered under.

* Describing: the check travels with the prefix (it returns no row), so descriptions
  come only from backends that pass it; each is remembered under the version known
  *before* it was described, never newer than the catalog it came from.
* Using one: the COMMIT runs the check, after the statement was parsed.  Under READ
  COMMITTED its snapshot is newer than that Parse, so whatever catalog the Parse saw,
  the check sees that version too.  A result that streams is checked before its first
  row leaves.  If the statement itself fails, the check is run on its own to tell a
  schema change from the caller's error.
* On a failed check the transaction rolls back (nothing was answered yet), every
  description is forgotten, version, search_path and isolation are learnt again, and the
  request runs again, described.  If the check cannot run at all (revoked, dropped),
  descriptions are turned off.

Other isolation levels take their snapshot at the first Parse, before the check could,
so they always describe.  Without the SQL file the gateway describes every statement.
Not covered: DDL with event triggers disabled (``session_replication_role = replica``).
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
# The check function is gone or may not be called (revoked, schema dropped).
_CHECK_MISSING = frozenset({"42883", "3F000", "42501", "42P01"})

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
    version: int


class Descriptions:
    """A bounded LRU of descriptions, valid for one schema version."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.version: int | None = None          # None until learnt
        self.available = size > 0                # False once the database lacks the check
        self.read_committed_default = False      # the role's default isolation
        self.search_path = ""                    # the backends' (checked with the version)
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

    def remember(self, sql: str, state: Any, params: list[tuple[str, str, str | None]],
                 columns: list[tuple[str, str]], oids: list[int], version: int) -> None:
        self._entries[sql] = Described(state, params, columns, oids, version)
        self._entries.move_to_end(sql)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def check_sql(self, version: int) -> str:
        """The check (a statement that returns no row, or fails with TPSV1)."""
        path = "'" + self.search_path.replace("'", "''") + "'"
        return f"SELECT WHERE NOT tenant_ddl.check_schema_version({int(version)}, {path})"

    def check_failed(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the check's verdict: the schema, search_path or isolation is
        not what descriptions were remembered under (every description is forgotten and
        all three are learnt again), or the check cannot run any more (descriptions are
        turned off).  The caller then rolls back and runs the transaction again, described."""
        state = getattr(exc, "sqlstate", None) or ""
        if state == SCHEMA_CHANGED:
            self.version = None
        elif state in _CHECK_MISSING and "schema_version" in f"{exc} {getattr(exc, 'context', None) or ''}":
            self.available = False
            log.warning("statement descriptions turned off: the schema check failed (%s)", state)
        else:
            return False
        self._entries.clear()
        self.stale += 1
        return True

    async def changed_since(self, conn: asyncpg.Connection, check: str, timeout: float) -> bool:
        """After a statement that used a description failed (and was rolled back): was it
        the description?  Runs the check on its own; True when it fails (see above)."""
        try:
            await conn.execute(check, timeout=timeout)
        except asyncpg.PostgresError as exc:
            return self.check_failed(exc)
        return False

    def _learn_from(self, exc: asyncpg.PostgresError) -> None:
        message = getattr(exc, "message", "") or ""
        tail = message.rsplit(" ", 1)[-1]
        self.version = int(tail) if tail.lstrip("-").isdigit() else None

    async def learn(self, conn: asyncpg.Connection, timeout: float) -> None:
        """The schema version and default isolation, once (and again after a failure that
        left them unknown); turns descriptions off when the database lacks the check."""
        try:
            row = await conn.fetchrow("SELECT pg_catalog.current_setting('default_transaction_isolation') AS iso, "
                                      "pg_catalog.current_setting('search_path') AS path", timeout=timeout)
            self.read_committed_default = row["iso"] == "read committed"
            self.search_path = row["path"]
            await conn.fetchval("SELECT tenant_ddl.check_schema_version(NULL, NULL)", timeout=timeout)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == SCHEMA_CHANGED:
                self._learn_from(exc)
            elif exc.sqlstate in _CHECK_MISSING:
                self.available = False
                log.info("statement descriptions are not remembered: the database lacks "
                         "tenant_ddl.check_schema_version (deploy/sql/006_schema_version.sql)")
            else:
                log.warning("could not read the schema version (%s); describing every statement for now",
                            exc.sqlstate)
