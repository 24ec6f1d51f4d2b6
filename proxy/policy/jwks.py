"""JWT signing keys from an identity provider (``auth.jwt.jwks_url``).

The key set is fetched at start, refetched every ``jwks_refresh_s`` and when a token
names a ``kid`` the set does not hold (at most once per ``jwks_min_refresh_s``, so
made-up kids cannot make the gateway hammer the provider), and swapped whole into the
verifier.  A failed fetch (provider down, bad document, no usable key) keeps the last
good set and is retried sooner.  With ``jwks_url: discover`` the set's address comes
from ``{issuer}/.well-known/openid-configuration``, looked up again after a failure.

auth.py stays pure and synchronous: it reads :meth:`JwksRefresher.keys` and raises
``UnknownKeyId``; :func:`authenticate` is the async step that refreshes and retries once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import jwt

from ..config import JwtConfig
from .auth import Authenticator, Principal, UnknownKeyId

log = logging.getLogger("tenant_proxy.jwks")

MAX_DOCUMENT_BYTES = 1024 * 1024
FETCH_TIMEOUT_S = 5.0
START_WAIT_S = 5.0        # how long start-up waits for the first key set
MAX_RETRY_DELAY_S = 60.0  # retries while the provider is down, backing off to this


class JwksError(Exception):
    """The provider's answer could not be used."""


def parse_jwks(document: Any) -> dict[str | None, Any]:
    """Signing keys of a JWKS document by ``kid``; keys for encryption or of unknown types are left out."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document (no \"keys\" list)")
    keys: dict[str | None, Any] = {}
    for item in document["keys"]:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig":
            continue
        kid = item.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            key = jwt.PyJWK(item).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        keys.setdefault(kid, key)
    if not keys:
        raise JwksError("the JWKS holds no usable signing key")
    return keys


class JwksRefresher:
    """The provider's current key set, kept fresh by a background task."""

    def __init__(self, cfg: JwtConfig) -> None:
        assert cfg.jwks_url is not None
        self.cfg = cfg
        self.fetches = 0         # attempts, for logs and tests
        self.failures = 0        # consecutive failed attempts
        self.fetched_at: float | None = None
        self._keys: Mapping[str | None, Any] = {}
        self._jwks_uri = None if cfg.jwks_url == "discover" else cfg.jwks_url
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._last_kid_refresh = float("-inf")
        self._closed = False

    def keys(self) -> Mapping[str | None, Any]:
        """The key set in force (swapped whole, never changed in place)."""
        return self._keys

    async def start(self) -> None:
        """Fetch the first key set (waiting at most START_WAIT_S), then keep it fresh."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT_S):
                await self.refresh()
        if self.fetched_at is None:
            log.warning("no JWKS yet from %s; JWTs are refused until one arrives", self.cfg.jwks_url)
        self._task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        self._closed = True
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()

    async def refresh(self) -> bool:
        """Fetch now; callers that arrive while a fetch runs share it.  True when a new set is in force."""
        if self._closed:  # replaced by a reload; requests that still hold it keep its keys
            return False
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch())
        return await asyncio.shield(self._inflight)

    async def refresh_for_unknown_kid(self) -> bool:
        """A token named a kid we do not hold: refetch, unless one such refetch ran too recently."""
        if self._inflight is not None and not self._inflight.done():
            return await asyncio.shield(self._inflight)
        now = time.monotonic()
        if now - self._last_kid_refresh < self.cfg.jwks_min_refresh_s:
            return False
        self._last_kid_refresh = now
        return await self.refresh()

    async def _refresh_forever(self) -> None:
        delay = float(self.cfg.jwks_refresh_s)
        while True:
            await asyncio.sleep(delay)
            ok = await self.refresh()
            delay = float(self.cfg.jwks_refresh_s) if ok else min(
                float(self.cfg.jwks_refresh_s), MAX_RETRY_DELAY_S, 2.0 ** self.failures)

    async def _fetch(self) -> bool:
        self.fetches += 1
        try:
            if self._jwks_uri is None:
                self._jwks_uri = await self._discover()
            keys = parse_jwks(await self._get_json(self._jwks_uri))
        except (aiohttp.ClientError, TimeoutError, JwksError) as exc:
            self.failures += 1
            if self.cfg.jwks_url == "discover":
                self._jwks_uri = None  # the provider may have moved its keys: look again next time
            log.warning("JWKS fetch failed (%s: %s); keeping the %d key(s) in force", type(exc).__name__, exc,
                        len(self._keys))
            return False
        self._keys = keys
        self.failures = 0
        self.fetched_at = time.monotonic()
        log.info("JWKS: %d signing key(s) in force", len(keys))
        return True

    async def _discover(self) -> str:
        issuer = (self.cfg.issuer or "").rstrip("/")
        config = await self._get_json(f"{issuer}/.well-known/openid-configuration")
        uri = config.get("jwks_uri") if isinstance(config, dict) else None
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise JwksError("the OpenID configuration names no jwks_uri")
        return uri

    async def _get_json(self, url: str) -> Any:
        assert self._session is not None
        async with self._session.get(url, headers={"Accept": "application/json"}) as resp:
            resp.raise_for_status()
            raw = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise JwksError(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return json.loads(raw)
        except ValueError:
            raise JwksError(f"{url} did not answer JSON") from None


async def start(cfg: JwtConfig | None) -> JwksRefresher | None:
    """A running refresher when the config takes keys from a provider, else None."""
    if cfg is None or cfg.jwks_url is None:
        return None
    refresher = JwksRefresher(cfg)
    await refresher.start()
    return refresher


async def restart(current: JwksRefresher | None, cfg: JwtConfig | None) -> JwksRefresher | None:
    """After a reload: keep the running refresher when its settings did not change."""
    if current is not None and cfg == current.cfg:
        return current
    if current is not None:
        await current.close()
    return await start(cfg)


async def authenticate(authenticator: Authenticator, refresher: JwksRefresher | None,
                       authorization: str | None) -> Principal:
    """``authenticator.authenticate``, with one retry after ``refresher`` refetched the keys
    for an unknown kid (the authenticator reads them from it at each verification)."""
    try:
        return authenticator.authenticate(authorization)
    except UnknownKeyId:
        if refresher is None or not await refresher.refresh_for_unknown_kid():
            raise
    return authenticator.authenticate(authorization)
