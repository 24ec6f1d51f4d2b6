"""The transport the pool's connections write through, so the gateway can splice its own
messages into what asyncpg sends (pool.py's transaction prefix and pipelined COMMIT).

asyncpg writes Bind+Execute+Sync as one piece and offers no hook in between; the pool's
``connect`` (``connect`` here) makes each connection through ``ConnectVia``, which hands
asyncpg's protocol a ``SplicingTransport`` instead of the loop's transport.  Relies on
asyncpg creating its connection through ``loop.create_connection`` /
``create_unix_connection`` / ``start_tls`` of the loop it is given (_asyncpg.py and its
contract test cover this).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg

from ._asyncpg import is_protocol

_SYNC = b"S\0\0\0\4"


class SplicingTransport:
    """The transport asyncpg's protocol writes through.  It passes every write on, except
    that messages armed in ``front`` go in front of the next write, and messages armed
    in ``before_sync`` go in front of the Sync that ends the next write ending in one
    (asyncpg writes Bind+Execute+Sync as one): in the same send, each used once.

    It also meters what the connection reads (``_Meter``): with ``read_limit`` set, once
    more than that many bytes arrived since ``read_used`` was last zeroed, the connection
    is aborted and ``overread`` set.  asyncpg decodes a whole batch of rows before it
    hands any over, so this is what bounds the memory one response can take (a row of
    ``repeat('x', 500000000)`` is one message)."""

    __slots__ = ("_transport", "before_sync", "front", "overread", "per_element", "read_limit", "read_used")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.front: bytes | None = None
        self.before_sync: bytes | None = None
        self.read_limit = 0  # 0: not metered
        self.read_used = 0
        self.overread = False
        self.per_element = False  # the limit is statement.ELEMENT_READ_BYTES's

    def arm_read_limit(self, limit: int) -> None:
        self.read_limit, self.read_used, self.overread, self.per_element = limit, 0, False, False

    def set_protocol(self, protocol: Any) -> None:
        """asyncpg's TLS path hands its protocol over itself: meter it too."""
        self._transport.set_protocol(protocol if isinstance(protocol, _Meter) else _Meter(protocol, self))

    def write(self, data: Any) -> None:
        front, tail = self.front, self.before_sync
        if front is None and tail is None:
            self._transport.write(data)
            return
        parts = []
        if front is not None:
            self.front = None
            parts.append(front)
        if tail is not None and data[-5:] == _SYNC:
            self.before_sync = None
            parts += (data[:-5], tail, _SYNC)
        else:
            parts.append(data)
        self._transport.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Meter(asyncio.Protocol):
    """Between the transport and asyncpg's protocol: counts what arrives against the
    ``SplicingTransport``'s ``read_limit``, and passes everything on."""

    __slots__ = ("_inner", "_writer")

    def __init__(self, protocol: Any, writer: SplicingTransport) -> None:
        self._inner = protocol
        self._writer = writer

    def data_received(self, data: Any) -> None:
        writer = self._writer
        if writer.read_limit:
            writer.read_used += len(data)
            if writer.read_used > writer.read_limit:
                writer.overread = True
                writer._transport.abort()  # asyncpg's protocol hears connection_lost
                return
        self._inner.data_received(data)

    def connection_made(self, transport: Any) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._inner.connection_lost(exc)

    def eof_received(self) -> Any:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Adopt(asyncio.Protocol):
    """Hands the new transport to asyncpg's protocol through a ``SplicingTransport``
    (asyncpg's own TLS upgrade path does the same with ``set_protocol``)."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.writer: SplicingTransport | None = None

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are no asyncio.Transport
        self.writer = SplicingTransport(transport)
        transport.set_protocol(_Meter(self.protocol, self.writer))
        self.protocol.connection_made(self.writer)


class ConnectVia:
    """The event loop as ``asyncpg.connect`` sees it (``connect``): the loop itself, but
    asyncpg's protocol gets the connection's transport wrapped in a ``SplicingTransport``,
    left in ``writer``.  Either the loop hands it over (``_Adopt``), or asyncpg does, after
    its SSL negotiation (``sslmode`` prefer and up), with what ``create_connection`` or
    ``start_tls`` returned.  asyncpg's protocol keeps this object as its loop (for its
    timers); the connection gets the real one (``connection.GatewayConnection``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.real_loop = loop
        self.writer: SplicingTransport | None = None

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.real_loop, name)
        setattr(self, name, value)  # looked up once
        return value

    async def create_connection(self, factory: Callable[[], Any], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return await self._open(self.real_loop.create_connection, factory, *args, **kwargs)

    async def create_unix_connection(self, factory: Callable[[], Any], *args: Any,
                                     **kwargs: Any) -> tuple[Any, Any]:
        return await self._open(self.real_loop.create_unix_connection, factory, *args, **kwargs)

    async def start_tls(self, transport: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(transport, SplicingTransport):
            transport = transport._transport
        upgraded = await self.real_loop.start_tls(transport, *args, **kwargs)
        self.writer = None if upgraded is None else SplicingTransport(upgraded)
        return self.writer

    async def _open(self, open_connection: Callable[..., Any], factory: Callable[[], Any], *args: Any,
                    **kwargs: Any) -> tuple[Any, Any]:
        adopted: list[_Adopt] = []

        def make() -> Any:
            protocol = factory()
            if is_protocol(protocol):
                adopted.append(_Adopt(protocol))
                return adopted[-1]
            return protocol

        transport, protocol = await open_connection(make, *args, **kwargs)
        if adopted:
            self.writer = adopted[0].writer
            return transport, adopted[0].protocol
        self.writer = SplicingTransport(transport)  # asyncpg's SSL negotiation hands it over
        return self.writer, protocol


async def connect(*args: Any, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> asyncpg.Connection:
    """The pool's ``connect``: asyncpg's, through ``ConnectVia``."""
    return await asyncpg.connect(*args, loop=ConnectVia(loop), **kwargs)
