"""What one request did, filled in along the request path and read once on the way out
(metrics, access log, Server-Timing)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestTrace:
    endpoint: str
    tenant: str | None = None
    caller: str | None = None
    fingerprint: str | None = None
    error_code: str | None = None
    rows: int = 0
    auth_s: float = 0.0
    guard_s: float = 0.0
    wait_s: float | None = None   # waiting for a pool connection; None: never got that far
    db_s: float | None = None     # BEGIN to COMMIT
    encode_s: float = 0.0

    def server_timing(self) -> str:
        """The ``Server-Timing`` header value, durations in milliseconds."""
        parts = [("auth", self.auth_s), ("guard", self.guard_s), ("wait", self.wait_s or 0.0),
                 ("db", self.db_s or 0.0), ("encode", self.encode_s)]
        return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts)
