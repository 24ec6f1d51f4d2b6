"""Idempotency keys: a request runs at most once per (tenant, key) within the retention.

The claim, the caller's statements and the stored response share one transaction:

1. Insert the key with a hash of the request.  A request with the same key still running
   holds its uncommitted row, and the insert waits for it, up to ``CLAIM_LOCK_TIMEOUT``
   (``lock_timeout``): then 409 ``idempotency_in_progress``.  So does a key whose first
   request committed after this one's statement began (its row is in the way of the
   insert, but not visible yet): a retry replays it.  (Advisory locks, which serialised
   this before, are closed to the role: they fill the cluster's shared lock table.)
2. If a committed record exists instead:
   a different hash is 422 ``idempotency_key_reused``; the same hash replays the stored
   status and body without running anything; a record past the retention is reclaimed.
3. After the statements, the response is stored, then everything commits together.  A
   request that fails rolls back its record too, so a retry runs afresh.

All SQL here is the gateway's own, run under the tenant's RLS context.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..errors import IDEMPOTENCY_IN_PROGRESS, IDEMPOTENCY_KEY_REUSED, INVALID_REQUEST, ApiError

HEADER = "Idempotency-Key"
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")

# How long a claim waits for a request with the same key that is still running.
CLAIM_LOCK_TIMEOUT_MS = 200
CLAIM_SQL = """
WITH claimed AS (
  INSERT INTO public.idempotency_keys (key, request_hash) VALUES ($1, $2)
  ON CONFLICT (tenant_id, key) DO NOTHING
  RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM claimed) AS claimed,
       k.request_hash, k.status, k.response,
       k.created_at < pg_catalog.now() - pg_catalog.make_interval(secs => $3) AS expired
FROM (SELECT 1) one
LEFT JOIN public.idempotency_keys k ON k.key = $1
"""
RECLAIM_SQL = """
UPDATE public.idempotency_keys SET request_hash = $2, status = NULL, response = NULL, created_at = pg_catalog.now()
WHERE key = $1
"""
STORE_SQL = "UPDATE public.idempotency_keys SET status = $2, response = $3 WHERE key = $1"
PURGE_SQL = """
DELETE FROM public.idempotency_keys WHERE created_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)
"""


@dataclass(frozen=True, slots=True)
class Claim:
    key: str
    request_hash: str
    retention_s: int


@dataclass(frozen=True, slots=True)
class Replay:
    status: int
    body: bytes


def claim_for(key: str | None, endpoint: str, body: bytes, retention_s: int) -> Claim | None:
    """Validate the header and hash what makes two requests "the same"."""
    if key is None:
        return None
    if not _KEY_RE.match(key):
        raise ApiError(INVALID_REQUEST, f"{HEADER} must be 1-255 visible ASCII characters")
    digest = hashlib.sha256(endpoint.encode() + b"\n" + body).hexdigest()
    return Claim(key=key, request_hash=digest, retention_s=retention_s)


def in_progress() -> ApiError:
    """The claim waited its lock timeout for a running request with the same key."""
    return ApiError(IDEMPOTENCY_IN_PROGRESS, "a request with this idempotency key is still running",
                    retry_after_s=1)


def decide(claim: Claim, claimed: bool, stored_hash: str | None, status: int | None,
           response: bytes | None, expired: bool | None) -> Replay | None:
    """What the claim query's answer means: run (None), replay, or refuse."""
    if not claimed and stored_hash is None:
        # The insert met a row this statement's snapshot cannot see: a request with the
        # key committed between the snapshot and the lock.  Running now would run twice.
        raise ApiError(IDEMPOTENCY_IN_PROGRESS, "a request with this idempotency key has just finished; "
                       "retry to receive its response", retry_after_s=1)
    if claimed or expired:
        return None
    if stored_hash != claim.request_hash:
        raise ApiError(IDEMPOTENCY_KEY_REUSED, "this idempotency key was used for a different request")
    return Replay(status=status or 200, body=response or b"")
