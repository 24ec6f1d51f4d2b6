"""What one request did, filled in along the request path and read once on the way out
(metrics, access log, Server-Timing)."""

from __future__ import annotations

from dataclasses import dataclass

_SERVER_TIMING = "auth;dur=%.3f, guard;dur=%.3f, wait;dur=%.3f, db;dur=%.3f, encode;dur=%.3f"


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
        return _SERVER_TIMING % (self.auth_s * 1000, self.guard_s * 1000, (self.wait_s or 0.0) * 1000,
                                 (self.db_s or 0.0) * 1000, self.encode_s * 1000)
