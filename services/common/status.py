"""The one mapping between domain errors and gRPC status codes, both ways.

Servers map what a handler raised to a status (`status_of`, used by the interceptor in
`services.common.grpc_server`); clients map a failed call's status back to the same domain
type (`error_of`), so callers catch `NotFound`, never compare `code.name == "NOT_FOUND"`.
"""

from __future__ import annotations

import grpc

from services.common import errors

STATUS_OF: dict[type[errors.LoraloopError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
}
ERROR_OF: dict[grpc.StatusCode, type[errors.LoraloopError]] = {code: cls for cls, code in STATUS_OF.items()}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status a server answers for `exc` (INTERNAL for anything not a domain error)."""
    if isinstance(exc, errors.RemoteError):
        return exc.code  # relayed as it came
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def error_of(code: grpc.StatusCode, details: str) -> errors.LoraloopError:
    """The domain error for a call that failed with `code` (RemoteError where none fits:
    DEADLINE_EXCEEDED, INTERNAL, ...)."""
    cls = ERROR_OF.get(code)
    return cls(details) if cls is not None else errors.RemoteError(code, details)


def code_name(exc: BaseException) -> str:
    """`NOT_FOUND`, ...: the status name of `exc`, for messages to people."""
    return status_of(exc).name
