"""Domain errors. Services raise these; one interceptor per server maps them to gRPC codes.

Deciding the status code by exception type (never by message text) keeps the mapping in one
place: `services.common.grpc_server.STATUS_OF`.
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
