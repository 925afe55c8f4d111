"""Request bodies to plain values: JSON types, known fields and messages, checked by name.

Only what the gRPC path cannot see is checked here (JSON syntax and types, unknown or
unsupported fields, message shapes, text the log could not carry). Ranges (``max_tokens``,
``temperature``, ...) and lengths are the core's ``validate_start``, as for gRPC clients.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.gateway.http.errors import ApiError, bad_request
from services.gateway.validation import MAX_ID_CHARS

MAX_MESSAGES = 1000
MAX_MODEL_CHARS = 256
MAX_USER_CHARS = 256
MAX_METADATA_KEYS = 16
IDEMPOTENCY_HEADER = "Idempotency-Key"
# C0 controls other than tab, newline and carriage return, and DEL: never part of chat text,
# and NUL in particular cannot be stored in PostgreSQL text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a request: ``role`` is system, user or assistant (developer -> system)."""

    role: str
    text: str


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", None, "empty_body")
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8", None, "invalid_json") from None
    except (ValueError, RecursionError) as error:
        raise bad_request(
            f"the request body is not valid JSON ({error})", None, "invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise bad_request(
            f"the request body must be a JSON object, not {_kind(value)}", None, "invalid_json"
        )
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def check_fields(
    body: Mapping[str, Any],
    *,
    supported: Iterable[str],
    ignored: Iterable[str] = (),
) -> None:
    """400 for a field this endpoint does not know at all (OpenAI does the same)."""
    known = set(supported) | set(ignored)
    for name in body:
        if name not in known:
            raise ApiError(
                400,
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unrecognized_request_argument",
            )


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def text_value(value: object, param: str, *, allow_empty: bool = True) -> str:
    """A string the log and PostgreSQL can carry: no lone surrogates, NUL or other controls."""
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a string, not {_kind(value)}", param, "invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(
            f"{param} holds an unpaired UTF-16 surrogate", param, "invalid_value"
        ) from None
    match = _CONTROL.search(value)
    if match is not None:
        raise bad_request(
            f"{param} contains the control character U+{ord(match.group()):04X}",
            param,
            "invalid_value",
        )
    if not allow_empty and not value.strip():
        raise bad_request(f"{param} is empty", param, "invalid_value")
    return value


def optional_bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, not {_kind(value)}", name, "invalid_type")
    return value


def optional_number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, not {_kind(value)}", name, "invalid_type")
    return float(value)


def optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, not {_kind(value)}", name, "invalid_type")
    return value


def max_tokens(body: Mapping[str, Any], names: tuple[str, ...]) -> tuple[int, str]:
    """The reply length the client asked for (0: the agent's default) and the param it used."""
    found: list[tuple[str, int]] = []
    for name in names:
        value = optional_int(body, name)
        if value is not None:
            if value < 1:
                raise bad_request(f"{name}={value} must be at least 1", name, "invalid_value")
            found.append((name, value))
    if len({value for _, value in found}) > 1:
        raise bad_request(
            f"{' and '.join(name for name, _ in found)} disagree; send one of them",
            found[-1][0],
            "invalid_value",
        )
    if not found:
        return 0, names[0]
    return found[0][1], found[0][0]


def seed(body: Mapping[str, Any]) -> int | None:
    value = optional_int(body, "seed")
    if value is None:
        return None
    if not -(2**63) <= value < 2**63:
        raise bad_request("seed must fit in 64 bits", "seed", "invalid_value")
    # The log carries a 32-bit seed; equal seeds still give equal samples.
    return value & 0xFFFFFFFF


