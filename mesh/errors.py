"""Domain errors and their mapping to rich gRPC statuses.

Core modules raise these (they never import grpc); the error interceptor turns them into a
``google.rpc.Status`` with an ``ErrorInfo`` detail (and ``RetryInfo`` / ``BadRequest`` where they
help the caller), so every service reports failures the same way.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "llm-mesh"


class MeshError(Exception):
    """Base of errors a caller can act on. ``reason`` is UPPER_SNAKE and stable."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after_s: float | None = None,
        metadata: dict[str, str] | None = None,
        quota_subject: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})
        # Whose quota ran out (``tenant:acme``): becomes a QuotaFailure detail.
        self.quota_subject = quota_subject


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class FailedPrecondition(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unauthenticated(MeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Cancelled(MeshError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


def to_status_proto(error: MeshError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for a domain error, with ErrorInfo and optional details."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if error.retry_after_s is not None:
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(
                seconds=int(error.retry_after_s),
                nanos=int((error.retry_after_s % 1) * 1_000_000_000),
            )
        )
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    if error.quota_subject is not None:
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=error.quota_subject, description=error.message
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(quota)
        details.append(packed)
    if error.field is not None:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=error.field, description=error.message
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=details)


def to_grpc_status(error: MeshError) -> grpc.Status:
    """What a server aborts with: the code, the message, and the rich status in the trailers.

    ``grpc_status.rpc_status`` writes the ``grpc-status-details-bin`` trailer, so every client
    (grpcio-status, grpc-web in the browser, the polyglot tests) reads it with its stock helper.
    """
    status: grpc.Status = rpc_status.to_status(to_status_proto(error))
    return status


def rich_status(error: object) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carried, or ``None``.

    ``None`` also when the call carried no readable one (not a call, malformed bytes, or a code
    or message that disagrees with the call's): the caller then falls back to the bare code.
    """
    try:
        # The sync reader works on grpc.aio errors too: their accessors are plain methods.
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except (AttributeError, ValueError, DecodeError):
        return None
    return status


def error_info_reason(status: status_pb2.Status | None) -> str | None:
    """The ``ErrorInfo.reason`` in ``status``'s details, or ``None`` (no status, no reason)."""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason) or None
    return None
