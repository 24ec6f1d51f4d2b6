"""Offline tools that work on a database beside the running gateway: the audit, migrate,
export, import, purge, move and the dev stack.  Nothing on the request path imports them
(an import-linter contract)."""
