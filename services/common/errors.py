"""Domain errors. Services raise these; one interceptor per server maps them to gRPC codes.

Deciding the status code by exception type (never by message text) keeps the mapping in one
place: `services.common.status` (servers: error -> status; clients: status -> error).
"""

from __future__ import annotations


class LoraloopError(Exception):
    """Base of every error that has a defined gRPC status."""


class NotFound(LoraloopError):
    pass


class InvalidArgument(LoraloopError):
    pass


class FailedPrecondition(LoraloopError):
    """Stale publisher epoch, base-model mismatch, state that forbids the call."""


class Unauthenticated(LoraloopError):
    pass


class PermissionDenied(LoraloopError):
    pass


class ResourceExhausted(LoraloopError):
    """Size limits and backpressure."""


class Unavailable(LoraloopError):
    """A dependency (Redis, another service) cannot be reached; the caller may retry."""


class AlreadyExists(LoraloopError):
    pass


class DataLoss(LoraloopError):
    """Bytes that do not match their record (short, or another sha256)."""


class RemoteError(LoraloopError):
    """A call failed with a status that has no domain type here (DEADLINE_EXCEEDED, INTERNAL,
    ...); `code` is that status (a grpc.StatusCode)."""

    def __init__(self, code: object, details: str) -> None:
        super().__init__(f"{getattr(code, 'name', code)}: {details}")
        self.code = code
