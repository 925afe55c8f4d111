"""The gateway's client of the persister: conversation checks and history reads for a tenant."""

from __future__ import annotations

from typing import Any

import grpc
from chat.common.v1 import conversation_pb2
from chat.events.v1 import events_pb2
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from grpc import aio

from mesh import turnlog
from mesh.client import ServiceClient
from mesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_info_reason,
    rich_status,
)
from mesh.settings import TlsSettings
from services.gateway.idempotency import Claim
from services.gateway.turn_lookup import StoredState, StoredTurn


def map_persister_error(error: aio.AioRpcError, *, what: str) -> MeshError:
    """The error the gateway's caller sees when the persister answers ``error``."""
    code = error.code()
    reason = error_info_reason(rich_status(error))
    details = error.details() or code.name
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details, reason=reason or "CONVERSATION_NOT_FOUND")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(details, reason=reason or "FAILED_PRECONDITION")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details, reason=reason or "INVALID_ARGUMENT")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(
            f"conversation store is overloaded: {details}",
            reason=reason or "PERSISTER_OVERLOADED",
            retry_after_s=1.0,
        )
    return Unavailable(
        f"conversation store could not {what} ({code.name}: {details}); retry shortly",
        reason="PERSISTER_UNAVAILABLE",
        retry_after_s=1.0,
    )


class PersisterClient(ServiceClient):
    """A channel to ``MESH_PERSISTER_ADDR``. ``async with`` or start/stop."""

    def __init__(
        self,
        addr: str,
        *,
        timeout_s: float = 15.0,
        tls: TlsSettings | None = None,
        lookup_timeout_s: float = 2.0,
    ) -> None:
        super().__init__(
            addr, persister_service_pb2_grpc.PersisterServiceStub, tls=tls, server_name="persister"
        )
        self.addr = addr
        self._timeout_s = timeout_s
        self._lookup_timeout_s = lookup_timeout_s

    async def _call(
        self, method: str, request: Any, *, what: str, timeout_s: float | None = None
    ) -> Any:
        """``method`` on the persister; its failure as the error the gateway's caller sees."""
        if self.stub is None:
            raise Unavailable("persister client is not started", reason="PERSISTER_UNAVAILABLE")
        timeout = self._timeout_s if timeout_s is None else timeout_s
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except aio.AioRpcError as error:
            raise map_persister_error(error, what=what) from None

    async def get_conversation(
        self, tenant_id: str, conversation_id: str, *, consistent: bool = True
    ) -> conversation_pb2.Conversation:
        reply = await self._call(
            "GetConversation",
            persister_pb2.GetConversationRequest(
                tenant_id=tenant_id, conversation_id=conversation_id, consistent=consistent
            ),
            what="read the conversation",
        )
        conversation: conversation_pb2.Conversation = reply.conversation
        return conversation

    async def require_conversation(self, tenant_id: str, conversation_id: str) -> None:
        # consistent=True: a conversation whose first turn was accepted a moment ago exists.
        await self.get_conversation(tenant_id, conversation_id, consistent=True)

    async def list_conversations(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[conversation_pb2.Conversation], str]:
        reply = await self._call(
            "ListConversations",
            persister_pb2.ListConversationsRequest(
                tenant_id=tenant_id, page_size=page_size, page_token=page_token
            ),
            what="list conversations",
        )
        return list(reply.conversations), str(reply.next_page_token)

    async def delete_conversation(
        self, tenant_id: str, conversation_id: str
    ) -> persister_pb2.DeleteConversationResponse:
        reply: persister_pb2.DeleteConversationResponse = await self._call(
            "DeleteConversation",
            persister_pb2.DeleteConversationRequest(
                tenant_id=tenant_id, conversation_id=conversation_id
            ),
            what="delete the conversation",
        )
        return reply

    async def lookup_turn(self, tenant_id: str, turn_id: str, after_seq: int) -> StoredTurn:
        # A short timeout: the caller falls back to the log when the persister is slow.
        reply = await self._call(
            "LookupTurn",
            persister_pb2.LookupTurnRequest(
                tenant_id=tenant_id, turn_id=turn_id, after_seq=after_seq
            ),
            what="look the turn up",
            timeout_s=self._lookup_timeout_s,
        )
        finished = None
        if reply.HasField("finished"):
            # Read through turnlog, as the same record read from the log would be.
            envelope = events_pb2.TurnEvent(finished=reply.finished).SerializeToString()
            events = turnlog.decode_events(envelope)
            if events and isinstance(events[0], turnlog.TurnFinished):
                finished = events[0]
        try:
            state = StoredState(reply.state)
        except ValueError:
            state = StoredState.UNSPECIFIED  # a newer persister's state: use the log
        return StoredTurn(
            state=state,
            conversation_id=reply.conversation_id,
            request_offset=reply.request_offset,
            applied_request_offset=reply.applied_request_offset,
            finished=finished,
            first_seq=reply.first_seq,
            token_texts=tuple(reply.token_texts),
            tokens_complete=reply.tokens_complete,
        )

    async def claim_request_id(
        self,
        *,
        tenant_id: str,
        request_id: str,
        turn_id: str,
        conversation_id: str,
        fingerprint: str,
        replace_turn_id: str,
        timeout_s: float,
    ) -> Claim:
        """Claim a start's request id for its turn (``idempotency.RequestClaims``)."""
        reply = await self._call(
            "ClaimRequestId",
            persister_pb2.ClaimRequestIdRequest(
                tenant_id=tenant_id,
                request_id=request_id,
                turn_id=turn_id,
                conversation_id=conversation_id,
                fingerprint=fingerprint,
                replace_turn_id=replace_turn_id,
            ),
            what="record the request_id",
            timeout_s=timeout_s,
        )
        return Claim(
            won=reply.won,
            turn_id=reply.turn_id,
            conversation_id=reply.conversation_id,
            fingerprint=reply.fingerprint,
            age_s=reply.age_ms / 1000,
        )
