"""``Authorization: Bearer ...`` -> Principal.  Pure: no I/O, no clock other than JWT's own.

API keys are looked up by their SHA-256, so the config never holds a usable key.  A
token with two dots is treated as a JWT when JWT auth is configured.  Every failure
(missing, unknown, expired, badly signed) gets the same answer, so a caller cannot
probe which part was wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import jwt

from .config import AuthConfig, JwtConfig, canonical_tenant_id
from .errors import UNAUTHENTICATED, ApiError


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling and which tenants it may act for (None: any tenant it names)."""

    name: str
    tenants: frozenset[str] | None
    method: str


def hash_key(key: str) -> str:
    """The SHA-256 hex digest that the config stores for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _unauthenticated() -> ApiError:
    return ApiError(UNAUTHENTICATED, "missing or invalid credentials")


class _JwtVerifier:
    def __init__(self, cfg: JwtConfig, id_format: str) -> None:
        self.cfg = cfg
        self.id_format = id_format
        self.keys: dict[str | None, Any] = {}
        if cfg.key.lstrip().startswith("{"):
            jwks = jwt.PyJWKSet.from_dict(json.loads(cfg.key))
            for k in jwks.keys:
                self.keys[k.key_id] = k.key
        else:
            self.keys[None] = cfg.key

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            key = self.keys.get(kid) if kid in self.keys else self.keys.get(None)
            if key is None:
                raise _unauthenticated()
            claims = jwt.decode(
                token, key, algorithms=list(self.cfg.algorithms), issuer=self.cfg.issuer,
                audience=self.cfg.audience, leeway=self.cfg.leeway_s,
                options={"require": ["exp"], "verify_aud": self.cfg.audience is not None},
            )
        except jwt.PyJWTError:
            raise _unauthenticated() from None
        return Principal(name=str(claims.get(self.cfg.name_claim) or "jwt"),
                         tenants=self._tenants(claims.get(self.cfg.tenant_claim)), method="jwt")

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

    def __init__(self, cfg: AuthConfig, id_format: str) -> None:
        self._by_hash = {k.sha256: Principal(name=k.name, tenants=k.tenants, method="api_key")
                         for k in cfg.api_keys}
        self._jwt = _JwtVerifier(cfg.jwt, id_format) if cfg.jwt is not None else None

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise _unauthenticated()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 8192:
            raise _unauthenticated()
        if self._jwt is not None and token.count(".") == 2:
            return self._jwt.verify(token)
        principal = self._by_hash.get(hash_key(token))
        if principal is None:
            raise _unauthenticated()
        return principal
