"""The deadline for a request's head on every HTTP connection (both ports), against slowloris.

aiohttp bounds nothing between accepting a connection and a complete request head but its
keep-alive timer (``keepalive_timeout``, 3630 s by default): a client that sends part of a
head and stalls holds its connection for an hour.  Here a connection that has not delivered
a complete head (request line and headers) within ``server.header_timeout_s`` of being
accepted, or, on a keep-alive connection, of the first byte of its next request, is closed.
A body that trickles is the body timeout's business (handlers.py); the wait between two
requests is keep-alive's.

When does a head begin and end?  aiohttp's C parser keeps its state to itself, so each chunk
read from the socket is fed to it as two, all but its last byte and then that byte (as TCP
could have delivered it): when the last byte completes a request (its head, or the body
after it), the chunk ended where a request did; otherwise, unless a body is still arriving,
a head is under way.  The one case this cannot tell, a parse that aiohttp resumes from data
it held back (a full pipelining queue, a body it paused), is settled when the deadline
passes, by asking the parser whether it holds part of a head.

aiohttp offers no hook for any of this: this module is the one place that reaches into its
internals (RequestHandler's ``_request_count``, ``_messages``, ``_waiter``, ``_close``,
``_force_close``, ``_upgraded``, ``_parser``, ``_loop``, ``_max_msg_queue_size``; Server's
``_loop`` and ``_kwargs``; AppRunner's ``_make_server``), checked against aiohttp 3.14.5.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

TimeoutSource = Callable[[], float]  # read once per connection, so that a reload applies to new ones


class HeadDeadlineHandler(RequestHandler):
    """aiohttp's connection handler, closing a connection whose request head is late."""

    __slots__ = ("_head_deadline", "_head_known", "_head_timeout", "_head_timer", "_latest_payload")

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout_s
        self._head_deadline: float | None = None  # None: no head is under way
        self._head_known = True  # False: one may be, behind data aiohttp held back
        self._head_timer: asyncio.TimerHandle | None = None
        self._latest_payload: StreamReader | None = None  # the body of the latest request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(known=True)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._close or self._force_close:
            super().data_received(data)
            return
        if data:
            restarted = len(data) > 1 and self._feed(data[:-1])
            at_end = self._feed(data[-1:])
            # with its queue full, the parser holds back what follows a request, unparsed
            held_back = at_end and len(self._messages) >= self._max_msg_queue_size
        else:  # aiohttp resuming a parse of data it held back: where that ends is unknown
            restarted = held_back = self._feed(data)
            at_end = False
        payload = self._latest_payload
        if payload is not None and not payload.is_eof():
            self._head_deadline = None  # a body is arriving
            return
        self._latest_payload = None  # no body under way: nothing to hold on to
        if held_back:
            self._arm(known=False)
        elif at_end:
            self._head_deadline = None  # the chunk ended where a request did
        elif restarted or (data and self._head_deadline is None):
            self._arm(known=True)  # a head began in this chunk
        # else: the head under way goes on, its deadline unchanged

    def _feed(self, data: bytes) -> bool:
        """Parse ``data``; whether that completed a request's head or body."""
        count, payload = self._request_count, self._latest_payload
        body_open = payload is not None and not payload.is_eof()
        super().data_received(data)
        if self._request_count != count:
            self._latest_payload = self._messages[-1][1]
            return True
        return body_open and payload is not None and payload.is_eof()

    def _arm(self, *, known: bool) -> None:
        deadline = self._loop.time() + self._head_timeout
        self._head_deadline, self._head_known = deadline, known
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self._close or self._force_close or self.transport is None:
            return
        now = self._loop.time()
        if now < deadline:  # moved on since the timer was set
            self._head_timer = self._loop.call_at(deadline, self._deadline_passed)
            return
        if self._waiter is None or self._waiter.done():
            # A request is being answered: it goes first, the head is looked at again later.
            self._head_timer = self._loop.call_at(now + self._head_timeout, self._deadline_passed)
            return
        if self._head_known or self._holds_partial_head():
            self.force_close()
        else:
            self._head_deadline = None

    def _holds_partial_head(self) -> bool:
        """Whether the parser holds part of a request head.  Only between requests (no body
        under way): the C parser's ``feed_eof`` then returns the message it would make of
        a head it has begun (or fails on it), and changes nothing when it has none."""
        assert self._parser is not None
        try:
            return self._parser.feed_eof() is not None
        except Exception:  # a partial head that cannot even be made into a message
            return True


class HeadDeadlineServer(web.Server):
    """aiohttp's low-level server, making ``HeadDeadlineHandler``s."""

    def __init__(self, base: web.Server, head_timeout: TimeoutSource) -> None:
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation, loop=base._loop, **base._kwargs)
        self._head_timeout = head_timeout

    def __call__(self) -> RequestHandler:
        return HeadDeadlineHandler(self, loop=self._loop, head_timeout_s=self._head_timeout(), **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections have a deadline for each request head."""

    __slots__ = ("_head_timeout",)

    def __init__(self, app: web.Application, *, head_timeout: TimeoutSource, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout = head_timeout

    async def _make_server(self) -> web.Server:
        return HeadDeadlineServer(await super()._make_server(), self._head_timeout)
