"""The gateway's database role, checked on every new connection: a role that is superuser
or has BYPASSRLS ignores every policy, so the pool refuses to use it.  The fatal subset
of ``tenant-proxy audit`` (tools/audit.py), which reports these findings too."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str
    check: str
    object: str
    message: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def ident(*parts: str) -> str:
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


async def audit_role(conn: Any, role: str) -> list[Finding]:
    """The fatal subset: a role that is superuser or has BYPASSRLS ignores every policy."""
    row = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = $1", role)
    if row is None:
        return [Finding("fatal", "role", role, "role does not exist", f"CREATE ROLE {ident(role)} LOGIN;")]
    findings = []
    if row["rolsuper"]:
        findings.append(Finding("fatal", "role_superuser", role,
                                "the gateway's role is a superuser: RLS does not apply",
                                f"ALTER ROLE {ident(role)} NOSUPERUSER;"))
    if row["rolbypassrls"]:
        findings.append(Finding("fatal", "role_bypassrls", role, "the gateway's role has BYPASSRLS",
                                f"ALTER ROLE {ident(role)} NOBYPASSRLS;"))
    return findings
