"""Observability: metrics, hotspots, PgBouncer's figures, request traces, the access log."""
