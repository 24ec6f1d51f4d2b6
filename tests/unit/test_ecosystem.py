"""No I/O: PostgreSQL text values, Neon request parsing and errors, the JWKS and JWT key
plumbing, the new config keys, and docs/openapi.yaml against the code it describes."""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import schemathesis
from asyncpg import BitString, Range
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import LIMIT_KEYS, ConfigError, parse_config
from proxy.errors import (
    ALL_KINDS,
    CONCURRENCY_LIMITED,
    PAYLOAD_TOO_LARGE,
    RATE_LIMITED,
    SQL_ERROR,
    TENANT_FORBIDDEN,
    UNAUTHENTICATED,
    ApiError,
)
from proxy.http import neon
from proxy.http import plan as handlers
from proxy.pg.pgtext import to_json, to_text
from proxy.pg.text_params import json_to_text, param_from_text, parse_array
from proxy.policy import jwks
from proxy.policy.auth import Authenticator, UnknownKeyId
from proxy.policy.jwks import JwksError, parse_jwks

from ..openapi_doc import document, schema_properties

TENANT = "aaaaaaaa-0000-4000-8000-00000000000a"

# -- PostgreSQL text ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "typename", "text"), [
    (None, "int4", None), (True, "bool", "t"), (False, "bool", "f"), (-3, "int4", "-3"),
    (1.0, "float8", "1"), (1e15, "float8", "1e+15"), (123456789012345.0, "float8", "123456789012345"),
    (1e-5, "float8", "1e-05"), (0.0001, "float8", "0.0001"), (-0.0, "float8", "-0"), (float("nan"), "float8", "NaN"),
    (float("-inf"), "float4", "-Infinity"), (0.10000000149011612, "float4", "0.1"), (1e6, "float4", "1e+06"),
    (100000.0, "float4", "100000"), (Decimal("0E-10"), "numeric", "0.0000000000"), (Decimal("NaN"), "numeric", "NaN"),
    (b"\x00\xff", "bytea", "\\x00ff"), (dt.date(44, 3, 15), "date", "0044-03-15"),
    (dt.datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=dt.timezone(dt.timedelta(hours=2))), "timestamptz",
     "2024-01-02 01:04:05.5+00"),
    (dt.datetime(2024, 1, 2, 3, 4, 5), "timestamp", "2024-01-02 03:04:05"),
    (dt.datetime.max, "timestamptz", "infinity"),
    (dt.time(13, 14, 15, 250000), "time", "13:14:15.25"),
    (dt.time(13, 14, tzinfo=dt.timezone(-dt.timedelta(hours=5, minutes=30))), "timetz", "13:14:00-05:30"),
    (uuid.UUID(TENANT), "uuid", TENANT), (orjson.Fragment(b'{"a": 1}'), "jsonb", '{"a": 1}'),
    (["a b", "", None, "null", 'q"\\', "{x}", "ok"], "text", '{"a b","",NULL,"null","q\\"\\\\","{x}",ok}'),
    ([[1, 2], [3, None]], "int4", "{{1,2},{3,NULL}}"), ([], "int4", "{}"),
    ([0.10000000149011612], "float4", "{0.1}"), (Range(1, 5), "int4", "[1,5)"), (Range(empty=True), "int4", "empty"),
    (Range(None, 3, upper_inc=True), "int8", "(,3]"), (BitString("10110"), "bit", "10110"),
    ((1, "a b", None, "", 'x"y'), "record", '(1,"a b",,"","x""y")'),
])
def test_values_print_as_postgresql_prints_them(value: Any, typename: str, text: str | None) -> None:
    assert to_text(value, typename) == text


def test_values_as_neon_converts_them_without_raw_text() -> None:
    assert to_json(True, "bool") is True and to_json(7, "int4") == 7 and to_json(7, "int8") == "7"
    assert to_json(0.10000000149011612, "float4") == 0.1 and to_json(float("inf"), "float8") == "Infinity"
    assert to_json(Decimal("2.50"), "numeric") == "2.50" and to_json([1, None], "int4[]") == [1, None]
    assert to_json([True], "bool[]") == [True] and to_json(dt.date(2024, 1, 2), "date") == "2024-01-02"
    assert orjson.dumps(to_json(orjson.Fragment(b'{"a": [1]}'), "jsonb")) == b'{"a": [1]}'


