"""The middlewares around every request, outermost first: the request id (both ports),
then on the data port metrics, Server-Timing and the access log, once per request on the
way out (observe_middleware).  The error middleware (errors.py) is inside them."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import CLIENT_CLOSED
from ..observe.trace import RequestTrace
from .appkeys import GATEWAY, REQUEST_ID, TRACE

# Request ids the gateway makes: 32 hex digits, a random half per process and a counter,
# unique without a random draw (a system call) per request.  They name a request in
# logs and traces; they are not secrets.
_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count(1)


_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request_id(request: web.Request) -> str:
    """A sane caller-sent X-Request-Id, or a fresh one."""
    sent = request.headers.get("X-Request-Id")
    rid = sent if sent and _REQUEST_ID_RE.match(sent) else f"{_RID_PREFIX}{next(_rid_counter):016x}"
    request[REQUEST_ID] = rid
    return rid


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Echo a sane caller-sent X-Request-Id, or make one; set it on every response (admin port)."""
    rid = _request_id(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["X-Request-Id"] = rid
        raise
    if not response.prepared:  # a streamed response carries it from the start
        response.headers["X-Request-Id"] = rid
    return response


_UNMETERED = frozenset({"/healthz", "/readyz"})


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The data port's outer layer (one middleware, not two, on the hot path): the request
    id, and once per request on the way out metrics, Server-Timing and the access log."""
    rid = _request_id(request)
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "unmatched"
    metered = endpoint not in _UNMETERED
    trace = RequestTrace(endpoint=endpoint)
    request[TRACE] = trace
    started = time.perf_counter()
    status = 499  # the client went away before an answer
    try:
        response = await handler(request)
        # A stream the client hung up on went out as 200, but no answer arrived.
        status = 499 if trace.error_code == CLIENT_CLOSED.code else response.status
        if not response.prepared:  # a streamed response sent its headers already
            response.headers["X-Request-Id"] = rid
            if metered:
                response.headers["Server-Timing"] = trace.server_timing()
        return response
    except web.HTTPException as exc:
        exc.headers["X-Request-Id"] = rid
        raise
    finally:
        if metered:
            duration = time.perf_counter() - started
            gw = request.app[GATEWAY]
            gw.metrics.observe(trace, status, duration, rid)
            logging_cfg = gw.runtime.settings.logging
            if logging_cfg.access_log:
                gw.access.record(logging_cfg, trace, status, duration, rid)
