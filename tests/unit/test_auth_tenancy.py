"""Auth (API keys by hash, JWT) and tenant resolution: pure functions, no I/O."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import parse_config
from proxy.errors import ApiError
from proxy.policy.auth import Authenticator, Principal, hash_key
from proxy.policy.tenancy import resolve

A = "11111111-1111-4111-8111-111111111111"
B = "22222222-2222-4222-8222-222222222222"
SECRET = "s" * 40


def settings(jwt_cfg: dict[str, Any] | None = None, **extra: Any) -> Any:
    raw: dict[str, Any] = {
        "database": {"dsn": "postgresql://x@h/db"},
        "auth": {"api_keys": [{"name": "bound", "sha256": hash_key("k-bound"), "tenant": A},
                              {"name": "any", "sha256": hash_key("k-any"), "tenants": ["*"]}]},
        "tenants": {B: {"suspended": True}},
        **extra,
    }
    if jwt_cfg:
        raw["auth"]["jwt"] = jwt_cfg
    return parse_config(raw, {})


def code_of(fn: Any, *args: Any) -> str:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value.kind.code


def test_api_keys() -> None:
    auth = Authenticator(settings().auth, "uuid")
    assert auth.authenticate("Bearer k-bound") == Principal("bound", frozenset({A}), "api_key")
    assert auth.authenticate("bearer   k-any").tenants is None
    for header in (None, "", "Bearer", "Bearer nope", "Basic k-bound", "k-bound", "Bearer " + "x" * 9000):
        assert code_of(auth.authenticate, header) == "unauthenticated"


def _token(key: Any = SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None, **claims: Any) -> str:
    payload = {"sub": "svc", "exp": int(time.time()) + 60, "tenant_id": A, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def test_jwt_hs256_claims_and_leeway() -> None:
    auth = Authenticator(settings({"algorithms": ["HS256"], "secret": SECRET, "leeway_s": 30}).auth, "uuid")
    p = auth.authenticate("Bearer " + _token())
    assert p.name == "svc" and p.tenants == frozenset({A}) and p.method == "jwt"
    assert auth.authenticate("Bearer " + _token(tenant_id="*")).tenants is None
    assert auth.authenticate("Bearer " + _token(tenant_id=[A, B.upper()])).tenants == frozenset({A, B})
    # within leeway still accepted, beyond it refused
    assert auth.authenticate("Bearer " + _token(exp=int(time.time()) - 10)).name == "svc"
    for bad in (_token(exp=int(time.time()) - 120), _token(key="t" * 40), _token(tenant_id=5),
                _token(tenant_id=[]), _token(nbf=int(time.time()) + 600), _token(tenant_id=None)):
        assert code_of(auth.authenticate, "Bearer " + bad) == "unauthenticated"
    no_exp = jwt.encode({"tenant_id": A}, SECRET, algorithm="HS256")
    assert code_of(auth.authenticate, "Bearer " + no_exp) == "unauthenticated"
    unsigned = jwt.encode({"tenant_id": A, "exp": int(time.time()) + 60}, None, algorithm="none")
    assert code_of(auth.authenticate, "Bearer " + unsigned) == "unauthenticated"


def test_jwt_rs256_public_key_and_jwks(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    auth = Authenticator(settings({"algorithms": ["RS256"], "public_key_file": str(tmp_path / "pub.pem")}).auth,
                         "uuid")
    assert auth.authenticate("Bearer " + _token(private, "RS256")).tenants == frozenset({A})
    # an HS256 token signed with the public key text must not pass (algorithm confusion)
    assert code_of(auth.authenticate, "Bearer " + _token(SECRET)) == "unauthenticated"

    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    auth = Authenticator(settings({"algorithms": ["RS256"], "jwks_file": str(tmp_path / "jwks.json")}).auth,
                         "uuid")
    assert auth.authenticate("Bearer " + _token(private, "RS256", headers={"kid": "k1"})).name == "svc"
    assert code_of(auth.authenticate, "Bearer " + _token(private, "RS256", headers={"kid": "k2"})) \
        == "unauthenticated"


def test_tenant_resolution() -> None:
    s = settings()
    bound = Principal("bound", frozenset({A}), "api_key")
    anyone = Principal("any", None, "api_key")
    assert resolve(bound, None, s).id == A
    assert resolve(bound, A.upper(), s).id == A
    assert code_of(resolve, bound, B, s) == "tenant_forbidden"
    assert code_of(resolve, anyone, None, s) == "tenant_required"
    assert code_of(resolve, anyone, "not-a-uuid", s) == "invalid_request"
    assert code_of(resolve, anyone, B, s) == "tenant_suspended"
    t = resolve(anyone, " 33333333-3333-4333-8333-333333333333 ", s)
    assert t.id == "33333333-3333-4333-8333-333333333333" and t.limits == s.defaults


def test_verified_tokens_are_cached_until_they_expire(monkeypatch: Any) -> None:
    auth = Authenticator(settings({"algorithms": ["HS256"], "secret": SECRET, "leeway_s": 0}).auth, "uuid")
    calls = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    exp = int(time.time()) + 2
    token = _token(exp=exp)
    assert auth.authenticate("Bearer " + token).name == "svc"
    assert auth.authenticate("Bearer " + token).name == "svc"
    assert len(calls) == 1  # the second answer came from the cache
    time.sleep(max(0.0, exp - time.time() + 1.1))
    assert code_of(auth.authenticate, "Bearer " + token) == "unauthenticated"  # expired: checked again
    assert len(calls) == 2
    lenient = Authenticator(settings({"algorithms": ["HS256"], "secret": SECRET, "leeway_s": 30}).auth, "uuid")
    early = _token(nbf=int(time.time()) + 10)  # accepted within the leeway, but never cached
    assert lenient.authenticate("Bearer " + early).name == "svc"
    assert lenient.authenticate("Bearer " + early).name == "svc"
    assert len(calls) == 4
