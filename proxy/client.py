"""Python client for the gateway's HTTP API: ``AsyncClient`` (aiohttp) and a small sync ``Client``.

Errors come back as typed exceptions mirroring the gateway's error codes.  Retryable
failures (``"retryable": true`` in the error body, 429/503 with ``Retry-After``,
dropped connections) are retried with exponential backoff and jitter, honouring
``Retry-After``.  Writes are only retried under an ``Idempotency-Key``, which the
client generates once per call (and reuses on every retry) when retries are on, so a
retried write runs at most once.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[dict[str, str]]
    rows: list[Any]
    row_count: int
    command: str
    truncated: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueryResult:
        return cls(columns=data["columns"], rows=data["rows"], row_count=data["row_count"],
                   command=data["command"], truncated=data["truncated"])


class GatewayError(Exception):
    """An error answered by the gateway (see docs/api.md for the codes)."""

    code = "internal"

    def __init__(self, status: int, message: str, *, sqlstate: str | None = None, retryable: bool = False,
                 request_id: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(f"{self.code} ({status}): {message}")
        self.status = status
        self.message = message
        self.sqlstate = sqlstate
        self.retryable = retryable
        self.request_id = request_id
        self.retry_after_s = retry_after_s


class ConnectionFailed(GatewayError):
    """The gateway could not be reached, or the connection dropped before an answer."""

    code = "connection_failed"


def _error_class(code: str) -> type[GatewayError]:
    name = "".join(part.capitalize() for part in code.split("_")) + "Error"
    return type(name, (GatewayError,), {"code": code, "__doc__": f"The gateway answered `{code}`."})


_CODES = ("unauthenticated", "tenant_required", "tenant_forbidden", "tenant_suspended", "invalid_request",
          "not_found", "method_not_allowed", "payload_too_large", "request_timeout", "statement_rejected",
          "rls_violation", "conflict", "idempotency_in_progress", "idempotency_key_reused", "serialization_failure",
          "deadlock_detected", "statement_timeout", "pool_timeout", "rate_limited", "concurrency_limited",
          "database_unavailable", "transaction_outcome_unknown", "tenant_moving", "sql_error", "sql_invalid",
          "internal", "tenant_unknown", "control_unavailable")
ERRORS: dict[str, type[GatewayError]] = {code: _error_class(code) for code in _CODES}
Unauthenticated = ERRORS["unauthenticated"]
StatementRejected = ERRORS["statement_rejected"]
RlsViolation = ERRORS["rls_violation"]
Conflict = ERRORS["conflict"]
RateLimited = ERRORS["rate_limited"]
DatabaseUnavailable = ERRORS["database_unavailable"]
OutcomeUnknown = ERRORS["transaction_outcome_unknown"]
SqlError = ERRORS["sql_error"]
# A statement the database cannot run at all (syntax, unknown names, privileges): a kind of
# SqlError, so that code catching SqlError catches both.
SqlInvalid: type[GatewayError] = type("SqlInvalidError", (SqlError,), {
    "code": "sql_invalid", "__doc__": "The gateway answered `sql_invalid`."})
ERRORS["sql_invalid"] = SqlInvalid


@dataclass
class AsyncClient:
    """One client per service; reuses HTTP connections.  Use ``async with`` or call ``close()``."""

    base_url: str
    api_key: str
    tenant: str | None = None
    retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    timeout_s: float = 30.0
    retried: int = 0  # retries made so far, across all calls (for logs and tests)
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def query(self, sql: str, *params: Any, tenant: str | None = None, read_only: bool = False,
                    timeout_ms: int | None = None, max_rows: int | None = None,
                    row_format: str = "object") -> QueryResult:
        """Run one statement; return its result."""
        body: dict[str, Any] = {"sql": sql, "params": list(params), "read_only": read_only, "row_format": row_format}
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        if max_rows is not None:
            body["max_rows"] = max_rows
        data = await self._call("/v1/query", body, tenant, read_only)
        return QueryResult.from_json(data)

    async def transaction(self, statements: Sequence[tuple[str, Sequence[Any]] | str], *,
                          tenant: str | None = None, read_only: bool = False, isolation: str | None = None,
                          timeout_ms: int | None = None) -> list[QueryResult]:
        """Run statements (SQL text, or ``(sql, params)``) in one transaction, all or nothing."""
        items = [{"sql": s, "params": []} if isinstance(s, str) else {"sql": s[0], "params": list(s[1])}
                 for s in statements]
        body: dict[str, Any] = {"statements": items, "read_only": read_only}
        if isolation is not None:
            body["isolation"] = isolation
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        data = await self._call("/v1/transaction", body, tenant, read_only)
        return [QueryResult.from_json(r) for r in data["results"]]

    async def _call(self, path: str, body: dict[str, Any], tenant: str | None, read_only: bool) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        if tenant or self.tenant:
            headers["X-Tenant-Id"] = str(tenant or self.tenant)
        # A write is retried only under a key the gateway remembers, so it runs at most once.
        may_retry = self.retries > 0
        if may_retry and not read_only:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        payload = orjson.dumps(body)
        attempt = 0
        while True:
            try:
                return await self._once(path, payload, headers)
            except GatewayError as err:
                # A COMMIT whose outcome is unknown is safe to send again under the same key:
                # the gateway answers the first run's response if it committed.
                again = err.retryable or (err.code == "transaction_outcome_unknown" and "Idempotency-Key" in headers)
                if not (may_retry and again and attempt < self.retries):
                    raise
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
                await asyncio.sleep(max(delay, err.retry_after_s or 0.0))
                attempt += 1
                self.retried += 1

    async def _once(self, path: str, payload: bytes, headers: dict[str, str]) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            async with self._session.post(self.base_url.rstrip("/") + path, data=payload, headers=headers) as resp:
                raw = await resp.read()
                if resp.status < 400:
                    return orjson.loads(raw)
                raise _from_response(resp.status, raw, resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise ConnectionFailed(0, f"{type(exc).__name__}: {exc}", retryable=True) from exc


def _from_response(status: int, raw: bytes, retry_after: str | None) -> GatewayError:
    try:
        err = orjson.loads(raw)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return GatewayError(status, raw[:200].decode(errors="replace"), retryable=status in (502, 503, 504))
    cls = ERRORS.get(err.get("code", ""), GatewayError)
    return cls(status, err.get("message", ""), sqlstate=err.get("sqlstate"), retryable=bool(err.get("retryable")),
               request_id=err.get("request_id"), retry_after_s=float(retry_after) if retry_after else None)


class Client:
    """Blocking wrapper around ``AsyncClient`` for scripts and synchronous services."""

    def __init__(self, base_url: str, api_key: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = AsyncClient(base_url, api_key, **options)

    def query(self, sql: str, *params: Any, **options: Any) -> QueryResult:
        return self._loop.run_until_complete(self._async.query(sql, *params, **options))

    def transaction(self, statements: Sequence[tuple[str, Sequence[Any]] | str], **options: Any) -> list[QueryResult]:
        return self._loop.run_until_complete(self._async.transaction(statements, **options))

    def close(self) -> None:
        self._loop.run_until_complete(self._async.close())
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
