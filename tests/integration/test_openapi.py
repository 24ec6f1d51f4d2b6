"""docs/openapi.yaml against the running gateway: every route described (and nothing else),
real responses valid against it, and schemathesis finding no 5xx and no schema violation."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import orjson
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ..fix_gateway import KEY_A, KEY_ANY, TENANT_A, TENANT_B, Api, Reply
from ..openapi_doc import check_response, document, operations

# schemathesis' budget: examples per operation (and mode), reproducible from run to run.
MAX_EXAMPLES = 25


async def _checked(api: Api, method: str, path: str, doc_path: str | None = None, **kwargs: Any) -> Reply:
    r = await api.request(method, path, **kwargs)
    check_response(doc_path or path, method, r.status, r.headers, r.body, r.headers.get("Content-Type"))
    return r


# -- (a) the routes and the document agree ----------------------------------------------------

def _served(api: Api) -> dict[str, set[tuple[str, str]]]:
    """(METHOD, path) per port, as the aiohttp applications registered them."""
    out: dict[str, set[tuple[str, str]]] = {}
    for port, runner in zip(("data", "admin"), api.running.gateway.runners, strict=True):
        routes = {(r.method, r.resource.canonical) for r in runner.app.router.routes() if r.resource is not None}
        gets = {path for method, path in routes if method == "GET"}
        # aiohttp adds HEAD beside every GET; the document describes the GET.
        assert {path for method, path in routes if method == "HEAD"} <= gets
        out[port] = {(m, p) for m, p in routes if m != "HEAD"}
    return out


async def test_every_route_is_documented_and_every_operation_is_served(api: Api) -> None:
    served = _served(api)
    assert served["data"] | served["admin"] == operations()
    # Each path's `servers` say which port serves it (none: both).
    for method, path in operations():
        urls = [s["url"] for s in document()["paths"][path].get("servers", document()["servers"])]
        ports = {"data" if u.endswith(":8080") else "admin" for u in urls}
        assert {p for p in ("data", "admin") if (method, path) in served[p]} == ports, (method, path)


async def test_the_document_is_served_on_both_ports(api: Api) -> None:
    for admin in (False, True):
        r = await _checked(api, "GET", "/openapi.json", key=None, admin=admin)
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        assert r.body == orjson.loads(orjson.dumps(document()))


# -- (b) real responses validate -------------------------------------------------------------

async def test_data_responses_match_the_document(api: Api) -> None:
    q, t = "/v1/query", "/v1/transaction"
    ok = await _checked(api, "POST", q, json={"sql": "SELECT 1 AS one, 'x'::text AS two", "row_format": "array"})
    assert ok.status == 200
    assert (await _checked(api, "POST", q, json={"sql": "SELECT event_type FROM events", "max_rows": 1})).status == 200
    assert (await _checked(api, "POST", t, json={"statements": [{"sql": "SELECT 1"}, {"sql": "SELECT 2"}]})).status \
        == 200
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (q, {"json": {"sql": "SELECT 1", "nope": 1}}, 400, "invalid_request"),
        (q, {"json": {"sql": "SET app.tenant_id = 'x'"}}, 400, "statement_rejected"),
        (q, {"json": {"sql": "SELECT * FROM no_such_table"}}, 400, "sql_invalid"),
        (q, {"json": {"sql": "SELECT 1"}, "key": KEY_ANY}, 400, "tenant_required"),
        (q, {"json": {"sql": "SELECT 1"}, "key": "wrong"}, 401, "unauthenticated"),
        (q, {"json": {"sql": "SELECT 1"}, "tenant": TENANT_B}, 403, "tenant_forbidden"),
        (q, {"json": {"sql": "SELECT 1 / 0"}}, 422, "sql_error"),
        (q, {"json": {"sql": "SELECT pg_sleep(2)", "timeout_ms": 100}}, 504, "statement_timeout"),
        (t, {"json": {"statements": []}}, 400, "invalid_request"),
        (q, {"json": {"sql": "SELECT 1"}, "headers": {"Idempotency-Key": "bad key"}}, 400, "invalid_request"),
    ]
    for path, kwargs, status, code in cases:
        r = await _checked(api, "POST", path, **kwargs)
        assert (r.status, r.code) == (status, code), (kwargs, r.body)
    # A unique violation: 409, with only PostgreSQL's primary message.
    dup = {"sql": "INSERT INTO events (id, created_at, event_type, data) VALUES "
                  "('00000000-0000-4000-8000-0000000000aa', '2024-01-01', 'dup', '{}')"}
    r = await _checked(api, "POST", t, json={"statements": [dup, dup]})
    assert (r.status, r.code, r.body["error"]["sqlstate"]) == (409, "conflict", "23505")
    # The Neon endpoint is off in the base config.
    r = await _checked(api, "POST", "/sql", json={"query": "SELECT 1"})
    assert (r.status, r.code) == (404, "not_found")


async def test_neon_and_limit_responses_match_the_document(gateway_with: Any) -> None:
    async with gateway_with(server={"neon_sql_endpoint": True},
                            tenants={TENANT_A: {"rate_per_s": 0.5, "burst": 3, "max_request_bytes": 1024}}) as api:
        big = b'{"sql": "SELECT ' + b"1" * 2000 + b'"}'
        r = await _checked(api, "POST", "/v1/query", data=big)
        assert (r.status, r.code) == (413, "payload_too_large")
        r = await _checked(api, "POST", "/sql", data=big.replace(b'"sql"', b'"query"'))
        assert (r.status, r.body["error"]["code"]) == (413, "payload_too_large")
        r = await _checked(api, "POST", "/sql", json={"query": "SELECT $1::int AS n", "params": ["1"]},
                           headers={"Neon-Raw-Text-Output": "true"})
        assert r.status == 200 and r.body["rows"] == [{"n": "1"}]
        r = await _checked(api, "POST", "/sql", json={"queries": [{"query": "SELECT 1"}]},
                           headers={"Neon-Batch-Read-Only": "true"})
        assert r.status == 200 and r.headers["Neon-Batch-Read-Only"] == "true"
        r = await _checked(api, "POST", "/sql", json={"query": "SELECT 1 / 0"})
        assert (r.status, r.body["code"], r.body["error"]["code"]) == (400, "22012", "sql_error")
        r = await _checked(api, "POST", "/sql", json={"query": "SELECT 1"})
        assert (r.status, r.body["error"]["code"]) == (429, "rate_limited") and r.headers["Retry-After"]
        r = await _checked(api, "POST", "/v1/query", json={"sql": "SELECT 1"})
        assert (r.status, r.code) == (429, "rate_limited") and int(r.headers["Retry-After"]) >= 1


async def test_health_and_admin_responses_match_the_document(api: Api) -> None:
    for admin in (False, True):
        assert (await _checked(api, "GET", "/healthz", key=None, admin=admin)).status == 200
        assert (await _checked(api, "GET", "/readyz", key=None, admin=admin)).status == 200
    await api.query("SELECT 1")  # so that the hotspot and pool figures have something in them
    for path in ("/metrics", "/admin/hotspots", "/admin/config", "/admin/pool", f"/admin/tenants/{TENANT_A}"):
        r = await _checked(api, "GET", path, doc_path="/admin/tenants/{tenant_id}" if "tenants" in path else None,
                           key=None, admin=True)
        assert r.status == 200, (path, r.body)
    r = await _checked(api, "GET", "/admin/tenants/not-a-uuid", "/admin/tenants/{tenant_id}", key=None, admin=True)
    assert (r.status, r.code) == (400, "invalid_request")
    tenant = str(uuid.uuid4())  # a tenant no other test uses: these limits stay until a reload
    limits = "/admin/tenants/{tenant_id}/limits"
    r = await _checked(api, "PUT", f"/admin/tenants/{tenant}/limits", limits, key=None, admin=True,
                       json={"max_rows": 10, "rate_per_s": 5})
    assert r.status == 200 and r.body["limits"]["max_rows"] == 10
    r = await _checked(api, "PUT", f"/admin/tenants/{tenant}/limits", limits, key=None, admin=True,
                       json={"max_rows": 0, "burst": "x"})
    assert (r.status, r.code) == (400, "invalid_request") and len(r.body["error"]["problems"]) == 2
    r = await _checked(api, "POST", "/admin/reload", key=None, admin=True)
    assert (r.status, r.code) == (400, "config_invalid") and r.body["error"]["problems"]


# -- (c) schemathesis against the live gateway ----------------------------------------------

@dataclass
class Figures:
    operations: list[str] = field(default_factory=list)
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


ADMIN_TOKEN = "openapi-test-admin-token"
POSITIVE_CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
                   response_schema_conformance, ignored_auth]
NEGATIVE_CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
                   response_schema_conformance]


def _fuzz(data_url: str, admin_url: str) -> Figures:
    """Every operation, positive data (all checks) then negative data (no 5xx, documented answers)."""
    schema = schemathesis.openapi.from_dict(document())
    figures = Figures()
    session = requests.Session()
    ordered = sorted((r.ok() for r in schema.get_all_operations()), key=lambda op: op.path.startswith("/admin"))
    for op in ordered:
        servers = op.definition.raw.get("servers") or document()["paths"][op.path].get("servers")
        bases = [data_url, admin_url] if servers is None else [
            data_url if s["url"].endswith(":8080") else admin_url for s in servers]
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.body else [])
        for base in bases:
            for mode in modes:
                figures.operations.append(f"{op.label} @{base.rsplit(':', 1)[1]} {mode.value}")
                _run_operation(op, base, mode, session, figures)
    return figures


def _run_operation(op: Any, base: str, mode: GenerationMode, session: requests.Session, figures: Figures) -> None:
    checks = POSITIVE_CHECKS if mode is GenerationMode.POSITIVE else NEGATIVE_CHECKS
    if op.path == "/sql":  # as Neon does, /sql answers a bad credential with 400 (docs/api.md)
        checks = [c for c in checks if c is not ignored_auth]
    secured = op.definition.raw.get("security") != []

    @hypothesis.settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                         suppress_health_check=list(hypothesis.HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    @hypothesis.given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        token = ADMIN_TOKEN if op.path.startswith("/admin") else KEY_A
        headers = {"Authorization": f"Bearer {token}"} if secured else {}
        response = case.call(base_url=base, session=session, headers=headers, timeout=30)
        figures.requests += 1
        figures.statuses[response.status_code] = figures.statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            figures.failures.append(f"{op.label}: {response.status_code} {response.text[:300]} for {case.body!r}")
            return
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except (AssertionError, FailureGroup) as exc:
            figures.failures.append(f"{op.label} ({mode.value}): {str(exc)[:600]}")

    if mode is GenerationMode.POSITIVE:  # the document's own examples first, as they are
        for example in op.get_strategies_from_examples():
            hypothesis.settings(max_examples=1)(hypothesis.given(case=example)(run.hypothesis.inner_test))()
    run()


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(gateway_with: Any) -> None:
    admin = {"tokens": [{"name": "ops", "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]}
    async with gateway_with(server={"neon_sql_endpoint": True}, admin=admin) as api:
        started = time.monotonic()
        # schemathesis is synchronous; the gateway runs on this event loop, so it must not block it.
        figures = await asyncio.to_thread(_fuzz, api.base, api.admin)
        elapsed = time.monotonic() - started
    print(f"schemathesis: {len(figures.operations)} operation runs, {figures.requests} requests in {elapsed:.1f} s, "
          f"statuses {dict(sorted(figures.statuses.items()))}")
    assert not figures.failures, "\n".join(figures.failures[:20])
    assert len({label.split(" @")[0] for label in figures.operations}) == len(operations())
    assert figures.requests >= 5 * len(figures.operations)
    assert 200 in figures.statuses and 400 in figures.statuses
