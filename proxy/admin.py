"""Health endpoints (on both ports) and the admin application: metrics and hotspots."""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import pgbouncer
from .config import canonical_tenant_id
from .errors import INVALID_REQUEST, ApiError
from .keys import GATEWAY

PGBOUNCER_TIMEOUT_S = 1.0


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


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; PgBouncer's figures are read now, with a short timeout."""
    gw = request.app[GATEWAY]
    dsn = gw.runtime.settings.database.pgbouncer_admin_dsn
    if dsn:
        gw.metrics.pgbouncer = await pgbouncer.read(dsn, PGBOUNCER_TIMEOUT_S)
    # Rendering is CPU work under prometheus_client's locks: keep it off the event loop.
    body, content_type = await asyncio.get_running_loop().run_in_executor(
        None, gw.metrics.exposition, request.headers.get("Accept"))
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def hotspots(request: web.Request) -> web.Response:
    """The current top tenants by database time (estimates over the hotspot window)."""
    gw = request.app[GATEWAY]
    return web.json_response({"window_s": gw.runtime.settings.metrics.hotspot_window_s,
                              "tenants": gw.metrics.hotspots()})


async def tenant(request: web.Request) -> web.Response:
    """One tenant's figures, whether or not it is in the top set."""
    gw = request.app[GATEWAY]
    settings = gw.runtime.settings
    tid = canonical_tenant_id(request.match_info["tenant_id"], settings.tenancy.id_format)
    if tid is None:
        raise ApiError(INVALID_REQUEST, f"not a valid {settings.tenancy.id_format} tenant id")
    return web.json_response(gw.metrics.tenant(tid))


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/hotspots", hotspots)
    app.router.add_get("/admin/tenants/{tenant_id}", tenant)
