"""Application assembly: middlewares in order, routes, and starting/stopping both ports."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from . import admin, handlers
from .auth import Authenticator
from .config import Settings
from .db import Database
from .errors import error_middleware
from .guard import Guard
from .keys import GATEWAY, REQUEST_ID

log = logging.getLogger("tenant_proxy")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one config; a reload builds a new one and swaps it whole."""

    settings: Settings
    authenticator: Authenticator
    guard: Guard

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        return cls(settings=settings,
                   authenticator=Authenticator(settings.auth, settings.tenancy.id_format),
                   guard=Guard(settings.guard))


@dataclass(slots=True)
class Gateway:
    runtime: Runtime
    database: Database
    draining: bool = False
    runners: list[web.AppRunner] = field(default_factory=list)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Echo a sane caller-sent X-Request-Id, or make one; set it on every response."""
    sent = request.headers.get("X-Request-Id")
    rid = sent if sent and _REQUEST_ID_RE.match(sent) else uuid.uuid4().hex
    request[REQUEST_ID] = rid
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["X-Request-Id"] = rid
        raise
    response.headers["X-Request-Id"] = rid
    return response


def _application(gateway: Gateway, client_max_size: int) -> web.Application:
    app = web.Application(middlewares=[request_id_middleware, error_middleware], client_max_size=client_max_size)
    app[GATEWAY] = gateway
    admin.add_health_routes(app)
    return app


def create_apps(gateway: Gateway) -> tuple[web.Application, web.Application]:
    """The data application (public API) and the admin application."""
    settings = gateway.runtime.settings
    data = _application(gateway, settings.server.max_request_bytes)
    data.router.add_post("/v1/query", handlers.query)
    data.router.add_post("/v1/transaction", handlers.transaction)
    admin_app = _application(gateway, 1024 * 1024)
    return data, admin_app


@dataclass(slots=True)
class RunningGateway:
    gateway: Gateway
    port: int
    admin_port: int

    async def stop(self) -> None:
        gw = self.gateway
        gw.draining = True
        for runner in gw.runners:
            await runner.cleanup()
        gw.runners.clear()
        await gw.database.close()


async def start_gateway(settings: Settings) -> RunningGateway:
    """Open the pools and bind both ports (port 0 picks a free one)."""
    database = Database(settings.database, settings.tenancy.guc)
    await database.start()
    gateway = Gateway(runtime=Runtime.build(settings), database=database)
    data_app, admin_app = create_apps(gateway)
    ports = []
    for app, host, port in ((data_app, settings.server.host, settings.server.port),
                            (admin_app, settings.server.admin_host, settings.server.admin_port)):
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.server.shutdown_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        gateway.runners.append(runner)
        ports.append(runner.addresses[-1][1])
    return RunningGateway(gateway=gateway, port=ports[0], admin_port=ports[1])
