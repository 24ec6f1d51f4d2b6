"""``Authorization: Bearer ...`` -> Principal.  Pure: no I/O, no clock other than JWT's own.

API keys are looked up by their SHA-256, so the config never holds a usable key.  A
token with two dots is treated as a JWT when JWT auth is configured.  Every failure
(missing, unknown, expired, badly signed) gets the same answer, so a caller cannot
probe which part was wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from ..config import AuthConfig, JwtConfig, canonical_tenant_id
from ..errors import UNAUTHENTICATED, ApiError


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling and which tenants it may act for (None: any tenant it names)."""

    name: str
    tenants: frozenset[str] | None
    method: str


_TOKEN_CACHE_SIZE = 10_000


def hash_key(key: str) -> str:
    """The SHA-256 hex digest that the config stores for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _unauthenticated() -> ApiError:
    return ApiError(UNAUTHENTICATED, "missing or invalid credentials")


class UnknownKeyId(ApiError):
    """A JWT names a ``kid`` the provider's key set does not hold (yet): the same 401 as any
    bad credential, unless the caller refetches the keys and tries again (jwks.authenticate)."""

    def __init__(self) -> None:
        super().__init__(UNAUTHENTICATED, "missing or invalid credentials")


class KeySource(Protocol):
    """Where keys fetched from an identity provider are read (jwks.JwksRefresher)."""

    def keys(self) -> Mapping[str | None, Any]: ...


class _JwtVerifier:
    def __init__(self, cfg: JwtConfig, id_format: str, remote: KeySource | None = None) -> None:
        self.cfg = cfg
        self.id_format = id_format
        self.keys: Mapping[str | None, Any] = {}
        # With jwks_url, keys are read from ``remote`` at each verification (swapped whole there).
        self.remote = remote if cfg.jwks_url is not None else None
        if cfg.jwks_url is None and cfg.key.lstrip().startswith("{"):
            jwks = jwt.PyJWKSet.from_dict(json.loads(cfg.key))
            self.keys = {k.key_id: k.key for k in jwks.keys}
        elif cfg.jwks_url is None:
            self.keys = {None: cfg.key}
        # Verified tokens until they expire: signature checks cost far more than a lookup.
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cached_under: Mapping[str | None, Any] | None = None  # the provider's key set they were checked with

    def verify(self, token: str) -> Principal:
        """Check a token, or answer from the cache of tokens verified before and not yet expired."""
        if self.remote is not None and self.remote.keys() is not self._cached_under:
            # A new key set from the provider: a key it retired must stop working now.
            self._cache.clear()
            self._cached_under = self.remote.keys()
        cached = self._cache.get(token)
        if cached is not None and time.time() < cached[1]:
            return cached[0]
        principal, expires = self._verify(token)
        self._cache[token] = (principal, expires)
        if len(self._cache) > _TOKEN_CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            keys = self.remote.keys() if self.remote is not None else self.keys
            key = keys.get(kid) if kid in keys else keys.get(None)
            if key is None:
                raise UnknownKeyId() if self.cfg.jwks_url is not None and isinstance(kid, str) \
                    else _unauthenticated()
            claims = jwt.decode(
                token, key, algorithms=list(self.cfg.algorithms), issuer=self.cfg.issuer,
                audience=self.cfg.audience, leeway=self.cfg.leeway_s,
                options={"require": ["exp"], "verify_aud": self.cfg.audience is not None},
            )
        except jwt.PyJWTError:
            raise _unauthenticated() from None
        principal = Principal(name=str(claims.get(self.cfg.name_claim) or "jwt"),
                              tenants=self._tenants(claims.get(self.cfg.tenant_claim)), method="jwt")
        # Cached until `exp` itself (no leeway), and only once `nbf` has passed.
        nbf = claims.get("nbf")
        expires = float(claims["exp"]) if not isinstance(nbf, (int, float)) or nbf <= time.time() else 0.0
        return principal, expires

    def _tenants(self, claim: Any) -> frozenset[str] | None:
        values = claim if isinstance(claim, list) else [claim]
        if values == ["*"]:
            return None
        out = set()
        for v in values:
            canon = canonical_tenant_id(v, self.id_format) if isinstance(v, str) else None
            if canon is None:
                raise _unauthenticated()
            out.add(canon)
        if not out:
            raise _unauthenticated()
        return frozenset(out)


class Authenticator:
    """Built once per config; ``authenticate`` is called per request."""

    def __init__(self, cfg: AuthConfig, id_format: str, jwks: KeySource | None = None) -> None:
        self._by_hash = {k.sha256: Principal(name=k.name, tenants=k.tenants, method="api_key")
                         for k in cfg.api_keys}
        # Keys that stop working at a time (catalog keys with an expiry, rotated keys' grace).
        self._expires = {k.sha256: k.expires_at for k in cfg.api_keys if k.expires_at is not None}
        self._jwt = _JwtVerifier(cfg.jwt, id_format, jwks) if cfg.jwt is not None else None

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise _unauthenticated()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 8192:
            raise _unauthenticated()
        if self._jwt is not None and token.count(".") == 2:
            return self._jwt.verify(token)
        digest = hash_key(token)
        principal = self._by_hash.get(digest)
        if principal is None:
            raise _unauthenticated()
        if self._expires and time.time() >= self._expires.get(digest, math.inf):
            raise _unauthenticated()
        return principal
