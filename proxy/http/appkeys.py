"""Every aiohttp AppKey and RequestKey the gateway uses, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ..observe.trace import RequestTrace

if TYPE_CHECKING:
    from ..errors import ApiError
    from .app import Gateway  # noqa: F401 - used in the AppKey annotation string

# Both the data and the admin application carry the same Gateway: the current
# runtime (settings, authenticator, guard; swapped whole on reload) and the pools.
GATEWAY = web.AppKey["Gateway"]("gateway")

REQUEST_ID = web.RequestKey[str]("request_id")
TRACE = web.RequestKey[RequestTrace]("trace")
# Who is making an admin request: the admin.tokens entry's name ("anonymous" without tokens).
ADMIN_ACTOR = web.RequestKey[str]("admin_actor")
# Set by an endpoint whose errors take another shape than the standard one (POST /sql).
ERROR_RENDERER = web.RequestKey[Callable[["ApiError", str], web.Response]]("error_renderer")
# The OpenAPI document, serialised once at start (GET /openapi.json on both ports).
OPENAPI = web.AppKey[bytes]("openapi")
