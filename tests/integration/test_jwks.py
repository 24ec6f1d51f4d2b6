"""JWTs signed by an identity provider: keys fetched from its JWKS URL (or found by OpenID
discovery), rotated, refetched for an unknown kid at most once per interval, and kept when
the provider goes down.  The provider is a small aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import parse_config

from ..fix_gateway import TENANT_A, Api, base_config, running_gateway
from ..fix_stack import Stack

AUDIENCE = "tenant-proxy"


@dataclass
class Provider:
    """An identity provider's key endpoints; what it serves can change during a test."""

    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)  # kids in the JWKS
    down: bool = False
    jwks_hits: int = 0
    discovery_hits: int = 0
    url: str = ""

    def key(self, kid: str) -> rsa.RSAPrivateKey:
        if kid not in self.keys:
            self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.keys[kid]

    def publish(self, *kids: str) -> None:
        self.published = list(kids)

    def token(self, kid: str, issuer: str = "test-idp", **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": f"user-{kid}", "iss": issuer, "aud": AUDIENCE, "iat": now, "exp": now + 60,
                   "tenant_id": TENANT_A, "jti": uuid.uuid4().hex, **claims}
        return jwt.encode(payload, self.key(kid), algorithm="RS256", headers={"kid": kid})

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        if self.down:
            return web.Response(status=503, text="down for maintenance")
        keys = []
        for kid in self.published:
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key(kid).public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        # an encryption key the gateway must leave out
        enc = jwt.algorithms.RSAAlgorithm.to_jwk(self.key("enc").public_key(), as_dict=True)
        keys.append({**enc, "kid": "enc", "use": "enc"})
        return web.json_response({"keys": keys})

    async def discovery(self, request: web.Request) -> web.Response:
        self.discovery_hits += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/keys/jwks.json"})


@asynccontextmanager
async def provider() -> AsyncIterator[Provider]:
    idp = Provider()
    app = web.Application()
    app.router.add_get("/keys/jwks.json", idp.jwks)
    app.router.add_get("/.well-known/openid-configuration", idp.discovery)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    idp.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield idp
    finally:
        await runner.cleanup()


def gateway(stack: Stack, **jwt_cfg: Any) -> Any:
    cfg = base_config(stack)
    cfg["auth"]["jwt"] = {"algorithms": ["RS256"], "audience": AUDIENCE, "issuer": "test-idp", **jwt_cfg}
    return running_gateway(parse_config(cfg, env={}))


async def tenant_of(api: Api, token: str) -> tuple[int, Any]:
    r = await api.query("SELECT current_setting('app.tenant_id') AS t", key=token)
    return r.status, r.body["rows"][0]["t"] if r.status == 200 else r.code


async def test_keys_from_the_provider_and_rotation(stack: Stack, admin_db: asyncpg.Connection) -> None:
    async with provider() as idp:
        idp.publish("k1")
        async with gateway(stack, jwks_url=f"{idp.url}/keys/jwks.json") as api:
            assert idp.jwks_hits == 1  # fetched at start
            assert await tenant_of(api, idp.token("k1")) == (200, TENANT_A)
            assert await tenant_of(api, idp.token("k1", aud="other")) == (401, "unauthenticated")
            # rotation: the provider adds k2; the first token with kid k2 fetches the set again
            idp.publish("k1", "k2")
            assert await tenant_of(api, idp.token("k2")) == (200, TENANT_A)
            assert idp.jwks_hits == 2
            k1_token = idp.token("k1")
            assert await tenant_of(api, k1_token) == (200, TENANT_A)
            # made-up kids (and the provider's encryption key) cannot make the gateway hammer
            # the provider: at most one refetch per jwks_min_refresh_s (30 s), and that was k2's
            for kid in ("enc", "k3", "k3", "k4", "k5"):
                assert await tenant_of(api, idp.token(kid)) == (401, "unauthenticated")
            assert idp.jwks_hits == 2
            idp.publish("k2")  # k1 retired: picked up by the next scheduled refresh
            assert api.running.gateway.jwks is not None
            assert await api.running.gateway.jwks.refresh()
            # even a token verified (and cached) before: a retired key stops working at once
            assert await tenant_of(api, k1_token) == (401, "unauthenticated")
            assert await tenant_of(api, idp.token("k1")) == (401, "unauthenticated")
            assert await tenant_of(api, idp.token("k2")) == (200, TENANT_A)


async def test_provider_down_keeps_the_last_good_keys(stack: Stack, admin_db: asyncpg.Connection) -> None:
    async with provider() as idp:
        idp.publish("k1", "k2")
        async with gateway(stack, jwks_url=f"{idp.url}/keys/jwks.json", jwks_refresh_s=1,
                           jwks_min_refresh_s=0) as api:
            refresher = api.running.gateway.jwks
            assert refresher is not None
            idp.down = True
            deadline = time.monotonic() + 10
            while refresher.failures < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert refresher.failures >= 2  # scheduled refreshes kept failing...
            for kid in ("k1", "k2"):  # ...and the keys fetched before still work
                assert await tenant_of(api, idp.token(kid)) == (200, TENANT_A)
            # an unknown kid while the provider is down: a refetch is tried, fails, 401
            hits = idp.jwks_hits
            assert await tenant_of(api, idp.token("k3")) == (401, "unauthenticated")
            assert idp.jwks_hits == hits + 1
            idp.down = False
            idp.publish("k3")
            assert await tenant_of(api, idp.token("k3")) == (200, TENANT_A)


async def test_openid_discovery(stack: Stack, admin_db: asyncpg.Connection) -> None:
    async with provider() as idp:
        idp.publish("k1")
        async with gateway(stack, jwks_url="discover", issuer=idp.url) as api:
            assert (idp.discovery_hits, idp.jwks_hits) == (1, 1)
            assert await tenant_of(api, idp.token("k1", issuer=idp.url)) == (200, TENANT_A)
            # the issuer is checked as well as the signature
            assert await tenant_of(api, idp.token("k1", issuer="http://impostor")) == (401, "unauthenticated")
            idp.publish("k1", "k2")
            assert await tenant_of(api, idp.token("k2", issuer=idp.url)) == (200, TENANT_A)


async def test_provider_unreachable_at_start(stack: Stack, admin_db: asyncpg.Connection) -> None:
    """The gateway starts anyway (API keys work); JWTs work once the provider answers."""
    async with provider() as idp:
        idp.publish("k1")
        idp.down = True
        async with gateway(stack, jwks_url=f"{idp.url}/keys/jwks.json", jwks_min_refresh_s=0) as api:
            assert (await api.query("SELECT 1")).status == 200
            assert await tenant_of(api, idp.token("k1")) == (401, "unauthenticated")
            idp.down = False
            assert await tenant_of(api, idp.token("k1")) == (200, TENANT_A)