def test_array_literals_parse() -> None:
    assert parse_array('{a,"b c",NULL,"NULL", "q\\"x" ,{1,2}}') == ["a", "b c", None, "NULL", 'q"x', ["1", "2"]]
    assert parse_array("[1:2]={1,2}") == ["1", "2"] and parse_array("{}") == []
    for bad in ("{1,", "1,2", "{1}}", '{"open}', "{,}"):
        with pytest.raises(ValueError):
            parse_array(bad)


def test_json_parameters_become_text_as_neon_makes_it() -> None:
    assert [json_to_text(v) for v in (None, "s", 42, 1.5, True, {"k": [1]})] == [
        None, "s", "42", "1.5", "true", '{"k":[1]}']
    assert json_to_text([1, None, 'q"\\', {"a": 1}, [2]]) == '{"1",NULL,"q\\"\\\\","{\\"a\\":1}",{"2"}}'
    assert parse_array(json_to_text(["a", 'b"', None]) or "") == ["a", 'b"', None]


def test_text_parameters_are_read_as_their_type_reads_text() -> None:
    assert param_from_text(1, "yes", "bool", "scalar", None) is True
    assert param_from_text(1, "off", "bool", "scalar", None) is False
    assert param_from_text(1, "\\x00ff", "bytea", "scalar", None) == b"\x00\xff"
    assert param_from_text(1, "a\\\\b\\001", "bytea", "scalar", None) == b"a\\b\x01"
    assert param_from_text(1, "13:14:15+02", "timetz", "scalar", None).utcoffset() == dt.timedelta(hours=2)
    assert param_from_text(1, "2024-01-02 03:04:05+02", "timestamp", "scalar", None) == dt.datetime(2024, 1, 2, 3, 4, 5)
    assert param_from_text(1, "{1,NULL,3}", "_int4", "array", "int4") == [1, None, 3]
    assert param_from_text(1, " 42 ", "int4", "scalar", None) == 42
    assert param_from_text(1, None, "int4", "scalar", None) is None
    assert orjson.dumps(param_from_text(1, '{"a":  1}', "json", "scalar", None)) == b'{"a":  1}'
    for value, typename, kind, element in (("x", "int4", "scalar", None), ("maybe", "bool", "scalar", None),
                                           ("{1,x}", "_int4", "array", "int4"), ("\\q", "bytea", "scalar", None)):
        with pytest.raises(ApiError) as err:
            param_from_text(2, value, typename, kind, element)
        assert err.value.sqlstate == "22P02" and err.value.message.startswith("parameter $2")


# -- Neon requests and errors ----------------------------------------------------------------

def test_neon_bodies() -> None:
    queries, batch = neon.parse_body({"query": "SELECT $1", "params": [1, None], "arrayMode": True}, False)
    assert not batch and queries == [neon.NeonQuery("SELECT $1", ["1", None], True)]
    queries, batch = neon.parse_body({"queries": [{"query": "SELECT 1"}, {"query": "SELECT 2", "arrayMode": False}]},
                                     True)
    assert batch and [q.array_mode for q in queries] == [True, False]
    for body in ({}, {"query": ""}, {"query": "SELECT 1", "params": {}}, {"query": "SELECT 1", "arrayMode": "yes"},
                 {"query": "SELECT 1", "fullResults": True}, {"queries": []}, {"queries": [1]},
                 {"queries": [{"query": "SELECT 1"}], "query": "x"},
                 {"queries": [{"query": "SELECT 1"}] * (handlers.MAX_STATEMENTS + 1)}):
        with pytest.raises(ApiError) as err:
            neon.parse_body(body, False)
        assert err.value.kind.code == "invalid_request"