def stop_sequences(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (text_value(value, "stop"),)
    if isinstance(value, list):
        return tuple(text_value(item, f"stop[{i}]") for i, item in enumerate(value))
    raise bad_request(
        f"stop must be a string or an array of strings, not {_kind(value)}", "stop", "invalid_type"
    )


def model(body: Mapping[str, Any], served: tuple[str, ...]) -> str:
    """The requested model; 404 when this mesh does not serve it (unless no list is set)."""
    if "model" not in body:
        raise bad_request("model is required", "model", "missing_required_parameter")
    value = text_value(body["model"], "model", allow_empty=False)
    if len(value) > MAX_MODEL_CHARS:
        raise bad_request(f"model is longer than {MAX_MODEL_CHARS} characters", "model")
    if served and value not in served:
        raise ApiError(
            404,
            f"The model `{value}` does not exist; GET /v1/models lists the models served",
            param="model",
            code="model_not_found",
            grpc_code="NOT_FOUND",
        )
    return value


def user(body: Mapping[str, Any]) -> str:
    value = body.get("user")
    if value is None:
        return ""
    text = text_value(value, "user")
    if len(text) > MAX_USER_CHARS:
        raise bad_request(f"user is longer than {MAX_USER_CHARS} characters", "user")
    return text


def metadata(body: Mapping[str, Any]) -> dict[str, str]:
    value = body.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise bad_request(
            f"metadata must be an object of at most {MAX_METADATA_KEYS} string values",
            "metadata",
            "invalid_type",
        )
    return {
        text_value(k, "metadata"): text_value(v, f"metadata.{k}")[:512] for k, v in value.items()
    }


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def message_content(value: object, param: str, part_types: tuple[str, ...]) -> str:
    """A message's text: a string, or an array of text parts (joined)."""
    if isinstance(value, str):
        return text_value(value, param)
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            where = f"{param}[{index}]"
            if not isinstance(part, dict):
                raise bad_request(f"{where} must be an object", where, "invalid_type")
            kind = part.get("type")
            if kind not in part_types:
                raise unsupported(
                    f"{where}.type",
                    f"content parts of type {kind!r} are not supported; only "
                    f"{', '.join(part_types)}",
                )
            texts.append(text_value(part.get("text"), f"{where}.text"))
        return "".join(texts)
    raise bad_request(
        f"{param} must be a string or an array of content parts, not {_kind(value)}",
        param,
        "invalid_type",
    )


def messages(
    value: object,
    param: str,
    *,
    part_types: tuple[str, ...],
    item_keys: frozenset[str],
) -> list[ChatMessage]:
    """Chat messages; the last one must be the user's (that is the turn the mesh runs)."""
    if not isinstance(value, list):
        raise bad_request(f"{param} must be an array of messages", param, "invalid_type")
    if not value:
        raise bad_request(f"{param} is empty; send at least one user message", param)
    if len(value) > MAX_MESSAGES:
        raise bad_request(f"{param} has more than {MAX_MESSAGES} messages", param)
    out: list[ChatMessage] = []
    for index, item in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where, "invalid_type")
        for key in item:
            if key not in item_keys:
                raise unsupported(f"{where}.{key}", "this message field is not supported")
        role = item.get("role")
        if role not in _ROLES:
            raise unsupported(
                f"{where}.role",
                f"role {role!r} is not supported (system, developer, user or assistant; "
                "tools are not implemented)",
            )
        if item.get("tool_calls"):
            raise unsupported(f"{where}.tool_calls", "tools are not implemented")
        if "content" not in item or item["content"] is None:
            raise bad_request(f"{where}.content is required", f"{where}.content")
        out.append(
            ChatMessage(
                _ROLES[role], message_content(item["content"], f"{where}.content", part_types)
            )
        )
    if out[-1].role != "user":
        raise bad_request(
            f"the last message of {param} must be the user's (role user)",
            f"{param}[{len(out) - 1}].role",
        )
    if not out[-1].text.strip():
        raise bad_request(
            f"{param}[{len(out) - 1}].content is empty", f"{param}[{len(out) - 1}].content"
        )
    return out


def idempotency(header: str | None, route: str, body: Mapping[str, Any]) -> tuple[str, str]:
    """The request id an ``Idempotency-Key`` header asks for, and the digest a retry must match.

    The digest is of the route and the parsed body (key order and spacing aside), not of the
    start the gateway derives from it: another gateway may map the same messages onto a
    conversation differently, and the retry is still the same request.
    """
    if header is None or header == "":
        return "", ""
    if len(header) > MAX_ID_CHARS or not header.isprintable() or header != header.strip():
        raise bad_request(
            f"the {IDEMPOTENCY_HEADER} header must be at most {MAX_ID_CHARS} printable "
            "characters without surrounding spaces",
            IDEMPOTENCY_HEADER,
            "invalid_idempotency_key",
        )
    canonical = json.dumps([route, body], sort_keys=True, separators=(",", ":"))
    return header, hashlib.sha256(canonical.encode()).hexdigest()


__all__ = [
    "IDEMPOTENCY_HEADER",
    "ChatMessage",
    "check_fields",
    "idempotency",
    "max_tokens",
    "message_content",
    "messages",
    "metadata",
    "model",
    "optional_bool",
    "optional_int",
    "optional_number",
    "parse_json_object",
    "seed",
    "stop_sequences",
    "text_value",
    "unsupported",
    "user",
]
