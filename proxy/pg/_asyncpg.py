"""The one door to asyncpg's private internals: every private attribute, method or
message text of asyncpg the gateway relies on is used here, and only here.

Checked against asyncpg 0.32.0 (``CHECKED_AGAINST``; pyproject pins ``>=0.32,<0.33``).
tests/integration/test_asyncpg_door.py is the upgrade contract: it asserts that each of
these exists and behaves as relied on, against a real PostgreSQL behind PgBouncer, and
fails loudly on an asyncpg that changed them.  To upgrade asyncpg: widen the pin, run
that file, fix what it names here, then the whole suite.

Why the gateway goes below asyncpg's public API at all:

* the hot path sends Parse+Describe, then one Bind+Execute+Sync with a row limit
  (``prepare_unnamed``, ``bind_execute``, ``execute_portal``), with no second Parse and
  no server-side cursor: what asyncpg's own cursors do through its protocol object;
* it writes its own pipelined messages onto a connection (``write_raw``) and hands
  connections back to the pool without a task per request (``release``);
* the pool connects through the loop asyncpg is given (pg/wire.py relies on asyncpg
  0.32 opening its connection with ``loop.create_connection`` /
  ``create_unix_connection`` / ``start_tls``, and on ``is_protocol``);
* asyncpg toggles JIT during type introspection unless told the server has none
  (``skip_jit_toggle``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from typing import Any

import asyncpg

CHECKED_AGAINST = "0.32.0"

log = logging.getLogger("tenant_proxy.db")

Rows = list[asyncpg.Record]


# -- the pool --------------------------------------------------------------------------


def connection_of(pooled: Any) -> Any:
    """The connection behind the pool's proxy object (``PoolConnectionProxy._con``);
    None once it was released.  Calls on it skip the proxy's check per call."""
    return pooled._con


def pool_has_connected_idle(pool: asyncpg.Pool) -> bool:
    """Whether the pool hands out a connected connection without waiting: a holder in
    its queue (``Pool._queue``, an asyncio.LifoQueue: ``_queue`` is its deque) has a
    live one.  Anything unexpected answers False, which only costs the caller a timer."""
    try:
        return any(holder.is_connected() for holder in reversed(pool._queue._queue))
    except AttributeError:
        return False


def releases_at_once(pooled: Any) -> bool:
    """Whether the pooled connection goes back without anything to send: no transaction
    (asyncpg's nor the gateway's pipelined one), no cancellation in progress
    (``Protocol._is_cancelling``), no transaction object (``Connection._top_xact``)."""
    try:
        con = pooled._con
        return (con is not None and not con.gateway_tx_open and not con.is_closed() and not con.is_in_transaction()
                and not con._protocol._is_cancelling() and con._top_xact is None)
    except AttributeError:
        return False


async def release(pool: asyncpg.Pool, pooled: Any, timeout: float) -> None:
    """Hand a connection back; ``timeout`` bounds what the release may wait for (a
    cancellation in progress, the ROLLBACK): past it the connection is terminated.

    ``Pool.release`` runs the holder's release in a task of its own (``asyncio.shield``),
    so that a cancellation cannot interrupt it half-way.  A connection that
    ``releases_at_once`` goes back without suspending once (asyncpg's reset and the
    pool's ``no_reset`` have nothing to send), so nothing can interrupt it: it is
    released directly (``_holder``, ``Connection._on_release``, ``holder.release``),
    without that task.  When the server side dies at that very moment, asyncpg's
    connection-lost callback can free the holder between release's own check and its
    task: the connection is already gone from the pool then, which is all release would do."""
    try:
        if releases_at_once(pooled):
            holder = pooled._holder
            pooled._con._on_release()
            await holder.release(timeout)
            return
        await pool.release(pooled, timeout=timeout)
    except asyncpg.InternalClientError as exc:
        log.warning("connection already returned to the pool: %s", exc)


# -- one connection --------------------------------------------------------------------


def write_raw(conn: Any, data: bytes) -> None:
    """Write protocol messages straight onto the connection's transport (``_transport``)."""
    conn._transport.write(data)


def skip_jit_toggle(conn: asyncpg.Connection) -> None:
    """Make asyncpg's type introspection leave JIT alone (``_server_caps.jit``): it would
    run ``set_config('jit', ...)``, a session-level change the gateway's role may not make."""
    conn._server_caps = conn._server_caps._replace(jit=False)


