"""admin.tokens without a control catalog: every /admin route needs a token, a refused
request changes nothing, and each change is a JSON line naming the token."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pytest

from ..fix_gateway import KEY_B, TENANT_B

TOKEN = "admin-auth-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def test_admin_token_required_and_changes_logged_with_its_name(gateway_with: Any,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    admin = {"tokens": [{"name": "ops-bob", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}
    async with gateway_with(admin=admin) as api:
        path = f"/admin/tenants/{TENANT_B}/limits"
        for headers in ({}, {"Authorization": "Bearer not-it"}, {"Authorization": TOKEN}):
            r = await api.request("PUT", path, json={"suspended": True}, admin=True, key=None, headers=headers)
            assert r.status == 401 and r.code == "unauthenticated"
        assert (await api.query("SELECT 1", key=KEY_B)).status == 200  # nothing changed
        for path_open in ("/healthz", "/readyz", "/metrics"):
            assert (await api.request("GET", path_open, admin=True, key=None)).status == 200
        with caplog.at_level(logging.INFO, logger="tenant_proxy.changes"):
            r = await api.request("PUT", path, json={"max_rows": 7}, admin=True, key=None, headers=BEARER)
        assert r.status == 200 and r.body["limits"]["max_rows"] == 7
        records = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "tenant_proxy.changes"]
        assert records and records[-1]["actor"] == "ops-bob" and records[-1]["subject"] == TENANT_B
        assert records[-1]["before"]["max_rows"] != 7 and records[-1]["after"]["max_rows"] == 7
        r = await api.request("GET", "/admin/fleet", admin=True, key=None, headers=BEARER)
        assert r.status == 200 and r.body["catalog"] is False and len(r.body["instances"]) == 1
        r = await api.request("GET", "/admin/changes", admin=True, key=None, headers=BEARER)
        assert r.status == 404 and r.code == "not_found"