@pytest.mark.parametrize(("error", "status"), [
    (ApiError(UNAUTHENTICATED, "no"), 400), (ApiError(TENANT_FORBIDDEN, "no"), 400),
    (ApiError(SQL_ERROR, "division by zero", sqlstate="22012"), 400), (ApiError(PAYLOAD_TOO_LARGE, "big"), 413),
    (ApiError(RATE_LIMITED, "slow down", retry_after_s=2), 429),
    (ApiError(CONCURRENCY_LIMITED, "busy", retry_after_s=1), 503),
])
def test_neon_errors(error: ApiError, status: int) -> None:
    resp = neon.error_response(error, "rid-1")
    body = orjson.loads(resp.body)  # type: ignore[arg-type]
    assert resp.status == status
    assert body == {"message": error.message, "code": error.sqlstate or "", "severity": "ERROR",
                    "error": {"code": error.kind.code, "message": error.message, "sqlstate": error.sqlstate,
                              "retryable": error.kind.retryable, "request_id": "rid-1"}}
    assert resp.headers.get("Retry-After") == (str(error.retry_after_s) if error.retry_after_s else None)


# -- config --------------------------------------------------------------------------------

def _config(server: dict[str, Any] | None = None, jwt_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {"database": {"dsn": "postgresql://app@127.0.0.1/appdb"},
                           "auth": {"api_keys": [{"name": "k", "sha256": "0" * 64, "tenant": TENANT}]}}
    if server is not None:
        raw["server"] = server
    if jwt_cfg is not None:
        raw["auth"]["jwt"] = jwt_cfg
    return raw


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, {})
    return err.value.problems


def test_neon_endpoint_key() -> None:
    assert parse_config(_config(), {}).server.neon_sql_endpoint is False
    assert parse_config(_config({"neon_sql_endpoint": True}), {}).server.neon_sql_endpoint is True
    assert _problems(_config({"neon_sql_endpoint": "sometimes"})) == ["server.neon_sql_endpoint: must be true or false"]


def test_jwks_url_keys() -> None:
    rs = {"algorithms": ["RS256"]}
    cfg = parse_config(_config(jwt_cfg={**rs, "jwks_url": "https://idp.example/jwks"}), {}).auth.jwt
    assert cfg is not None and (cfg.jwks_url, cfg.jwks_refresh_s, cfg.jwks_min_refresh_s) == (
        "https://idp.example/jwks", 300, 30)
    assert parse_config(_config(jwt_cfg={**rs, "jwks_url": "discover", "issuer": "https://idp.example",
                                         "jwks_refresh_s": 60, "jwks_min_refresh_s": 0}), {}).auth.jwt is not None
    assert _problems(_config(jwt_cfg={**rs, "jwks_url": "ftp://idp"})) == [
        'auth.jwt.jwks_url: must be an http(s) URL or "discover"']
    assert _problems(_config(jwt_cfg={**rs, "jwks_url": "discover"})) == [
        'auth.jwt.jwks_url: "discover" needs auth.jwt.issuer set to the provider\'s http(s) URL']
    assert _problems(_config(jwt_cfg={"algorithms": ["HS256"], "jwks_url": "https://idp/jwks"})) == [
        "auth.jwt.algorithms: HS* algorithms need a shared secret, not a public key"]
    assert _problems(_config(jwt_cfg={**rs, "jwks_url": "https://idp/jwks", "jwks_file": "/x"})) == [
        "auth.jwt: needs exactly one of secret_env, secret, public_key_file, jwks_file, jwks_url"]
    assert _problems(_config(jwt_cfg={"algorithms": ["HS256"], "secret": "s" * 40, "jwks_refresh_s": 5})) == [
        "auth.jwt.jwks_refresh_s: applies only with jwks_url"]
    assert _problems(_config(jwt_cfg={**rs, "jwks_url": "https://idp/jwks", "jwks_refresh_s": 0})) == [
        "auth.jwt.jwks_refresh_s: must be between 1 and 86400, got 0"]


# -- JWKS and the verifier -----------------------------------------------------------------

def _jwk(key: rsa.RSAPrivateKey, **extra: Any) -> dict[str, Any]:
    return {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), **extra}


