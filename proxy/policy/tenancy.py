"""Principal + tenant header -> Tenant (validated canonical id and effective limits).  Pure."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Limits, Settings, canonical_tenant_id
from ..errors import INVALID_REQUEST, TENANT_FORBIDDEN, TENANT_REQUIRED, TENANT_SUSPENDED, TENANT_UNKNOWN, ApiError
from .auth import Principal


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    limits: Limits


def resolve(principal: Principal, header_value: str | None, settings: Settings) -> Tenant:
    """Pick the tenant a request acts for.

    A caller bound to one tenant may omit the header or repeat its own id; naming any
    other tenant is refused, never silently ignored.  A caller allowed several tenants
    must name one.
    """
    header = settings.tenancy.header
    requested: str | None = None
    if header_value is not None:
        requested = canonical_tenant_id(header_value.strip(), settings.tenancy.id_format)
        if requested is None:
            raise ApiError(INVALID_REQUEST, f"{header} is not a valid {settings.tenancy.id_format} tenant id")

    allowed = principal.tenants
    if requested is None:
        if allowed is None or len(allowed) != 1:
            raise ApiError(TENANT_REQUIRED, f"this credential may act for several tenants: name one in {header}")
        (tenant_id,) = allowed
    elif allowed is not None and requested not in allowed:
        raise ApiError(TENANT_FORBIDDEN, "this credential may not act for that tenant")
    else:
        tenant_id = requested

    limits = settings.tenants.get(tenant_id)
    if limits is None:
        if settings.tenant_registry:  # with a control catalog only registered tenants are served
            raise ApiError(TENANT_UNKNOWN, "this tenant is not registered")
        limits = settings.defaults
    if limits.suspended:
        raise ApiError(TENANT_SUSPENDED, "this tenant is suspended")
    return Tenant(id=tenant_id, limits=limits)
