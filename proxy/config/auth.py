"""Parsing of the `auth` section (API keys, JWT) for proxy.config.parse."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import ANY_TENANT, JWT_ALGORITHMS, SHA256_RE, AdminToken, ApiKey, JwtConfig, canonical_tenant_id

if TYPE_CHECKING:
    from .reader import Reader


def api_keys(r: Reader, raw: Any, id_format: str) -> tuple[ApiKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.fail("auth.api_keys", "must be a list")
        return ()
    keys: list[ApiKey] = []
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for i, item in enumerate(raw):
        path = f"auth.api_keys[{i}]"
        if not isinstance(item, dict):
            r.fail(path, "must be a mapping")
            continue
        r.unknown(item, {"name", "sha256", "tenant", "tenants"}, path)
        name = r.str_(item, "name", path, required=True) or f"key{i}"
        digest = (r.str_(item, "sha256", path, required=True) or "").lower()
        if digest and not SHA256_RE.match(digest):
            r.fail(f"{path}.sha256", "must be 64 hex characters (see `tenant-proxy hash-key`)")
        if name in seen_names:
            r.fail(f"{path}.name", f"duplicate key name {name!r}")
        if digest in seen_hashes:
            r.fail(f"{path}.sha256", "the same key is listed twice")
        seen_names.add(name)
        seen_hashes.add(digest)
        tenants = _key_tenants(r, item, path, id_format)
        keys.append(ApiKey(name=name, sha256=digest, tenants=tenants))
    return tuple(keys)


def admin_tokens(r: Reader, raw: Any) -> tuple[AdminToken, ...]:
    """`admin.tokens`: bearer tokens for /admin/*, each a name and the token's SHA-256."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.fail("admin.tokens", "must be a list of {name, sha256}")
        return ()
    out: list[AdminToken] = []
    for i, item in enumerate(raw):
        path = f"admin.tokens[{i}]"
        if not isinstance(item, dict):
            r.fail(path, "must be a mapping with name and sha256")
            continue
        r.unknown(item, {"name", "sha256"}, path)
        name = r.str_(item, "name", path, required=True) or f"token{i}"
        digest = (r.str_(item, "sha256", path, required=True) or "").lower()
        if digest and not SHA256_RE.match(digest):
            r.fail(f"{path}.sha256", "must be 64 hex characters (see `tenant-proxy hash-key`)")
        if any(t.name == name for t in out):
            r.fail(f"{path}.name", f"duplicate token name {name!r}")
        out.append(AdminToken(name, digest))
    return tuple(out)


def _key_tenants(r: Reader, item: Mapping[str, Any], path: str, id_format: str) -> frozenset[str] | None:
    if ("tenant" in item) == ("tenants" in item):
        r.fail(path, "needs exactly one of `tenant` (one id) or `tenants` (a list, or [\"*\"])")
        return frozenset()
    if "tenant" in item:
        values = [item["tenant"]]
        where = f"{path}.tenant"
    else:
        values = item["tenants"]
        where = f"{path}.tenants"
        if not isinstance(values, list) or not values:
            r.fail(where, "must be a non-empty list")
            return frozenset()
        if ANY_TENANT in values:
            if len(values) > 1:
                r.fail(where, '"*" must stand alone')
            return None
    out: set[str] = set()
    for v in values:
        canon = canonical_tenant_id(v, id_format) if isinstance(v, str) else None
        if canon is None:
            r.fail(where, f"{v!r} is not a valid {id_format} tenant id")
        else:
            out.add(canon)
    return frozenset(out)


def jwt_config(r: Reader, raw: Any) -> JwtConfig | None:
    if raw is None:
        return None
    path = "auth.jwt"
    if not isinstance(raw, dict):
        r.fail(path, "must be a mapping")
        return None
    r.unknown(raw, {"algorithms", "secret_env", "secret", "public_key_file", "jwks_file", "jwks_url", "issuer",
                    "audience", "tenant_claim", "name_claim", "leeway_s", "jwks_refresh_s", "jwks_min_refresh_s"},
              path)
    algs = raw.get("algorithms", ["HS256"])
    if not isinstance(algs, list) or not algs or not all(isinstance(a, str) for a in algs):
        r.fail(f"{path}.algorithms", "must be a non-empty list of algorithm names")
        algs = ["HS256"]
    for a in algs:
        if a not in JWT_ALGORITHMS:
            r.fail(f"{path}.algorithms", f"unsupported algorithm {a!r} (allowed: {', '.join(sorted(JWT_ALGORITHMS))})")
    sources = [k for k in _KEY_SOURCES if k in raw]
    key, jwks_url = "", None
    if len(sources) != 1:
        r.fail(path, "needs exactly one of secret_env, secret, public_key_file, jwks_file, jwks_url")
    elif sources[0] == "jwks_url":
        jwks_url = _jwks_url(r, raw, path)
    else:
        key = _jwt_key(r, raw, path, sources[0])
    symmetric = any(a.startswith("HS") for a in algs)
    if symmetric and sources and sources[0] in ("public_key_file", "jwks_file", "jwks_url"):
        r.fail(f"{path}.algorithms", "HS* algorithms need a shared secret, not a public key")
    if not symmetric and sources and sources[0] in ("secret_env", "secret"):
        r.fail(f"{path}.algorithms", "asymmetric algorithms need public_key_file, jwks_file or jwks_url")
    for k in ("jwks_refresh_s", "jwks_min_refresh_s"):
        if k in raw and jwks_url is None:
            r.fail(f"{path}.{k}", "applies only with jwks_url")
    if symmetric and key and len(key) < 32:
        r.fail(f"{path}.{sources[0]}", "an HMAC secret must be at least 32 characters")
    return JwtConfig(
        algorithms=tuple(algs),
        key=key,
        issuer=r.str_(raw, "issuer", path),
        audience=r.str_(raw, "audience", path),
        tenant_claim=r.str_(raw, "tenant_claim", path, default="tenant_id") or "tenant_id",
        name_claim=r.str_(raw, "name_claim", path, default="sub") or "sub",
        leeway_s=r.int_(raw, "leeway_s", path, 30, lo=0, hi=600),
        jwks_url=jwks_url,
        jwks_refresh_s=r.int_(raw, "jwks_refresh_s", path, 300, lo=1, hi=86400),
        jwks_min_refresh_s=r.int_(raw, "jwks_min_refresh_s", path, 30, lo=0, hi=3600),
    )


_KEY_SOURCES = ("secret_env", "secret", "public_key_file", "jwks_file", "jwks_url")


def _jwt_key(r: Reader, raw: Mapping[str, Any], path: str, source: str) -> str:
    """The key from ``source``: an environment variable, the file itself, or a file it names."""
    if source == "secret_env":
        var = raw["secret_env"]
        if not isinstance(var, str) or var not in r.env or not r.env[var]:
            r.fail(f"{path}.secret_env", f"environment variable {var} is not set")
            return ""
        return r.env[var]
    if source == "secret":
        return r.str_(raw, "secret", path, required=True) or ""
    fname = r.str_(raw, source, path, required=True)
    if not fname:
        return ""
    try:
        return Path(fname).read_text()
    except OSError as exc:
        r.fail(f"{path}.{source}", f"cannot read {fname}: {exc.strerror}")
        return ""


def _jwks_url(r: Reader, raw: Mapping[str, Any], path: str) -> str | None:
    """An http(s) URL serving a JWKS, or "discover": the issuer's OpenID configuration names it."""
    url = r.str_(raw, "jwks_url", path, required=True)
    if url is None:
        return None
    if url == "discover":
        issuer = raw.get("issuer")
        if not isinstance(issuer, str) or not issuer.startswith(("https://", "http://")):
            r.fail(f"{path}.jwks_url", "\"discover\" needs auth.jwt.issuer set to the provider's http(s) URL")
        return url
    if not url.startswith(("https://", "http://")):
        r.fail(f"{path}.jwks_url", "must be an http(s) URL or \"discover\"")
    return url