def test_parse_jwks_keeps_signing_keys_only() -> None:
    k1, k2 = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    keys = parse_jwks({"keys": [_jwk(k1, kid="k1", use="sig"), _jwk(k2, kid="k2", use="enc"),
                                {"kty": "nope", "kid": "k3"}, {"kid": 5, "kty": "RSA"}, "junk"]})
    assert list(keys) == ["k1"]
    for doc in ({"keys": [_jwk(k2, kid="k2", use="enc")]}, {"nokeys": []}, [], {"keys": "x"}):
        with pytest.raises(JwksError):
            parse_jwks(doc)


class _Keys:
    def __init__(self, keys: dict[str | None, Any]) -> None:
        self.current = keys

    def keys(self) -> dict[str | None, Any]:
        return self.current


def test_verifier_reads_the_provider_keys_at_each_request() -> None:
    k1, k2 = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    settings = parse_config(_config(jwt_cfg={"algorithms": ["RS256"], "jwks_url": "https://idp/jwks"}), {})
    source = _Keys(parse_jwks({"keys": [_jwk(k1, kid="k1")]}))
    auth = Authenticator(settings.auth, "uuid", source)
    claims = {"tenant_id": TENANT, "exp": int(time.time()) + 60, "sub": "svc"}
    token2 = jwt.encode(claims, k2, algorithm="RS256", headers={"kid": "k2"})
    assert auth.authenticate("Bearer " + jwt.encode(claims, k1, algorithm="RS256", headers={"kid": "k1"})).tenants \
        == frozenset({TENANT})
    with pytest.raises(UnknownKeyId):
        auth.authenticate("Bearer " + token2)
    source.current = parse_jwks({"keys": [_jwk(k1, kid="k1"), _jwk(k2, kid="k2")]})  # what a refresh does
    assert auth.authenticate("Bearer " + token2).name == "svc"
    # no kid at all, or a kid whose key signed something else: a plain 401, nothing to refetch for
    for token in (jwt.encode(claims, k1, algorithm="RS256"),
                  jwt.encode(claims, k1, algorithm="RS256", headers={"kid": "k2"})):
        with pytest.raises(ApiError) as err:
            auth.authenticate("Bearer " + token)
        assert type(err.value) is ApiError and err.value.kind.code == "unauthenticated"


# -- docs/openapi.yaml against the code -----------------------------------------------------

def test_openapi_document_is_valid_openapi_3_1() -> None:
    assert document()["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(document()).validate()


def test_api_md_error_table_lists_every_code_with_its_status() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    rows = {(m.group(1), m.group(2)) for m in re.finditer(r"^\| `([a-z_]+)` \| (\d{3})", text, re.MULTILINE)}
    rows |= {("not_found", "404"), ("method_not_allowed", "405")}  # one row for both
    assert {(k.code, str(k.status)) for k in ALL_KINDS} <= rows
    from proxy.client import _CODES

    assert {k.code for k in ALL_KINDS} - {"config_invalid", "unsupported_media_type"} <= set(_CODES)


def test_openapi_document_matches_the_code() -> None:
    codes = document()["components"]["schemas"]["ErrorObject"]["properties"]["code"]["enum"]
    assert sorted(codes) == sorted({k.code for k in ALL_KINDS})
    assert schema_properties("QueryRequest") == set(handlers._QUERY_FIELDS)
    assert schema_properties("TransactionRequest") == set(handlers._TX_FIELDS)
    assert schema_properties("Statement") == set(handlers._STATEMENT_FIELDS)
    assert schema_properties("NeonQuery") == set(neon._QUERY_FIELDS)
    assert schema_properties("Limits") == set(LIMIT_KEYS) == schema_properties("LimitsPatch")
    isolation = document()["paths"]["/sql"]["post"]["parameters"][5]["schema"]["enum"]
    assert set(isolation) == set(neon.ISOLATION_LEVELS)


async def test_a_reload_keeps_the_refresher_unless_its_settings_change() -> None:
    cfg = parse_config(_config(jwt_cfg={"algorithms": ["RS256"], "jwks_url": "https://idp/jwks"}), {}).auth.jwt
    assert cfg is not None
    refresher = jwks.JwksRefresher(cfg)
    assert await jwks.restart(refresher, cfg) is refresher
    assert await jwks.restart(refresher, None) is None
    assert await refresher.refresh() is False  # closed: requests still holding it fetch nothing
    assert await jwks.start(None) is None
