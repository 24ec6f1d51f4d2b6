"""pg-tenant-proxy: tenant-isolating SQL over HTTP for a shared PostgreSQL behind PgBouncer."""

__version__ = "0.1.0"