def is_protocol(obj: Any) -> bool:
    """Whether ``obj`` is asyncpg's protocol for a connection (``asyncpg.protocol.Protocol``)."""
    return isinstance(obj, asyncpg.protocol.Protocol)


async def prepare_unnamed(conn: asyncpg.Connection, sql: str, timeout: float) -> Any:
    """Parse+Describe ``sql`` as the unnamed statement; asyncpg's statement state for it.

    ``Connection.prepare`` with the statement cache off marks an unnamed statement
    "unprepared", so that its execution sends the Parse again (for poolers that move a
    client between backends outside a transaction).  The gateway's statements run inside
    its own transaction, on one backend, and nothing is parsed between this Describe and
    the Bind that follows it: the second Parse would only make PostgreSQL parse and
    analyse the statement twice.  A statement whose types asyncpg must first look up
    (``_init_types`` is true: its introspection query replaces the unnamed statement)
    takes asyncpg's own path (``PreparedStatement._state``)."""
    protocol = conn._protocol
    state = await protocol.prepare("", sql, timeout, record_class=protocol.get_record_class())
    if state._init_types():
        return (await conn.prepare(sql, timeout=timeout))._state
    state._init_codecs()
    return state


def parameter_types(state: Any) -> Sequence[Any]:
    """The statement's parameter types (asyncpg's Type tuples: oid, name, kind, schema)."""
    result: Sequence[Any] = state._get_parameters()
    return result


def result_attributes(state: Any) -> Sequence[Any]:
    """The statement's result columns (asyncpg's Attribute tuples: name, type)."""
    result: Sequence[Any] = state._get_attributes()
    return result


def portal_name(conn: asyncpg.Connection) -> str:
    """A portal name unique on the connection (``Connection._get_unique_id``)."""
    name: str = conn._get_unique_id("portal")
    return name


def bind_execute(conn: asyncpg.Connection, state: Any, params: Sequence[Any], portal: str, limit: int,
                 timeout: float) -> Awaitable[tuple[Rows, bytes | None, bool]]:
    """Bind+Execute(limit)+Sync in one write: the rows, the command tag (None while the
    portal has more rows) and whether the portal is done (``Protocol.bind_execute``).
    The protocol's own awaitable, not a coroutine around it: this is once per statement."""
    result: Awaitable[tuple[Rows, bytes | None, bool]] = conn._protocol.bind_execute(
        state, params, portal, limit, True, timeout)
    return result


def execute_portal(conn: asyncpg.Connection, state: Any, portal: str, limit: int,
                   timeout: float) -> Awaitable[tuple[Rows, bytes | None, bool]]:
    """Read ``limit`` more rows of an open portal (``Protocol.execute``)."""
    result: Awaitable[tuple[Rows, bytes | None, bool]] = conn._protocol.execute(state, portal, limit, True, timeout)
    return result


# -- what asyncpg's own errors mean (by their message: asyncpg gives no other sign) ----

# A type asyncpg can neither send nor look up, found while preparing: the connection is
# between two steps, in a clean state.
_UNHANDLED_TYPE = ("no encoder", "could not resolve query result and/or argument types")
# A message nobody asked for took the protocol over between two steps (PgBouncer passing
# on the FATAL of a backend that was terminated).
_PROTOCOL_BROKEN = "cannot switch to state"
# Raised while decoding a result: a composite element of a type it has no decoder for.
_NO_DECODER = "no decoder"


def driver_failure(exc: asyncpg.UnsupportedClientFeatureError | asyncpg.InternalClientError) -> str:
    """What one of asyncpg's client-side errors says happened: ``"unhandled_type"``,
    ``"protocol_broken"``, ``"no_decoder"``, ``"outdated_schema"`` or ``"unexpected"``."""
    message = str(exc)
    if message.startswith(_UNHANDLED_TYPE):
        return "unhandled_type"
    if _PROTOCOL_BROKEN in message:
        return "protocol_broken"
    if isinstance(exc, asyncpg.OutdatedSchemaCacheError):
        return "outdated_schema"
    if message.startswith(_NO_DECODER) or not isinstance(exc, asyncpg.InternalClientError):
        return "no_decoder"
    return "unexpected"
