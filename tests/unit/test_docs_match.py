"""The operator's documents say what the code does (issue 23 item 6): each claim below
is read from the document and checked against the code, so the two cannot drift apart."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from proxy.cli import build_parser
from proxy.config import RESTART_KEYS, ConfigError, parse_config, restart_needed

from ..openapi_doc import document

REPO = Path(__file__).resolve().parents[2]
TENANT = "aaaaaaaa-0000-4000-8000-00000000000a"
MINIMAL = {"database": {"dsn": "postgresql://app@127.0.0.1/app"},
           "auth": {"api_keys": [{"name": "svc", "sha256": "0" * 64, "tenant": TENANT}]}}


def _read(path: str) -> str:
    return (REPO / path).read_text()


def test_the_readme_cli_table_names_every_subcommand() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    table = [line for line in _read("README.md").splitlines() if line.startswith("| `tenant-proxy ")]
    named = {re.match(r"\| `tenant-proxy ([a-z-]+)", line).group(1) for line in table}  # type: ignore[union-attr]
    assert set(sub.choices) == named, set(sub.choices) ^ named


def test_api_md_lists_every_error_code_of_the_openapi_document() -> None:
    codes = document()["components"]["schemas"]["ErrorObject"]["properties"]["code"]["enum"]
    listed = set(re.findall(r"^\| `([a-z_]+)` \| \d{3}", _read("docs/api.md"), re.MULTILINE))
    listed |= {"not_found", "method_not_allowed"}  # one row for both
    assert set(codes) <= listed, set(codes) - listed


def _row(doc: str, section: str, key: str) -> str:
    part = doc.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("| ") and f"`{key}`" in line.split("|")[1]]
    assert rows, f"docs/config.md has no row for {section}.{key}"
    return rows[0]


def test_config_md_says_which_settings_need_a_restart() -> None:
    doc = _read("docs/config.md")
    for section, key in RESTART_KEYS:
        assert "needs a restart" in _row(doc, section, key), f"{section}.{key}"
    for section, key in (("server", "drain_s"), ("logging", "level")):
        assert "a reload applies it" in _row(doc, section, key), f"{section}.{key}"
    base = parse_config(MINIMAL, {})
    changed = parse_config({**MINIMAL, "server": {"port": 8081, "drain_s": 5, "max_request_bytes": 4096}}, {})
    assert restart_needed(base, changed) == ["server.port", "server.max_request_bytes"]


def test_env_variables_expand_as_config_md_says() -> None:
    doc = _read("docs/config.md")
    assert "in a list too" in doc and "Mapping keys" in doc
    raw = yaml.safe_load("""
server: {port: "${PORT}", body_timeout_s: "${BODY_S}", neon_sql_endpoint: "${NEON}"}
database: {dsn: "postgresql://app:${PW}@127.0.0.1/app", replicas: ["${REPLICA}"]}
guard: {deny_functions: ["${DENIED}"]}
auth: {api_keys: [{name: svc, sha256: "${HASH}", tenant: aaaaaaaa-0000-4000-8000-00000000000a}]}
""")
    env = {"PORT": "8181", "BODY_S": "2.5", "NEON": "true", "PW": "s3${NOT_A_VAR}", "REPLICA": "postgresql://r/app",
           "DENIED": "pg_sleep", "HASH": "a" * 64}
    settings = parse_config(raw, env)
    assert settings.server.port == 8181 and settings.server.body_timeout_s == 2.5
    assert settings.server.neon_sql_endpoint is True
    assert settings.database.dsn == "postgresql://app:s3${NOT_A_VAR}@127.0.0.1/app"  # expanded once
    assert settings.database.replicas == ("postgresql://r/app",) and settings.guard.deny_functions == {"pg_sleep"}
    with pytest.raises(ConfigError) as unset:
        parse_config({**MINIMAL, "tenancy": {"schemas": ["public", "${SCHEMA}"]}}, {})
    assert unset.value.problems[0] == "tenancy.schemas[1]: environment variable SCHEMA is not set"
    with pytest.raises(ConfigError) as key:  # mapping keys are taken as written
        parse_config({**MINIMAL, "tenants": {"${TENANT}": {"max_rows": 5}}},
                     {"TENANT": "aaaaaaaa-0000-4000-8000-00000000000a"})
    assert key.value.problems == ["tenants.${TENANT}: is not a valid uuid tenant id"]


def test_moving_is_refused_in_the_file() -> None:
    for raw in ({**MINIMAL, "defaults": {"moving": False}},
                {**MINIMAL, "tenants": {"aaaaaaaa-0000-4000-8000-00000000000a": {"moving": True}}}):
        with pytest.raises(ConfigError) as refused:
            parse_config(raw, {})
        assert len(refused.value.problems) == 1 and refused.value.problems[0].endswith(
            "is set only by `tenant-proxy move` (through the control catalog or the admin API), never in the file")


def test_no_stale_promises_and_tuning_quotes_the_benchmark_results() -> None:
    for path in ("README.md", "config/example.yaml", *(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))):
        assert not re.search(r"metrics and /admin/\S* later", _read(path)), path
    results, tuning = _read("benchmarks/RESULTS.md"), _read("docs/tuning.md")
    noisy = results.split("## Noisy neighbour", 1)[1].split("\n## ", 1)[0]
    p99s = [row.split("|")[3].strip() for row in noisy.splitlines() if row.startswith("| no flood")
            or row.startswith("| flood")]
    ratio = next(row.split("|")[4].strip() for row in noisy.splitlines() if "max_concurrency" in row)
    assert len(p99s) == 3
    quoted = tuning.split("benchmarks/noisy_neighbour.py", 1)[1].split("\n\n", 1)[0]
    for figure in (*p99s, ratio):
        assert figure in quoted, (figure, quoted)
    for figure in ("+5.5 % req/s", "-4.2 %"):
        assert figure in tuning and figure.replace(" req/s", "").replace("-", "") in results.replace("**", "")
