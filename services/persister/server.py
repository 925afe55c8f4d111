"""The gRPC face of the persister: proto <-> plain values around ``core.Persister``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from chat.common.v1 import conversation_pb2
from chat.events.v1 import events_pb2
from chat.persister.v1 import persister_pb2, persister_service_pb2, persister_service_pb2_grpc
from google.protobuf import timestamp_pb2
from grpc import aio

from mesh.errors import Unavailable
from mesh.server import ServiceDeps, build_service_server
from mesh.turn_ids import parse_turn_id
from services.persister.claims import ClaimStore
from services.persister.core import Persister
from services.persister.model import Conversation, Message
from services.persister.settings import PersisterSettings

SERVICE_NAME: str = persister_service_pb2.DESCRIPTOR.services_by_name["PersisterService"].full_name

Context = aio.ServicerContext[Any, Any]


@dataclass
class PersisterDeps(ServiceDeps):
    """What the server runs on. ``persister`` is started and stopped by the caller."""

    persister: Persister
    # Request-id claims (ClaimRequestId); None answers UNAVAILABLE.
    claims: ClaimStore | None = None


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _message(message: Message) -> conversation_pb2.Message:
    return conversation_pb2.Message(
        turn_id=message.turn_id,
        role=int(message.role),  # type: ignore[arg-type]
        text=message.text,
        create_time=_timestamp(message.created_at),
        finish_reason=message.finish_reason,  # type: ignore[arg-type]
    )


def _conversation(conversation: Conversation) -> conversation_pb2.Conversation:
    return conversation_pb2.Conversation(
        conversation_id=conversation.conversation_id,
        title=conversation.title,
        create_time=_timestamp(conversation.created_at),
        update_time=_timestamp(conversation.updated_at),
        messages=[_message(m) for m in conversation.messages],
    )


class PersisterServicer(persister_service_pb2_grpc.PersisterServiceServicer):
    """Thin handlers; validation and errors come from the core (mapped by the interceptor)."""

    def __init__(self, persister: Persister, claims: ClaimStore | None = None) -> None:
        self._persister = persister
        self._claims = claims

    async def GetConversation(
        self, request: persister_pb2.GetConversationRequest, context: Context
    ) -> persister_pb2.GetConversationResponse:
        before = (
            parse_turn_id(request.consistent_before_turn_id, field="consistent_before_turn_id")
            if request.consistent_before_turn_id
            else None
        )
        conversation = await self._persister.get_conversation(
            request.tenant_id,
            request.conversation_id,
            consistent=request.consistent,
            before=before,
            last_messages=request.last_messages,
        )
        return persister_pb2.GetConversationResponse(conversation=_conversation(conversation))

    async def ListConversations(
        self, request: persister_pb2.ListConversationsRequest, context: Context
    ) -> persister_pb2.ListConversationsResponse:
        page = await self._persister.list_conversations(
            request.tenant_id, request.page_size, request.page_token
        )
        return persister_pb2.ListConversationsResponse(
            conversations=[_conversation(c) for c in page.conversations],
            next_page_token=page.next_page_token,
        )

    async def ListMessages(
        self, request: persister_pb2.ListMessagesRequest, context: Context
    ) -> AsyncIterator[persister_pb2.ListMessagesResponse]:
        async for message in self._persister.list_messages(
            request.tenant_id, request.conversation_id
        ):
            yield persister_pb2.ListMessagesResponse(message=_message(message))

    async def Flush(
        self, request: persister_pb2.FlushRequest, context: Context
    ) -> persister_pb2.FlushResponse:
        rows = await self._persister.barrier()
        return persister_pb2.FlushResponse(rows_written=rows)

    async def DeleteConversation(
        self, request: persister_pb2.DeleteConversationRequest, context: Context
    ) -> persister_pb2.DeleteConversationResponse:
        erasure = await self._persister.delete_conversation(
            request.tenant_id, request.conversation_id, force=request.force
        )
        return persister_pb2.DeleteConversationResponse(
            counts=persister_pb2.ErasureCounts(**asdict(erasure.counts)),
            already_deleted=erasure.already_deleted,
        )

    async def EraseTenant(
        self, request: persister_pb2.EraseTenantRequest, context: Context
    ) -> persister_pb2.EraseTenantResponse:
        erasure = await self._persister.erase_tenant(request.tenant_id)
        return persister_pb2.EraseTenantResponse(
            counts=persister_pb2.ErasureCounts(**asdict(erasure.counts))
        )

    async def LookupTurn(
        self, request: persister_pb2.LookupTurnRequest, context: Context
    ) -> persister_pb2.LookupTurnResponse:
        answer = await self._persister.lookup_turn(
            request.tenant_id, request.turn_id, request.after_seq
        )
        reply = persister_pb2.LookupTurnResponse(
            state=int(answer.state),  # type: ignore[arg-type]
            conversation_id=answer.conversation_id,
            request_offset=answer.request_offset,
            applied_request_offset=answer.applied_request_offset,
            first_seq=answer.first_seq,
            token_texts=answer.token_texts,
            tokens_complete=answer.tokens_complete,
        )
        if answer.finish_event:
            # Stored as the log's TurnEvent envelope (turnlog.encode); sent as its TurnFinished.
            reply.finished.CopyFrom(events_pb2.TurnEvent.FromString(answer.finish_event).finished)
        return reply

    async def ClaimRequestId(
        self, request: persister_pb2.ClaimRequestIdRequest, context: Context
    ) -> persister_pb2.ClaimRequestIdResponse:
        if self._claims is None:
            raise Unavailable("request-id claims are not served here", reason="CLAIMS_UNAVAILABLE")
        claim = await self._claims.claim(
            tenant_id=request.tenant_id,
            request_id=request.request_id,
            turn_id=request.turn_id,
            conversation_id=request.conversation_id,
            fingerprint=request.fingerprint,
            replace_turn_id=request.replace_turn_id,
        )
        return persister_pb2.ClaimRequestIdResponse(
            won=claim.won,
            turn_id=claim.turn_id,
            conversation_id=claim.conversation_id,
            fingerprint=claim.fingerprint,
            age_ms=int(claim.age_s * 1000),
        )

    async def GetStats(
        self, request: persister_pb2.GetStatsRequest, context: Context
    ) -> persister_pb2.GetStatsResponse:
        return persister_pb2.GetStatsResponse(**asdict(self._persister.stats()))


def build_server(settings: PersisterSettings, deps: PersisterDeps) -> tuple[aio.Server, int]:
    """The persister's gRPC server (not started), bound to ``settings.host:port``."""
    server, port, deps.health = build_service_server(
        "persister",
        SERVICE_NAME,
        persister_service_pb2_grpc.add_PersisterServiceServicer_to_server,
        PersisterServicer(deps.persister, deps.claims),
        host=settings.host,
        port=settings.port,
        tls=settings.tls,
    )
    return server, port
