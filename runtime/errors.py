"""Errors of the engine and its API, each with a stable code.

The hierarchy::

    * TenantflowError                 (.code, .message, .http_status)
      x InstanceNotFound              instance.not_found            404
      x InstanceAlreadyExists         instance.already_exists       409
      x InvalidInstanceId             instance.invalid_id           400
      x CannotTerminate               instance.cannot_terminate     409
      x InvalidInstanceState          instance.invalid_state        409
      x InvalidEventType              workflow.invalid_event_type   400
      x PayloadTooLarge               payload.too_large             413
      x BadRequest                    bad_request                   400
      x TenantNotFound                tenant.not_found              404
      x TenantLoadFailed              tenant.load_failed            422
      x RateLimited                   rate_limited                  429
      x Unauthorized                  unauthorized                  401
      x StorageError                  storage.error                 503
        + StorageBusy                 storage.busy                  503 (Retry-After)
        + LeaseLost                   storage.lease_lost            409

The codes are the ones of SPEC section 8; clients match on them, never on messages.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadRequest",
    "CannotTerminate",
    "InstanceAlreadyExists",
    "InstanceNotFound",
    "InvalidEventType",
    "InvalidInstanceId",
    "InvalidInstanceState",
    "LeaseLost",
    "PayloadTooLarge",
    "RateLimited",
    "StorageBusy",
    "StorageError",
    "TenantLoadFailed",
    "TenantNotFound",
    "TenantflowError",
    "Unauthorized",
]


class TenantflowError(Exception):
    """Base of every error the engine reports to a caller, with a stable ``code``."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The JSON error body of SPEC 8."""
        return {"error": {"code": self.code, "message": self.message}}


class InstanceNotFound(TenantflowError):
    """Raised when no instance has this id for this tenant (also for another tenant's id)."""

    code = "instance.not_found"
    http_status = 404

    def __init__(self, tenant_id: str, instance_id: str) -> None:
        super().__init__(f"instance {instance_id!r} not found for tenant {tenant_id!r}")


class InstanceAlreadyExists(TenantflowError):
    """Raised when creating an instance whose id the tenant already uses."""

    code = "instance.already_exists"
    http_status = 409

    def __init__(self, tenant_id: str, instance_id: str) -> None:
        super().__init__(f"instance {instance_id!r} already exists for tenant {tenant_id!r}")


class InvalidInstanceId(TenantflowError):
    """Raised when an instance id breaks the pattern or the length limit."""

    code = "instance.invalid_id"
    http_status = 400


class CannotTerminate(TenantflowError):
    """Raised when terminating an instance that has already finished."""

    code = "instance.cannot_terminate"
    http_status = 409


class InvalidInstanceState(TenantflowError):
    """Raised when pause/resume/send_event do not apply to the instance's status."""

    code = "instance.invalid_state"
    http_status = 409


class InvalidEventType(TenantflowError):
    """Raised when an event type breaks the pattern or the length limit."""

    code = "workflow.invalid_event_type"
    http_status = 400


class PayloadTooLarge(TenantflowError):
    """Raised when params, an event payload or a result exceeds its size limit."""

    code = "payload.too_large"
    http_status = 413


class BadRequest(TenantflowError):
    """Raised for malformed input that no more specific code describes."""

    code = "bad_request"
    http_status = 400


class TenantNotFound(TenantflowError):
    """Raised when no tenant has this id."""

    code = "tenant.not_found"
    http_status = 404


class TenantLoadFailed(TenantflowError):
    """Raised when a tenant's code cannot be loaded (names the file, line and error)."""

    code = "tenant.load_failed"
    http_status = 422


class RateLimited(TenantflowError):
    """Raised when a tenant creates instances faster than its rate limit."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthorized(TenantflowError):
    """Raised when the admin API is called without the configured bearer token."""

    code = "unauthorized"
    http_status = 401


class StorageError(TenantflowError):
    """Raised when the database cannot be read or written."""

    code = "storage.error"
    http_status = 503


class StorageBusy(StorageError):
    """Raised, before anything is written, when the database is not keeping up.

    Back-pressure: writes have waited longer than the supervisor allows (a slow or
    unreachable database, a saturated disk). The request did nothing; try it again
    after ``retry_after`` seconds.
    """

    code = "storage.busy"
    http_status = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLost(StorageError):
    """Raised when a write carries a fencing token that is no longer the instance's."""

    code = "storage.lease_lost"
    http_status = 409
