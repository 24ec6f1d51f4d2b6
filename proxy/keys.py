"""Every aiohttp AppKey and RequestKey the gateway uses, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .trace import RequestTrace

if TYPE_CHECKING:
    from .app import Gateway  # noqa: F401 - used in the AppKey annotation string

# Both the data and the admin application carry the same Gateway: the current
# runtime (settings, authenticator, guard; swapped whole on reload) and the pools.
GATEWAY = web.AppKey["Gateway"]("gateway")

REQUEST_ID = web.RequestKey[str]("request_id")
TRACE = web.RequestKey[RequestTrace]("trace")
