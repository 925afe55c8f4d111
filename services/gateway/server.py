"""The gateway's gRPC face: proto <-> core values, server assembly, and ``main``."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2, gateway_service_pb2_grpc
from google.rpc import status_pb2
from grpc import aio

from mesh import tracing
from mesh.auth import AuthInterceptor, KeyFileError, KeyStore, Principal, current_principal
from mesh.codec import (
    finish_reason_to_proto,
    options_from_proto,
    timings_to_proto,
    usage_to_proto,
)
from mesh.errors import InvalidArgument, to_status_proto
from mesh.log import open_log
from mesh.paging import validate_page_size
from mesh.server import (
    ServiceDeps,
    build_service_server,
    run_main,
    serve_until_signalled,
    start_metrics,
)
from mesh.settings import SettingsError
from mesh.tls import CertificateError, edge_server_credentials
from services.gateway.context_check import ContextCheck
from services.gateway.core import GatewayCore
from services.gateway.http.app import HttpListener, OpenAiApi, build_app
from services.gateway.model import (
    Accepted,
    CancelFrame,
    CreditFrame,
    EmptyFrame,
    FinishedOut,
    Frame,
    FrameError,
    Output,
    ResumeFrame,
    StartFrame,
    StartRequest,
    TokenOut,
    TokenRunOut,
    TurnError,
)
from services.gateway.persister import PersisterClient
from services.gateway.readiness import gateway_readiness
from services.gateway.settings import GatewaySettings
from services.gateway.turn_stream import TurnStream
from services.gateway.validation import validate_conversation_id

log = logging.getLogger("services.gateway")

SERVICE_NAME: str = gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
METRICS_SERVICE = "gateway"

Context = aio.ServicerContext[Any, Any]


@dataclass
class GatewayDeps(ServiceDeps):
    """What the server runs on; the caller starts and stops them."""

    core: GatewayCore
    persister: PersisterClient
    keys: KeyStore


# -- proto -> core ----------------------------------------------------------------------------


def start_from_proto(message: gateway_pb2.StartTurn) -> StartRequest:
    return StartRequest(
        conversation_id=message.conversation_id,
        text=message.text,
        options=options_from_proto(message.options),
        request_id=message.request_id,
        coalesce_tokens=message.coalesce_tokens,
        background=message.background,
    )


def frame_from_proto(request: gateway_pb2.ChatRequest) -> Frame:
    kind = request.WhichOneof("frame")
    if kind == "credit":
        return CreditFrame(request.credit.tokens)
    if kind == "start":
        return StartFrame(start_from_proto(request.start))
    if kind == "cancel":
        return CancelFrame(request.cancel.turn_id)
    if kind == "resume":
        return ResumeFrame(
            request.resume.turn_id, request.resume.after_seq, request.resume.coalesce_tokens
        )
    return EmptyFrame()


# -- core -> proto ----------------------------------------------------------------------------


def accepted_to_proto(output: Accepted) -> gateway_pb2.TurnAccepted:
    return gateway_pb2.TurnAccepted(
        turn_id=output.turn_id,
        conversation_id=output.conversation_id,
        queue_position=output.queue_position,
    )


def finished_to_proto(output: FinishedOut) -> gateway_pb2.TurnFinished:
    message = gateway_pb2.TurnFinished(
        turn_id=output.turn_id,
        finish_reason=finish_reason_to_proto(output.finish_reason),
        last_seq=output.last_seq,
    )
    if output.usage is not None:
        message.usage.CopyFrom(usage_to_proto(output.usage))
    if output.timings is not None:
        message.timings.CopyFrom(timings_to_proto(output.timings))
    for source, reason in output.context_skipped:
        message.context_skipped.add(source=source, reason=reason)
    if output.error_status:
        message.error.ParseFromString(output.error_status)
    return message


def token_run_to_proto(output: TokenRunOut) -> gateway_pb2.TokenRun:
    return gateway_pb2.TokenRun(
        turn_id=output.turn_id, first_seq=output.first_seq, texts=output.texts
    )


def chat_response(output: Output) -> gateway_pb2.ChatResponse | None:
    """The Chat frame: the streaming frames, plus errors (only Chat has an error frame)."""
    response: gateway_pb2.ChatResponse | None = _stream_frame(output, gateway_pb2.ChatResponse)
    if response is not None:
        return response
    if isinstance(output, FrameError):
        return gateway_pb2.ChatResponse(
            error=gateway_pb2.ChatError(
                status=to_status_proto(output.error), turn_id=output.turn_id
            )
        )
    if isinstance(output, TurnError):
        return gateway_pb2.ChatResponse(
            error=gateway_pb2.ChatError(
                status=status_pb2.Status.FromString(output.status), turn_id=output.turn_id
            )
        )
    return None


def _stream_frame(output: Output, cls: Any) -> Any:
    """A ChatResponse, StreamTurnResponse or ResumeTurnResponse frame (their oneofs share these
    names); None for Chat-only outputs."""
    if type(output) is TokenOut:
        return cls(
            token=gateway_pb2.Token(turn_id=output.turn_id, seq=output.seq, text=output.text)
        )
    if type(output) is TokenRunOut:
        return cls(token_run=token_run_to_proto(output))
    if isinstance(output, Accepted):
        return cls(accepted=accepted_to_proto(output))
    if isinstance(output, FinishedOut):
        return cls(finished=finished_to_proto(output))
    # The agent's error status has no frame here; FINISH_REASON_ERROR tells the client.
    return None


# -- the servicer -----------------------------------------------------------------------------


class GatewayServicer(gateway_service_pb2_grpc.GatewayServiceServicer):
    """Thin handlers over ``GatewayCore``; errors are ``MeshError``s mapped by the interceptor."""

    def __init__(
        self, core: GatewayCore, persister: PersisterClient, keys: KeyStore | None = None
    ) -> None:
        self._core = core
        self._persister = persister
        # Chat streams re-check their key on every frame, so revocation reaches open streams.
        self._verify = keys.verify if keys is not None else None

    async def Chat(
        self, request_iterator: AsyncIterator[gateway_pb2.ChatRequest], context: Context
    ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        principal = current_principal()
        with self._core.stream_slot(principal.tenant_id, principal):

            async def frames() -> AsyncIterator[Frame]:
                async for request in request_iterator:
                    yield frame_from_proto(request)

            session = self._core.chat_session(
                principal,
                verify=self._verify,
                trace_parent=tracing.remote_context(context.invocation_metadata()),
            )
            async for output in session.run(frames()):
                response = chat_response(output)
                if response is not None:
                    yield response

    async def StreamTurn(
        self, request: gateway_pb2.StreamTurnRequest, context: Context
    ) -> AsyncIterator[gateway_pb2.StreamTurnResponse]:
        principal = current_principal()

        async def start() -> TurnStream:
            if not request.HasField("start"):
                raise InvalidArgument(
                    "StreamTurnRequest.start is required", reason="START_MISSING", field="start"
                )
            return await self._core.start_turn(
                principal,
                start_from_proto(request.start),
                trace_parent=tracing.remote_context(context.invocation_metadata()),
            )

        async for frame in self._frames(principal, start, gateway_pb2.StreamTurnResponse):
            yield frame

    async def ResumeTurn(
        self, request: gateway_pb2.ResumeTurnRequest, context: Context
    ) -> AsyncIterator[gateway_pb2.ResumeTurnResponse]:
        principal = current_principal()

        async def resume() -> TurnStream:
            return await self._core.resume_turn(
                principal, request.turn_id, request.after_seq, coalesce=request.coalesce_tokens
            )

        async for frame in self._frames(principal, resume, gateway_pb2.ResumeTurnResponse):
            yield frame

    async def _frames(
        self, principal: Principal, open_turn: Callable[[], Awaitable[TurnStream]], cls: Any
    ) -> AsyncIterator[Any]:
        """A server-streaming turn's frames, in one of the gateway's (and the tenant's) stream
        slots, taken before the turn opens; the turn is closed however the call ends."""
        with self._core.stream_slot(principal.tenant_id, principal):
            turn = await open_turn()
            try:
                async for output in self._core.follow(turn):
                    frame = _stream_frame(output, cls)
                    if frame is not None:
                        yield frame
            finally:
                turn.close()

    async def CancelTurn(
        self, request: gateway_pb2.CancelTurnRequest, context: Context
    ) -> gateway_pb2.CancelTurnResponse:
        turn_id = await self._core.cancel_turn(current_principal(), request.turn_id)
        return gateway_pb2.CancelTurnResponse(turn_id=turn_id)

    async def GetConversation(
        self, request: gateway_pb2.GetConversationRequest, context: Context
    ) -> gateway_pb2.GetConversationResponse:
        principal = current_principal()
        validate_conversation_id(request.conversation_id)
        self._core.require_persister()
        conversation = await self._persister.get_conversation(
            principal.tenant_id, request.conversation_id, consistent=True
        )
        return gateway_pb2.GetConversationResponse(conversation=conversation)

    async def ListConversations(
        self, request: gateway_pb2.ListConversationsRequest, context: Context
    ) -> gateway_pb2.ListConversationsResponse:
        principal = current_principal()
        validate_page_size(request.page_size)
        self._core.require_persister()
        conversations, token = await self._persister.list_conversations(
            principal.tenant_id, request.page_size, request.page_token
        )
        return gateway_pb2.ListConversationsResponse(
            conversations=conversations, next_page_token=token
        )

    async def DeleteConversation(
        self, request: gateway_pb2.DeleteConversationRequest, context: Context
    ) -> gateway_pb2.DeleteConversationResponse:
        principal = current_principal()
        validate_conversation_id(request.conversation_id)
        # Forgotten first: a turn started here from now on asks the persister again.
        self._core.forget_conversation(principal.tenant_id, request.conversation_id)
        reply = await self._persister.delete_conversation(
            principal.tenant_id, request.conversation_id
        )
        return gateway_pb2.DeleteConversationResponse(
            messages_deleted=reply.counts.messages, already_deleted=reply.already_deleted
        )


# -- assembly ---------------------------------------------------------------------------------


def build_server(settings: GatewaySettings, deps: GatewayDeps) -> tuple[aio.Server, int]:
    """The gateway's gRPC server (not started), bound to ``settings.host:port``."""
    server, port, deps.health = build_service_server(
        METRICS_SERVICE,
        SERVICE_NAME,
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server,
        GatewayServicer(deps.core, deps.persister, deps.keys),
        host=settings.host,
        port=settings.port,
        extra_interceptors=[AuthInterceptor(deps.keys)],
        edge_credentials=edge_credentials(settings),
    )
    return server, port


def edge_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS of the public gRPC port, from ``MESH_GATEWAY_TLS_CERT``/``_KEY``; None: plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return edge_server_credentials(settings.tls_cert, settings.tls_key)


def edge_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The same certificate for the HTTP port; None: plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def serve(settings: GatewaySettings) -> None:
    """Open the log and the persister channel, serve until SIGTERM/SIGINT, then drain."""
    keys = KeyStore(settings.api_keys_file)
    if len(keys) == 0:
        log.warning(
            "no API keys in %s: every call will be UNAUTHENTICATED until keys are added "
            "(mesh keys create --tenant NAME)",
            settings.api_keys_file,
        )
    metrics_port = start_metrics(settings.metrics_port, settings.host)
    if metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", settings.host, metrics_port)
    async with AsyncExitStack() as stack:
        watcher = asyncio.get_running_loop().create_task(keys.watch(), name="gateway-keys-watch")
        stack.callback(watcher.cancel)
        event_log = await stack.enter_async_context(open_log(settings.log))
        persister = await stack.enter_async_context(
            PersisterClient(
                settings.persister_addr,
                timeout_s=settings.persister_timeout_s,
                tls=settings.tls,
                lookup_timeout_s=settings.turn_lookup_timeout_s,
            )
        )
        gate = gateway_readiness(
            event_log,
            persister,
            settings.health,
            require_agent=settings.require_agent,
            require_persister=settings.require_persister,
        )
        context = None
        if settings.context_model_paths:
            context = await stack.enter_async_context(
                ContextCheck(
                    settings.context_model_paths,
                    n_ctx=settings.context_tokens,
                    system_prompt=settings.context_system_prompt,
                )
            )
        core = await stack.enter_async_context(
            GatewayCore(
                settings,
                log=event_log,
                conversations=persister,
                gate=gate,
                context=context,
                turns=persister,
                request_claims=persister,
            )
        )
        # After the core: its start creates the topics the log probe writes to.
        await stack.enter_async_context(gate.readiness)
        deps = GatewayDeps(core=core, persister=persister, keys=keys)
        server, port = build_server(settings, deps)
        assert deps.health is not None
        if settings.http_port >= 0:
            api = OpenAiApi(core, keys=keys, persister=persister, settings=settings)
            http = await stack.enter_async_context(
                HttpListener(
                    build_app(api),
                    host=settings.host,
                    port=settings.http_port,
                    grace_s=settings.grace_s,
                    ssl_context=edge_ssl_context(settings),
                )
            )
            log.info(
                "gateway http listening on %s://%s:%d",
                "https" if settings.tls_cert else "http",
                settings.host,
                http.port,
            )
        # Supervisors and tests read this line to find the port when they asked for port 0.
        log.info(
            "gateway listening on %s:%d (%s)",
            settings.host,
            port,
            "TLS" if settings.tls_cert else "PLAINTEXT: loopback only, no TLS configured",
        )

        async def drain() -> None:
            # New turns go elsewhere; open streams get the grace period, then clients resume.
            core.begin_drain()
            log.info("draining %d open streams", core.open_streams)

        await serve_until_signalled(
            server,
            deps.health,
            [SERVICE_NAME],
            grace_s=settings.grace_s,
            on_drain=drain,
            readiness=gate.readiness,
        )
    log.info("gateway stopped")


def _load_settings() -> GatewaySettings:
    settings = GatewaySettings.from_env(os.environ)
    KeyStore(settings.api_keys_file)  # a broken key file is a bad configuration too
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.gateway``; configuration comes from the environment."""
    del argv  # no flags: the environment is the single source of configuration
    return run_main(
        "gateway",
        _load_settings,
        serve,
        config_errors=(SettingsError, KeyFileError, CertificateError),
    )


__all__ = [
    "SERVICE_NAME",
    "GatewayDeps",
    "GatewayServicer",
    "build_server",
    "main",
    "serve",
]
