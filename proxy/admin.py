"""Health endpoints (on both ports) and the admin application."""

from __future__ import annotations

from aiohttp import web

from .keys import GATEWAY


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """A real round trip through PgBouncer succeeds, and the gateway is not draining."""
    gw = request.app[GATEWAY]
    if gw.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not await gw.database.ping():
        return web.json_response({"status": "database unavailable"}, status=503)
    return web.json_response({"status": "ready"})


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
