"""The OpenAI-compatible HTTP API (aiohttp), a second face of the same ``GatewayCore``.

Like the gRPC servicer, handlers only convert: JSON in, ``StartRequest`` and turn ids to the
core, outputs back as JSON or server-sent events. Authentication resolves the same key store
(``Authorization: Bearer``), and turns go through ``GatewayCore.start_turn``, so rate limits,
tenant checks, validation, queue limits and the log are the gRPC path's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from chat.common.v1 import conversation_pb2
from google.rpc import status_pb2

from mesh import metrics, tracing, turnlog
from mesh.auth import API_KEY_HEADER, KeyStore, Principal
from mesh.errors import MeshError, NotFound
from mesh.generation import FinishReason, GenerationOptions, TokenUsage
from mesh.lifecycle import AsyncStartStop
from mesh.log import TURN_EVENTS, TURN_REQUESTS, EventLog, LogError
from services.gateway.core import GatewayCore
from services.gateway.http import parsing
from services.gateway.http.conversations import ConversationIndex, Known, compose, history_key
from services.gateway.http.errors import ApiError, bad_request, from_mesh_error
from services.gateway.http.parsing import ChatMessage
from services.gateway.http.responses import (
    HEADER_EVENTS,
    ResponseState,
    closing_events,
    delta_event,
    header_events,
    parse_response_id,
    read_state,
    status_of,
    stored_state,
)
from services.gateway.model import (
    FinishedOut,
    Output,
    StartRequest,
    TokenOut,
    TokenRunOut,
    TurnError,
    TurnInfo,
)
from services.gateway.persister import PersisterClient
from services.gateway.settings import GatewaySettings
from services.gateway.turn_stream import TurnStream

log = logging.getLogger("services.gateway.http")

SERVICE = "gateway"
OWNER = "llm-mesh"
# How long a cancel waits for the agent to confirm before answering with the state so far.
CANCEL_WAIT_S = 5.0
# How long a client may take to send its body before 408 (a stalled upload must not hang).
BODY_TIMEOUT_S = 30.0
# Without MESH_GATEWAY_MODELS, how often the served models are read again from the log, and
# how many of each partition's latest records are read for them.
MODELS_REFRESH_S = 30.0
MODELS_SCAN_RECORDS = 2000

CHAT_FIELDS = (
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "user",
    "n",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
)
# Accepted and without effect here (documented in docs/openai.md).
CHAT_IGNORED = (
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
)
RESPONSE_FIELDS = (
    "model",
    "input",
    "instructions",
    "previous_response_id",
    "stream",
    "background",
    "store",
    "max_output_tokens",
    "temperature",
    "top_p",
    "metadata",
    "user",
    "tools",
    "tool_choice",
    "text",
    "reasoning",
    "include",
    "truncation",
    "top_logprobs",
    "conversation",
    "prompt",
    "max_tool_calls",
    "stream_options",
)
RESPONSE_IGNORED = ("service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier")
CHAT_ITEM_KEYS = frozenset({"role", "content", "name", "tool_calls", "refusal"})
RESPONSE_ITEM_KEYS = frozenset({"role", "content", "type", "id", "status"})

# Core field -> request parameter, for the core's validation errors.
CHAT_PARAMS = {
    "start.request_id": parsing.IDEMPOTENCY_HEADER,
    "start.text": "messages",
    "start.options.temperature": "temperature",
    "start.options.top_p": "top_p",
    "start.options.stop_sequences": "stop",
}
RESPONSE_PARAMS = {
    "start.request_id": parsing.IDEMPOTENCY_HEADER,
    "start.text": "input",
    "start.options.temperature": "temperature",
    "start.options.top_p": "top_p",
    "start.options.max_tokens": "max_output_tokens",
}


@dataclass(frozen=True, slots=True)
class Sampling:
    options: GenerationOptions
    # The parameter the client used for the reply length (named in a refusal of it).
    max_tokens_param: str


@dataclass
class ChatCall:
    model: str
    messages: list[ChatMessage]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


@dataclass
class ResponseCall:
    model: str
    input: list[ChatMessage]
    sampling: Sampling
    instructions: str | None = None
    previous_response_id: str | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
    max_output_tokens: int | None = None


# -- request bodies ---------------------------------------------------------------------------


def _sampling(body: dict[str, Any], length_params: tuple[str, ...]) -> Sampling:
    max_tokens, used = parsing.max_tokens(body, length_params)
    stop = parsing.stop_sequences(body) if "stop" in length_params or "stop" in body else ()
    return Sampling(
        GenerationOptions(
            max_tokens=max_tokens,
            temperature=parsing.optional_number(body, "temperature"),
            top_p=parsing.optional_number(body, "top_p"),
            stop_sequences=stop,
            seed=parsing.seed(body),
        ),
        used,
    )


def _refuse_unless(body: dict[str, Any], name: str, ok: Callable[[Any], bool], why: str) -> None:
    if name in body and body[name] is not None and not ok(body[name]):
        raise parsing.unsupported(name, why)


def parse_chat(body: dict[str, Any], served: tuple[str, ...]) -> ChatCall:
    parsing.check_fields(body, supported=CHAT_FIELDS, ignored=CHAT_IGNORED)
    model = parsing.model(body, served)
    n = parsing.optional_int(body, "n")
    if n is not None and n != 1:
        raise parsing.unsupported("n", f"n={n}: only one choice per request (n=1) is supported")
    _refuse_unless(body, "logprobs", lambda v: v is False, "logprobs are not supported")
    _refuse_unless(body, "top_logprobs", lambda v: False, "logprobs are not supported")
    _refuse_unless(body, "tools", lambda v: v == [], "tools are not implemented")
    _refuse_unless(body, "tool_choice", lambda v: v == "none", "tools are not implemented")
    _refuse_unless(body, "functions", lambda v: v == [], "functions are not implemented")
    _refuse_unless(body, "function_call", lambda v: v == "none", "functions are not implemented")
    _refuse_unless(
        body,
        "response_format",
        lambda v: v == {"type": "text"},
        "only {'type': 'text'} is supported",
    )
    for name in ("frequency_penalty", "presence_penalty"):
        _refuse_unless(body, name, lambda v: v == 0, "penalties are not supported")
    _refuse_unless(body, "logit_bias", lambda v: v == {}, "logit_bias is not supported")
    _refuse_unless(body, "modalities", lambda v: v == ["text"], "only text is supported")
    for name in ("audio", "prediction", "web_search_options", "reasoning_effort"):
        _refuse_unless(body, name, lambda v: False, "not supported by this server")
    parsing.user(body)
    messages = parsing.messages(
        body.get("messages"),
        "messages",
        part_types=("text",),
        item_keys=CHAT_ITEM_KEYS,
    )
    stream = parsing.optional_bool(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
        for key in options:
            if key != "include_usage":
                raise parsing.unsupported(f"stream_options.{key}", "not supported")
        include_usage = parsing.optional_bool(options, "include_usage")
    sampling = _sampling(body, ("max_completion_tokens", "max_tokens"))
    return ChatCall(model, messages, sampling, stream, include_usage)


def parse_response(body: dict[str, Any], served: tuple[str, ...]) -> ResponseCall:
    parsing.check_fields(body, supported=RESPONSE_FIELDS, ignored=RESPONSE_IGNORED)
    model = parsing.model(body, served)
    _refuse_unless(body, "tools", lambda v: v == [], "tools are not implemented")
    _refuse_unless(
        body, "tool_choice", lambda v: v in ("none", "auto"), "tools are not implemented"
    )
    _refuse_unless(
        body,
        "text",
        lambda v: v in ({}, {"format": {"type": "text"}}),
        "only text output ({'format': {'type': 'text'}}) is supported",
    )
    _refuse_unless(body, "include", lambda v: v == [], "include is not supported")
    _refuse_unless(body, "truncation", lambda v: v == "disabled", "only 'disabled' is supported")
    for name in ("reasoning", "top_logprobs", "conversation", "prompt", "max_tool_calls"):
        _refuse_unless(body, name, lambda v: False, "not supported by this server")
    _refuse_unless(body, "stream_options", lambda v: v == {}, "not supported by this server")
    parsing.user(body)
    raw_input = body.get("input")
    if raw_input is None:
        raise bad_request("input is required", "input", "missing_required_parameter")
    if isinstance(raw_input, str):
        inputs = [ChatMessage("user", parsing.text_value(raw_input, "input", allow_empty=False))]
    else:
        inputs = parsing.messages(
            raw_input,
            "input",
            part_types=("input_text", "output_text", "text"),
            item_keys=RESPONSE_ITEM_KEYS,
        )
        for index, item in enumerate(raw_input):
            if item.get("type", "message") != "message":
                raise parsing.unsupported(
                    f"input[{index}].type", "only message items are supported"
                )
    instructions = body.get("instructions")
    if instructions is not None:
        instructions = parsing.text_value(instructions, "instructions")
    previous = body.get("previous_response_id")
    if previous is not None:
        previous = parsing.text_value(previous, "previous_response_id", allow_empty=False)
    store = parsing.optional_bool(body, "store", default=True)
    background = parsing.optional_bool(body, "background")
    if background and not store:
        raise bad_request("background responses must be stored (store: true)", "background")
    sampling = _sampling(body, ("max_output_tokens",))
    return ResponseCall(
        model=model,
        input=inputs,
        sampling=sampling,
        instructions=instructions or None,
        previous_response_id=previous,
        stream=parsing.optional_bool(body, "stream"),
        background=background,
        store=store,
        metadata=parsing.metadata(body),
        max_output_tokens=sampling.options.max_tokens or None,
    )


# -- the API ----------------------------------------------------------------------------------


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def _error_text(status: bytes) -> str:
    try:
        return str(status_pb2.Status.FromString(status).message) or "generation failed"
    except Exception:  # noqa: BLE001 - an unreadable status still ends the turn as failed
        return "generation failed"


def _chat_finish(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def _usage_json(usage: TokenUsage | None) -> dict[str, int]:
    usage = usage or TokenUsage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class OpenAiApi:
    """The handlers; one instance per gateway process, sharing the gRPC servicer's core."""

    def __init__(
        self,
        core: GatewayCore,
        *,
        keys: KeyStore,
        persister: PersisterClient,
        settings: GatewaySettings,
    ) -> None:
        self.core = core
        self.keys = keys
        self.persister = persister
        self.settings = settings
        self.conversations = ConversationIndex()
        # Cancels of turns whose client went away: kept referenced until they are logged.
        self._background: set[asyncio.Task[None]] = set()
        self._discovered: tuple[str, ...] = ()
        self._models_checked = -MODELS_REFRESH_S

    # -- plumbing ------------------------------------------------------------------------------

    def principal(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        key: str | None = None
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(
                    401,
                    "the Authorization header must be 'Bearer <API key>'",
                    code="invalid_api_key",
                    grpc_code="UNAUTHENTICATED",
                )
            key = token.strip()
        else:
            key = request.headers.get(API_KEY_HEADER)
        if not key:
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <API key>'",
                code="missing_api_key",
                grpc_code="UNAUTHENTICATED",
            )
        try:
            return self.keys.resolve(key)
        except MeshError as error:
            raise from_mesh_error(error) from None

    async def body(self, request: web.Request) -> dict[str, Any]:
        limit = self.settings.http_max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(length, limit)
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(None, limit) from None
        except TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                code="request_timeout",
                grpc_code="DEADLINE_EXCEEDED",
            ) from None
        return parsing.parse_json_object(raw)

    def _cancel_soon(self, turn: TurnStream) -> None:
        """Log a cancel for ``turn`` even though the handler that owned it is going away."""

        async def cancel() -> None:
            try:
                await self.core.cancel(turn.info)
            except MeshError as error:
                log.warning("could not cancel turn %s: %s", turn.turn_id, error.message)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _start(
        self,
        principal: Principal,
        start: StartRequest,
        params: dict[str, str],
        length: str,
        request: web.Request,
    ) -> TurnStream:
        try:
            # The caller's W3C traceparent header, if it sent one, parents the turn's trace.
            parent = tracing.remote_context(request.headers.items())
            return await self.core.start_turn(principal, start, trace_parent=parent)
        except MeshError as error:
            raise from_mesh_error(
                error, param_names={**params, "start.options.max_tokens": length}
            ) from None

    @contextlib.asynccontextmanager
    async def _event_stream(
        self, request: web.Request, method: str, conversation_id: str = ""
    ) -> AsyncIterator[web.StreamResponse]:
        headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
        if conversation_id:
            headers["x-mesh-conversation-id"] = conversation_id
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        gauge = metrics.ACTIVE_STREAMS.labels(SERVICE, method)
        gauge.inc()
        try:
            yield response
        except MeshError as error:
            # The status line is gone: the stream ends with an error event instead (a gateway
            # stopping mid-turn says where to resume).
            await response.write(_sse(from_mesh_error(error).body()))
            await response.write_eof()
        finally:
            gauge.dec()

    # -- models --------------------------------------------------------------------------------

    def _model_json(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": OWNER}

    async def served_models(self) -> tuple[str, ...]:
        """``MESH_GATEWAY_MODELS``; unset, the models named by the latest finished turns."""
        if self.settings.model_ids:
            return self.settings.model_ids
        now = time.monotonic()
        if now >= self._models_checked + MODELS_REFRESH_S:
            self._models_checked = now
            try:
                self._discovered = await discover_models(self.core.log, self.core.partitions)
            except LogError as error:
                log.warning("could not read the models from the log: %s", error)
        return self._discovered

    async def list_models(self, request: web.Request) -> web.Response:
        self.principal(request)
        data = [self._model_json(model_id) for model_id in await self.served_models()]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        self.principal(request)
        model_id = request.match_info["model"]
        if model_id not in await self.served_models():
            raise ApiError(
                404,
                f"The model `{model_id[:256]}` does not exist",
                param="model",
                code="model_not_found",
                grpc_code="NOT_FOUND",
            )
        return web.json_response(self._model_json(model_id))

    # -- chat completions ----------------------------------------------------------------------

    async def _chat_plan(
        self, principal: Principal, messages: list[ChatMessage]
    ) -> tuple[str, str, int, str]:
        """(conversation id or "" for a new one, the turn's text, messages already stored, and
        the index key the conversation was taken from, "" if none)."""
        history = messages[:-1]
        if any(m.role != "system" for m in history):
            key = history_key(principal.tenant_id, history)
            known = self.conversations.take(key)
            if known is not None:
                if await self._unchanged(principal, known):
                    return known.conversation_id, messages[-1].text, known.stored_messages, key
        return "", compose(messages), 0, ""

    async def _unchanged(self, principal: Principal, known: Known) -> bool:
        try:
            conversation = await self.persister.get_conversation(
                principal.tenant_id, known.conversation_id, consistent=True
            )
        except MeshError:
            # Without the persister the conversation cannot be checked; a new one is safe.
            return False
        return len(conversation.messages) == known.stored_messages

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        principal = self.principal(request)
        body = await self.body(request)
        call = parse_chat(body, await self.served_models())
        request_id, digest = parsing.idempotency(
            request.headers.get(parsing.IDEMPOTENCY_HEADER), "chat.completions", body
        )
        with self.core.stream_slot(principal.tenant_id, principal):
            conversation_id, text, stored, key = await self._chat_plan(principal, call.messages)
            start = StartRequest(
                conversation_id,
                text,
                call.sampling.options,
                request_id=request_id,
                fingerprint=digest,
            )
            try:
                turn = await self._start(
                    principal, start, CHAT_PARAMS, call.sampling.max_tokens_param, request
                )
            except ApiError:
                if key:
                    # Nothing was logged: a retry (after a 429, say) may still continue it.
                    self.conversations.put(key, Known(conversation_id, stored))
                raise
            finished = False
            try:
                if call.stream:
                    result = await self._chat_stream(request, call, turn, stored)
                else:
                    result = await self._chat_whole(call, turn, stored)
                finished = True
            finally:
                if not finished and not turn.done and not request_id:
                    # The client went away (or its stream broke): stop generating for nobody.
                    # With an Idempotency-Key it may retry and attach: the agents' orphan
                    # grace period cancels the turn if it does not.
                    self._cancel_soon(turn)
                turn.close()
        return result

    async def _chat_whole(self, call: ChatCall, turn: TurnStream, stored: int) -> web.Response:
        texts: list[str] = []
        async for output in self.core.follow(turn):
            if type(output) is TokenOut:
                texts.append(output.text)
            elif isinstance(output, TurnError):
                raise ApiError(
                    500,
                    _error_text(output.status),
                    type="server_error",
                    code="generation_failed",
                    grpc_code="INTERNAL",
                )
            elif isinstance(output, FinishedOut):
                text = "".join(texts)
                self._after_chat(call, turn, text, stored, output)
                return web.json_response(
                    {
                        "id": "chatcmpl-" + turn.turn_id,
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": call.model,
                        "system_fingerprint": None,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": None,
                                "finish_reason": _chat_finish(output.finish_reason),
                            }
                        ],
                        "usage": _usage_json(output.usage),
                    },
                    headers={"x-mesh-conversation-id": turn.info.conversation_id},
                )
        raise ApiError(503, "the turn ended without finishing", type="server_error")

    def _after_chat(
        self, call: ChatCall, turn: TurnStream, text: str, stored: int, done: FinishedOut
    ) -> None:
        """Index the conversation as the client will send it next (docs/openai.md)."""
        if done.finish_reason in (
            FinishReason.STOP,
            FinishReason.STOP_SEQUENCE,
            FinishReason.LENGTH,
        ):
            after = [*call.messages, ChatMessage("assistant", text)]
            self.conversations.put(
                history_key(turn.info.tenant_id, after),
                Known(turn.info.conversation_id, stored + 2),
            )

    async def _chat_stream(
        self, request: web.Request, call: ChatCall, turn: TurnStream, stored: int
    ) -> web.StreamResponse:
        chunk_id = "chatcmpl-" + turn.turn_id
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": call.model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if call.include_usage:
                payload["usage"] = None
            return _sse(payload)

        texts: list[str] = []
        async with self._event_stream(
            request, "ChatCompletions", turn.info.conversation_id
        ) as response:
            await response.write(chunk({"role": "assistant", "content": ""}))
            async for output in self.core.follow(turn):
                if type(output) is TokenOut:
                    texts.append(output.text)
                    await response.write(chunk({"content": output.text}))
                elif type(output) is TokenRunOut:
                    texts.extend(output.texts)
                    await response.write(chunk({"content": "".join(output.texts)}))
                elif isinstance(output, TurnError):
                    error = ApiError(
                        500,
                        _error_text(output.status),
                        type="server_error",
                        code="generation_failed",
                    )
                    await response.write(_sse(error.body()))
                elif isinstance(output, FinishedOut):
                    self._after_chat(call, turn, "".join(texts), stored, output)
                    data = chunk({}, _chat_finish(output.finish_reason))
                    if call.include_usage:
                        usage = {
                            "id": chunk_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": call.model,
                            "system_fingerprint": None,
                            "choices": [],
                            "usage": _usage_json(output.usage),
                        }
                        data += _sse(usage)
                    await response.write(data + _sse("[DONE]"))
            await response.write_eof()
        return response

    # -- responses -----------------------------------------------------------------------------

    async def _find(self, principal: Principal, value: str, param: str | None = None) -> TurnInfo:
        """The TurnInfo of a stored response of the caller's tenant; 404 otherwise."""
        try:
            turn_id, stored = parse_response_id(value)
            if not stored:
                raise NotFound(
                    f"response {value} was created with store=false", reason="RESPONSE_NOT_STORED"
                )
            return await self.core.find_turn(principal, turn_id)
        except MeshError as error:
            api = from_mesh_error(error)
            if api.status in (400, 404):
                # A malformed id is an unknown one: ids are opaque to clients.
                api = ApiError(
                    404,
                    f"No response found with id '{value[:200]}'",
                    param=param,
                    code="not_found",
                    grpc_code="NOT_FOUND",
                )
            raise api from None

    async def _response_text(self, principal: Principal, call: ResponseCall) -> tuple[str, str]:
        """(conversation id or "" for a new one, the turn's text) of a new response."""
        instructions = [ChatMessage("system", call.instructions)] if call.instructions else []
        fresh = [*instructions, *call.input]
        if call.previous_response_id is None:
            return "", compose(fresh)
        info = await self._find(principal, call.previous_response_id, "previous_response_id")
        try:
            conversation = await self.persister.get_conversation(
                principal.tenant_id, info.conversation_id, consistent=True
            )
        except MeshError as error:
            raise from_mesh_error(error) from None
        messages = list(conversation.messages)
        last = max((i for i, m in enumerate(messages) if m.turn_id == info.turn_id), default=None)
        if (
            last is None
            or last == len(messages) - 1
            or all(m.turn_id == info.turn_id for m in messages[last:])
        ):
            # The previous response is the conversation's latest turn: continue it.
            return info.conversation_id, compose(fresh)
        # A branch from an earlier response: a new conversation with the history up to it.
        history = [
            ChatMessage("user" if m.role == conversation_pb2.ROLE_USER else "assistant", m.text)
            for m in messages[: last + 1]
        ]
        return "", compose([*instructions, *history, *call.input])

    async def create_response(self, request: web.Request) -> web.StreamResponse:
        principal = self.principal(request)
        body = await self.body(request)
        call = parse_response(body, await self.served_models())
        request_id, digest = parsing.idempotency(
            request.headers.get(parsing.IDEMPOTENCY_HEADER), "responses", body
        )
        with self.core.stream_slot(principal.tenant_id, principal):
            conversation_id, text = await self._response_text(principal, call)
            # A background response runs on with nobody attached (no orphan cancel).
            start = StartRequest(
                conversation_id,
                text,
                call.sampling.options,
                background=call.background,
                request_id=request_id,
                fingerprint=digest,
            )
            turn = await self._start(
                principal, start, RESPONSE_PARAMS, call.sampling.max_tokens_param, request
            )
            state = ResponseState(
                turn_id=turn.turn_id,
                model=call.model,
                created_at=int(time.time()),
                store=call.store,
                background=call.background,
                previous_response_id=call.previous_response_id,
                instructions=call.instructions,
                max_output_tokens=call.max_output_tokens,
                temperature=call.sampling.options.temperature,
                top_p=call.sampling.options.top_p,
                metadata=call.metadata,
            )
            finished = False
            try:
                if call.stream:
                    result: web.StreamResponse = await self._response_stream(
                        request, turn, state, after=-1, method="CreateResponse"
                    )
                elif call.background:
                    # The turn lives on the log: the agent generates it with nobody attached.
                    result = web.json_response(state.to_json())
                else:
                    await self._collect(turn, state)
                    result = web.json_response(state.to_json())
                finished = True
            finally:
                if not finished and not turn.done and not call.background and not request_id:
                    self._cancel_soon(turn)
                turn.close()
        return result

    async def _collect(self, turn: TurnStream, state: ResponseState) -> None:
        async for output in self.core.follow(turn):
            self._apply(state, output)

    def _apply(self, state: ResponseState, output: Output) -> None:
        if type(output) is TokenOut:
            state.texts.append(output.text)
            state.status = "in_progress"
        elif type(output) is TokenRunOut:
            state.texts.extend(output.texts)
            state.status = "in_progress"
        elif isinstance(output, TurnError):
            state.error_message = _error_text(output.status)
        elif isinstance(output, FinishedOut):
            state.status = status_of(output.finish_reason, True, False)
            state.usage = output.usage

    async def _response_stream(
        self,
        request: web.Request,
        turn: TurnStream,
        state: ResponseState,
        *,
        after: int,
        method: str,
    ) -> web.StreamResponse:
        """Events numbered as ``responses`` documents; only those after ``after`` are sent."""

        def event(number: int, payload: dict[str, Any]) -> bytes:
            payload = {**payload, "sequence_number": number}
            return f"event: {payload['type']}\n".encode() + _sse(payload)

        async with self._event_stream(request, method) as response:
            head = b"".join(
                event(number, payload)
                for number, payload in enumerate(header_events(state))
                if number > after
            )
            if head:
                await response.write(head)
            async for output in self.core.follow(turn):
                data = b""
                if type(output) is TokenOut:
                    state.texts.append(output.text)
                    number = HEADER_EVENTS - 1 + output.seq
                    if number > after:
                        data = event(number, delta_event(state, output.text))
                elif type(output) is TokenRunOut:
                    for offset, text in enumerate(output.texts):
                        state.texts.append(text)
                        number = HEADER_EVENTS - 1 + output.first_seq + offset
                        if number > after:
                            data += event(number, delta_event(state, text))
                elif isinstance(output, TurnError):
                    state.error_message = _error_text(output.status)
                elif isinstance(output, FinishedOut):
                    state.status = status_of(output.finish_reason, True, False)
                    state.usage = output.usage
                    first = HEADER_EVENTS + output.last_seq
                    data = b"".join(
                        event(first + i, payload)
                        for i, payload in enumerate(closing_events(state))
                        if first + i > after
                    )
                if data:
                    await response.write(data)
            await response.write_eof()
        return response

    async def _state(self, info: TurnInfo) -> ResponseState:
        state = ResponseState(
            turn_id=info.turn_id,
            model=next(iter(await self.served_models()), ""),
            created_at=0,
            background=True,
        )
        try:
            records = await self.core.log.read_range(
                TURN_REQUESTS, info.partition, info.request_offset, info.request_offset + 1
            )
            for record in records:
                requested = turnlog.decode_request(record.value)
                if requested.accepted_at_ns:
                    state.created_at = requested.accepted_at_ns // 1_000_000_000
                state.max_output_tokens = requested.options.max_tokens or None
                state.temperature = requested.options.temperature
                state.top_p = requested.options.top_p
            stored = await self.core.stored_turn(info)
            if stored is not None and stored.replayable and stored.finished is not None:
                # Finished and stored: its text and end from PostgreSQL, no read of its events.
                stored_state(stored.finished, stored.token_texts, state)
            else:
                await read_state(self.core.log, info, state)
        except (LogError, turnlog.UndecodableRecord) as error:
            log.warning("reading response %s from the turn log failed: %s", info.turn_id, error)
            raise ApiError(
                503,
                "the turn log is unavailable; retry shortly",
                type="server_error",
                retry_after_s=1.0,
                grpc_code="UNAVAILABLE",
            ) from None
        return state

    async def get_response(self, request: web.Request) -> web.StreamResponse:
        principal = self.principal(request)
        stream = _query_bool(request, "stream")
        after = _query_int(request, "starting_after")
        for name in request.query:
            if name not in ("stream", "starting_after", "include", "include[]"):
                raise ApiError(
                    400,
                    f"Unrecognized query parameter: {name}",
                    param=name,
                    code="unrecognized_request_argument",
                )
        if after is not None and not stream:
            raise bad_request("starting_after needs stream=true", "starting_after")
        info = await self._find(principal, request.match_info["response_id"])
        if not stream:
            return web.json_response((await self._state(info)).to_json())
        with self.core.stream_slot(principal.tenant_id, principal):
            try:
                # From the turn's first token: the closing events carry the whole text.
                turn = await self.core.resume_turn(principal, info.turn_id, 0)
            except MeshError as error:
                raise from_mesh_error(error) from None
            state = ResponseState(
                turn_id=info.turn_id,
                model=next(iter(await self.served_models()), ""),
                created_at=int(time.time()),
                background=True,
                status="in_progress",
            )
            try:
                return await self._response_stream(
                    request,
                    turn,
                    state,
                    after=-1 if after is None else after,
                    method="GetResponse",
                )
            finally:
                turn.close()

    async def cancel_response(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        info = await self._find(principal, request.match_info["response_id"])
        try:
            await self.core.cancel(info)
            turn = await self.core.resume_turn(principal, info.turn_id, 0)
        except MeshError as error:
            raise from_mesh_error(error) from None
        deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_S
        try:
            async with asyncio.timeout(CANCEL_WAIT_S):
                async for output in self.core.follow(turn):
                    if isinstance(output, FinishedOut):
                        break
        except TimeoutError:
            pass
        finally:
            turn.close()
        state = await self._state(info)
        # The stream ends at the cancel when it saw no TurnStarted before it, while an agent may
        # have just started the turn: its TurnFinished follows within moments. Read until it does.
        while state.status in ("queued", "in_progress"):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
            state = await self._state(info)
        return web.json_response(state.to_json())


def _query_bool(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None:
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise bad_request(f"{name} must be true or false", name, "invalid_type")


def _query_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise bad_request(f"{name} must be a non-negative integer", name, "invalid_type")
    return int(value)


def _too_large(length: int | None, limit: int) -> ApiError:
    size = f"{length} bytes" if length is not None else "more than the limit"
    return ApiError(
        413,
        f"the request body is {size}; the limit is {limit} bytes",
        code="request_too_large",
    )


async def discover_models(log_: EventLog, partitions: int) -> tuple[str, ...]:
    """The models named by the latest finished turns on the event log (agents name theirs)."""
    found: dict[str, None] = {}
    for partition in range(partitions):
        end = await log_.end_offset(TURN_EVENTS, partition)
        start = max(0, end - MODELS_SCAN_RECORDS)
        for record in await log_.read_range(TURN_EVENTS, partition, start, end):
            try:
                events = turnlog.decode_events(record.value)
            except turnlog.UndecodableRecord:
                continue
            for event in events:
                if isinstance(event, turnlog.TurnFinished) and event.model:
                    found[event.model] = None
    return tuple(sorted(found))


# -- assembly ---------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Route -> the method name metrics count it under, as the gRPC path's ``method`` label does.
ROUTES: Sequence[tuple[str, str, str, str]] = (
    ("GET", "/v1/models", "list_models", "ListModels"),
    ("GET", "/v1/models/{model}", "get_model", "GetModel"),
    ("POST", "/v1/chat/completions", "chat_completions", "ChatCompletions"),
    ("POST", "/v1/responses", "create_response", "CreateResponse"),
    ("GET", "/v1/responses/{response_id}", "get_response", "GetResponse"),
    ("POST", "/v1/responses/{response_id}/cancel", "cancel_response", "CancelResponse"),
)


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers())


def _from_http(error: web.HTTPException) -> ApiError:
    if error.status == 404:
        return ApiError(404, "Unknown request URL", code="unknown_url", grpc_code="NOT_FOUND")
    if error.status == 405:
        return ApiError(405, f"Method not allowed ({error.reason})", code="method_not_allowed")
    if error.status == 413:
        return ApiError(413, "the request body is over the limit", code="request_too_large")
    return ApiError(error.status, error.reason, code=error.reason.lower().replace(" ", "_"))


def build_app(api: OpenAiApi) -> web.Application:
    """The aiohttp application: the routes, errors in OpenAI's shape, metrics, drain."""
    names: dict[str, str] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        method = names.get(route.canonical, "Unknown") if route is not None else "Unknown"
        code = "OK"
        try:
            if request.path == "/healthz":
                return await handler(request)
            if api.core.draining:
                raise ApiError(
                    503,
                    "this gateway is shutting down; retry on another gateway",
                    type="server_error",
                    code="draining",
                    retry_after_s=1.0,
                    grpc_code="UNAVAILABLE",
                )
            return await handler(request)
        except ApiError as error:
            code = error.grpc_code
            return _error_response(error)
        except MeshError as error:
            code = error.code.name
            return _error_response(from_mesh_error(error))
        except web.HTTPException as error:
            api_error = _from_http(error)
            code = api_error.grpc_code
            return _error_response(api_error)
        except (ConnectionResetError, asyncio.CancelledError):
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error_response(
                ApiError(500, "internal error; see the gateway's log", type="server_error")
            )
        finally:
            if request.path != "/healthz":
                metrics.RPCS_HANDLED.labels(SERVICE, method, code).inc()
                if code != "OK":
                    metrics.RPC_ERRORS.labels(SERVICE, method, code).inc()

    async def healthz(request: web.Request) -> web.Response:
        if api.core.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "serving"})

    # The body limit is checked by the handlers (to answer 413 in OpenAI's shape); aiohttp's own
    # cap is a backstop just above it.
    app = web.Application(
        middlewares=[middleware], client_max_size=api.settings.http_max_body_bytes + 1
    )
    app.router.add_get("/healthz", healthz)
    for verb, path, attribute, name in ROUTES:
        resource = app.router.add_resource(path)
        resource.add_route(verb, getattr(api, attribute))
        names[resource.canonical] = name
    return app


class HttpListener(AsyncStartStop):
    """Serves ``build_app(api)`` on ``host:port`` (0 picks a free port; see ``port``), over
    TLS with ``ssl_context``."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        grace_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._app = app
        self._ssl_context = ssl_context
        self._grace_s = grace_s
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, which cancels
        # the turn it was waiting for (a non-background one).
        runner = web.AppRunner(
            self._app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self._grace_s,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


__all__ = ["HttpListener", "OpenAiApi", "build_app", "parse_chat", "parse_response"]
