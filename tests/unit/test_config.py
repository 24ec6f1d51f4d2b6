"""Config: every key checked at load, every problem reported with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, canonical_tenant_id, load_config, parse_config, redact_dsn

KEY = "a" * 64
TENANT = "11111111-1111-4111-8111-111111111111"


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "database": {"dsn": "postgresql://app:secret@127.0.0.1:6432/appdb"},
        "auth": {"api_keys": [{"name": "svc", "sha256": KEY, "tenant": TENANT}]},
    }
    raw.update(extra)
    return raw


def problems(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env or {})
    return info.value.problems


def test_minimal_config_gets_documented_defaults() -> None:
    s = parse_config(minimal(), {})
    assert (s.server.port, s.server.admin_port) == (8080, 9090)
    assert (s.database.pool_min_size, s.database.pool_max_size, s.database.acquire_timeout_ms) == (2, 20, 2000)
    assert (s.tenancy.guc, s.tenancy.id_format, s.tenancy.header) == ("app.tenant_id", "uuid", "X-Tenant-Id")
    assert (s.defaults.statement_timeout_ms, s.defaults.max_rows) == (5000, 10000)
    assert s.auth.api_keys[0].tenants == frozenset({TENANT})


def test_example_and_dev_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("example.yaml", "dev.yaml"):
        load_config(root / "config" / name, {"PROXY_JWT_SECRET": "x" * 40, "PROXY_DB_PASSWORD": "pw",
                                               "PROXY_STATS_PASSWORD": "pw"})


def test_every_problem_is_listed_by_key_path() -> None:
    raw = minimal(
        server={"port": "eighty", "colour": "blue"},
        database={"dsn": "mysql://x", "pool_min_size": 30, "pool_max_size": 10},
        tenancy={"guc": "tenant", "id_format": "int"},
        defaults={"max_rows": 0},
        tenants={"not-a-uuid": {"max_rows": 5}, TENANT: {"statement_timeout_ms": "soon"}},
    )
    raw["auth"]["api_keys"].append({"name": "svc", "sha256": "xyz", "tenants": ["*", TENANT]})
    got = problems(raw)
    expected = [
        "server.port: must be an integer, got str",
        "server.colour: unknown key",
        "database.dsn: must be a postgresql:// URL",
        "database.pool_min_size: must be <= pool_max_size (10)",
        "tenancy.guc: must be a custom setting name",
        "tenancy.id_format: must be uuid or slug, got 'int'",
        "defaults.max_rows: must be >= 1, got 0",
        "tenants.not-a-uuid: is not a valid uuid tenant id",
        f"tenants.{TENANT}.statement_timeout_ms: must be an integer",
        "auth.api_keys[1].sha256: must be 64 hex characters",
        "auth.api_keys[1].name: duplicate key name 'svc'",
        'auth.api_keys[1].tenants: "*" must stand alone',
    ]
    for e in expected:
        assert any(p.startswith(e) for p in got), (e, got)
    assert len(got) >= len(expected)


def test_missing_sections() -> None:
    assert problems({}) == ["database: is required",
                            "auth: configure at least one of api_keys or jwt "
                            "(or control.dsn, whose catalog holds keys)"]
    assert problems([1, 2]) == ["(top level): must be a mapping"]


def test_api_key_needs_exactly_one_of_tenant_or_tenants() -> None:
    raw = minimal()
    raw["auth"]["api_keys"] = [{"name": "a", "sha256": KEY},
                               {"name": "b", "sha256": "b" * 64, "tenant": TENANT, "tenants": [TENANT]}]
    got = problems(raw)
    assert got[0].startswith("auth.api_keys[0]: needs exactly one of `tenant`")
    assert got[1].startswith("auth.api_keys[1]: needs exactly one of `tenant`")


def test_env_expansion_and_missing_variable() -> None:
    raw = minimal(database={"dsn": "postgresql://app:${DB_PW}@db:6432/appdb"})
    s = parse_config(raw, {"DB_PW": "s3cret"})
    assert s.database.dsn == "postgresql://app:s3cret@db:6432/appdb"
    assert problems(raw) == ["database.dsn: environment variable DB_PW is not set"]


def test_jwt_checks() -> None:
    raw = minimal()
    raw["auth"]["jwt"] = {"algorithms": ["HS256"], "secret_env": "NOPE"}
    assert problems(raw) == ["auth.jwt.secret_env: environment variable NOPE is not set"]
    raw["auth"]["jwt"] = {"algorithms": ["HS256"], "secret": "short"}
    assert problems(raw) == ["auth.jwt.secret: an HMAC secret must be at least 32 characters"]
    raw["auth"]["jwt"] = {"algorithms": ["none"], "secret": "x" * 40}
    assert problems(raw)[0].startswith("auth.jwt.algorithms: unsupported algorithm 'none'")
    raw["auth"]["jwt"] = {"algorithms": ["RS256"], "public_key_file": "/no/such/file.pem"}
    assert problems(raw)[0].startswith("auth.jwt.public_key_file: cannot read /no/such/file.pem")
    raw["auth"]["jwt"] = {"algorithms": ["RS256"], "secret": "x" * 40}
    assert problems(raw) == ["auth.jwt.algorithms: asymmetric algorithms need public_key_file, jwks_file or jwks_url"]


def test_slug_tenants() -> None:
    raw = minimal(tenancy={"id_format": "slug"})
    raw["auth"]["api_keys"][0]["tenant"] = "acme-corp"
    assert parse_config(raw, {}).auth.api_keys[0].tenants == frozenset({"acme-corp"})
    raw["auth"]["api_keys"][0]["tenant"] = "Acme Corp!"
    assert problems(raw) == ["auth.api_keys[0].tenant: 'Acme Corp!' is not a valid slug tenant id"]


def test_tenant_id_checks_refuse_what_is_not_exactly_an_id() -> None:
    assert canonical_tenant_id("acme-corp", "slug") == "acme-corp"
    assert canonical_tenant_id("a" * 63, "slug") == "a" * 63
    for bad in ("acme\n", "a" * 64, "x" * 10_000, "Acme", ""):
        assert canonical_tenant_id(bad, "slug") is None, bad
    assert canonical_tenant_id("{" + TENANT.upper() + "}", "uuid") == TENANT
    for bad in (TENANT + "\n", TENANT + "0", "f" * 10_000):
        assert canonical_tenant_id(bad, "uuid") is None, bad


def test_uuid_tenant_ids_are_canonicalised() -> None:
    raw = minimal(tenants={TENANT.upper(): {"max_rows": 7}})
    s = parse_config(raw, {})
    assert s.limits_for(TENANT).max_rows == 7


def test_redaction_hides_secrets() -> None:
    raw = minimal()
    raw["auth"]["jwt"] = {"algorithms": ["HS256"], "secret": "y" * 40}
    text = str(parse_config(raw, {}).redacted())
    assert "secret@" not in text and KEY not in text and "y" * 40 not in text
    assert redact_dsn("postgresql://app:pw@h:1/db") == "postgresql://app:<redacted>@h:1/db"


def test_bad_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, {})
    assert info.value.problems[0].startswith("(file): not valid YAML at line")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml", {})
    assert "cannot read" in info.value.problems[0]


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    import yaml

    good.write_text(yaml.safe_dump(minimal()))
    r = _cli("check-config", "--config", str(good))
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(server={"port": -1}, defaults={"max_rows": "many"})))
    r = _cli("check-config", "--config", str(bad))
    assert r.returncode == 1
    assert "server.port: must be between 0 and 65535, got -1" in r.stderr
    assert "defaults.max_rows: must be an integer, got str" in r.stderr
    assert "Traceback" not in r.stderr


def test_hash_key_and_new_key_cli() -> None:
    import hashlib

    r = _cli("hash-key", stdin="my-key\n")
    assert r.returncode == 0 and r.stdout.strip() == hashlib.sha256(b"my-key").hexdigest()
    r = _cli("new-key")
    lines = dict(line.split(":", 1) for line in r.stdout.strip().splitlines())
    key, digest = lines["key"].strip(), lines["sha256"].strip()
    assert len(key) > 32 and hashlib.sha256(key.encode()).hexdigest() == digest
    r = _cli("hash-key", stdin="")
    assert r.returncode == 1


def test_an_admin_port_off_loopback_needs_admin_tokens() -> None:
    off = {**minimal(), "server": {"admin_host": "0.0.0.0"}}
    assert problems(off) == ["admin.tokens: required when server.admin_host (0.0.0.0) is not a loopback address: "
                             "every /admin route would be open to the network"]
    token = {"name": "ops", "sha256": "ab" * 32}
    assert parse_config({**off, "admin": {"tokens": [token]}}, {}).admin.tokens[0].name == "ops"
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert parse_config({**minimal(), "server": {"admin_host": host}}, {}).admin.tokens == ()
    assert problems({**off, "admin": {"tokens": [{"name": "ops", "sha256": "nope"}, token, token]}}) == [
        "admin.tokens[0].sha256: must be 64 hex characters (see `tenant-proxy hash-key`)",
        "admin.tokens[1].name: duplicate token name 'ops'", "admin.tokens[2].name: duplicate token name 'ops'"]


def test_control_section() -> None:
    s = parse_config({**minimal(), "control": {"dsn": "postgresql://c@db/x"}}, {})
    assert (s.control.dsn, s.control.lease_s, s.control.heartbeat_s) == ("postgresql://c@db/x", 10.0, 2.0)
    assert parse_config(minimal(), {}).control.dsn is None
    assert problems({**minimal(), "control": {"dsn": "mysql://x", "lease_s": 2, "heartbeat_s": 5}}) == [
        "control.dsn: must be a postgresql:// URL", "control.heartbeat_s: must be at most half of control.lease_s (2)"]
    # with a catalog the keys may all live there
    no_keys = {k: v for k, v in minimal().items() if k != "auth"}
    assert parse_config({**no_keys, "control": {"dsn": "postgresql://c@db/x"}}, {}).auth.api_keys == ()
