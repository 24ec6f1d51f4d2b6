"""The one place an exception becomes an HTTP response (``error_middleware``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from ..errors import (
    INTERNAL,
    INVALID_REQUEST,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    ApiError,
    error_body,
)
from .appkeys import ERROR_RENDERER, REQUEST_ID, TRACE

log = logging.getLogger("tenant_proxy")


def error_response(err: ApiError, request_id: str) -> web.Response:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return web.Response(body=orjson.dumps({"error": error_body(err, request_id)}), status=err.kind.status,
                        content_type="application/json", headers=headers)


# aiohttp's own refusals; any other 4xx or 5xx of its is the caller's request being wrong.
_HTTP_KINDS = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 413: PAYLOAD_TOO_LARGE}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The only place an exception becomes an HTTP response; never a traceback to the caller."""
    allow = None
    try:
        return await handler(request)
    except ApiError as err:
        error = err
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_KINDS.get(exc.status, INVALID_REQUEST)
        message = "request body too large" if exc.status == 413 else (exc.reason or "request failed")
        error = ApiError(kind, message)
        allow = exc.headers.get("Allow")  # a 405 must say which methods the route takes
    except Exception:
        log.exception("unhandled error (request %s)", request[REQUEST_ID])
        error = ApiError(INTERNAL, "internal error")
    trace = request.get(TRACE)
    if trace is not None:
        trace.error_code = error.kind.code
    # An endpoint speaking another protocol's error format (neon.py) says so on the request.
    render: Callable[[ApiError, str], web.Response] = request.get(ERROR_RENDERER, error_response)
    response = render(error, request[REQUEST_ID])
    if allow is not None:
        response.headers["Allow"] = allow
    return response
