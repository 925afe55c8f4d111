"""OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with its status.

Handlers raise ``ApiError`` for what only HTTP can get wrong (JSON, types, unknown fields) and
let the core's ``MeshError``s through; ``from_mesh_error`` maps those by gRPC code, so both
protocols refuse the same things for the same reasons.
"""

from __future__ import annotations

import math

import grpc

from mesh.errors import MeshError

# gRPC code -> (HTTP status, OpenAI error type).
_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}

# ErrorInfo reasons with an OpenAI-specific code clients already branch on.
_CODES = {
    "API_KEY_MISSING": "missing_api_key",
    "API_KEY_INVALID": "invalid_api_key",
    "RATE_LIMITED": "rate_limit_exceeded",
    "PROMPT_TOO_LONG": "context_length_exceeded",
}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape. ``code`` is a stable lowercase string."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        grpc_code: str = "INVALID_ARGUMENT",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        # The code the metrics count it under, as for the same refusal on the gRPC path.
        self.grpc_code = grpc_code

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After takes whole seconds; the precise value rides along for clients that read it.
        return {
            "retry-after": str(max(1, math.ceil(self.retry_after_s))),
            "retry-after-ms": str(max(1, math.ceil(self.retry_after_s * 1000))),
        }


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_mesh_error(error: MeshError, *, param_names: dict[str, str] | None = None) -> ApiError:
    """The HTTP error for a core error; ``param_names`` maps core fields to request params."""
    status, kind = _BY_CODE.get(error.code, (500, "server_error"))
    param = None
    if error.field is not None:
        param = _param_for(error.field, param_names or {})
    return ApiError(
        status,
        error.message,
        type=kind,
        param=param,
        code=_CODES.get(error.reason, error.reason.lower()),
        retry_after_s=error.retry_after_s,
        grpc_code=error.code.name,
    )


def _param_for(field: str, names: dict[str, str]) -> str:
    for prefix, name in names.items():
        if field == prefix or field.startswith(prefix + "[") or field.startswith(prefix + "."):
            return name + field[len(prefix) :]
    return field


__all__ = ["ApiError", "bad_request", "from_mesh_error"]
