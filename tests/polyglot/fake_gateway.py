"""A stand-in GatewayService with the real contract and a scripted "model", for testing clients.

It exercises what the clients and the page depend on: API key check, queue position while a
turn waits, tokens with (turn_id, seq) arriving over time, resume after any seq from any stream,
cancel, conversation history. It runs in-process (grpc.aio) with grpc.health.v1, so Envoy can
front it exactly as it fronts the real gateway. The real mesh is tested by the same clients in
test_clients.py and tests/browser.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from chat.common.v1 import common_pb2, conversation_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "chat.gateway.v1.GatewayService"


@dataclass
class FakeTurn:
    turn_id: str
    conversation_id: str
    text: str
    planned: int
    tokens: list[str] = field(default_factory=list)
    queue_position: int = 1
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    cancelled: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


class FakeGateway(gateway_service_pb2_grpc.GatewayServiceServicer):
    """Generates ``word1 word2 ...`` at ``token_interval_s`` after ``queue_s`` in the queue."""

    def __init__(
        self, api_key: str, *, token_interval_s: float = 0.05, queue_s: float = 0.3
    ) -> None:
        self.api_key = api_key
        self.token_interval_s = token_interval_s
        self.queue_s = queue_s
        self.turns: dict[str, FakeTurn] = {}
        self.conversations: dict[str, list[conversation_pb2.Message]] = {}
        self.cancels: list[str] = []
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    async def _check_key(self, context: aio.ServicerContext[Any, Any]) -> None:
        keys = [value for key, value in context.invocation_metadata() or () if key == "x-api-key"]
        if keys != [self.api_key]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")

    def _start(self, start: gateway_pb2.StartTurn) -> FakeTurn:
        n = next(self._ids)
        conversation_id = start.conversation_id or f"conv-{n}"
        turn = FakeTurn(
            turn_id=f"t0.{n}.{n}.{n:016x}",
            conversation_id=conversation_id,
            text=start.text,
            planned=start.options.max_tokens or 40,
        )
        self.turns[turn.turn_id] = turn
        self.conversations.setdefault(conversation_id, []).append(
            conversation_pb2.Message(
                turn_id=turn.turn_id, role=conversation_pb2.ROLE_USER, text=start.text
            )
        )
        task = asyncio.get_running_loop().create_task(self._generate(turn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return turn

    async def _generate(self, turn: FakeTurn) -> None:
        await asyncio.sleep(self.queue_s)
        async with turn.changed:
            turn.queue_position = 0
            turn.changed.notify_all()
        for i in range(1, turn.planned + 1):
            if turn.cancelled:
                break
            await asyncio.sleep(self.token_interval_s)
            if turn.cancelled:
                break
            async with turn.changed:
                turn.tokens.append(f"word{i} ")
                turn.changed.notify_all()
        async with turn.changed:
            turn.finish_reason = (
                common_pb2.FINISH_REASON_CANCELLED
                if turn.cancelled
                else common_pb2.FINISH_REASON_LENGTH
            )
            turn.changed.notify_all()
        self.conversations[turn.conversation_id].append(
            conversation_pb2.Message(
                turn_id=turn.turn_id,
                role=conversation_pb2.ROLE_ASSISTANT,
                text="".join(turn.tokens),
                finish_reason=turn.finish_reason,
            )
        )

    async def _follow(self, turn: FakeTurn, after_seq: int) -> AsyncIterator[Any]:
        """Accepted (while queued), tokens after ``after_seq``, then finished."""
        sent = after_seq
        position = -1
        while True:
            async with turn.changed:
                await turn.changed.wait_for(
                    lambda position=position, sent=sent: (
                        turn.queue_position != position or len(turn.tokens) > sent or turn.finished
                    )
                )
                queue_position, tokens, finished = (
                    turn.queue_position,
                    list(turn.tokens),
                    turn.finished,
                )
            if queue_position != position:
                position = queue_position
                yield gateway_pb2.TurnAccepted(
                    turn_id=turn.turn_id,
                    conversation_id=turn.conversation_id,
                    queue_position=queue_position,
                )
            while sent < len(tokens):
                sent += 1
                yield gateway_pb2.Token(turn_id=turn.turn_id, seq=sent, text=tokens[sent - 1])
            if finished:
                yield gateway_pb2.TurnFinished(
                    turn_id=turn.turn_id,
                    finish_reason=turn.finish_reason,
                    last_seq=len(tokens),
                    usage=common_pb2.TokenUsage(completion_tokens=len(tokens)),
                )
                return

    async def StreamTurn(
        self, request: gateway_pb2.StreamTurnRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[gateway_pb2.StreamTurnResponse]:
        await self._check_key(context)
        turn = self._start(request.start)
        async for frame in self._follow(turn, 0):
            yield _frame(gateway_pb2.StreamTurnResponse, frame)

    async def ResumeTurn(
        self, request: gateway_pb2.ResumeTurnRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[gateway_pb2.ResumeTurnResponse]:
        await self._check_key(context)
        turn = self.turns.get(request.turn_id)
        if turn is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no turn {request.turn_id}")
        async for frame in self._follow(turn, request.after_seq):
            yield _frame(gateway_pb2.ResumeTurnResponse, frame)

    async def CancelTurn(
        self, request: gateway_pb2.CancelTurnRequest, context: aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.CancelTurnResponse:
        await self._check_key(context)
        turn = self.turns.get(request.turn_id)
        if turn is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no turn {request.turn_id}")
        self.cancels.append(request.turn_id)
        turn.cancelled = True
        return gateway_pb2.CancelTurnResponse(turn_id=request.turn_id)

    async def Chat(
        self,
        request_iterator: AsyncIterator[gateway_pb2.ChatRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        await self._check_key(context)
        first = await anext(aiter(request_iterator))
        kind = first.WhichOneof("frame")
        if kind == "start":
            turn, after = self._start(first.start), 0
        elif kind == "resume":
            found = self.turns.get(first.resume.turn_id)
            if found is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such turn")
            turn, after = found, first.resume.after_seq
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "start or resume first")

        async def read_rest() -> None:
            async for frame in request_iterator:
                if frame.WhichOneof("frame") == "cancel":
                    turn.cancelled = True

        reader = asyncio.get_running_loop().create_task(read_rest())
        try:
            async for frame in self._follow(turn, after):
                yield _frame(gateway_pb2.ChatResponse, frame)
            # Like the real gateway, the stream outlives the turn until the client half-closes.
            await reader
        finally:
            reader.cancel()

    async def ListConversations(
        self, request: gateway_pb2.ListConversationsRequest, context: aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.ListConversationsResponse:
        await self._check_key(context)
        return gateway_pb2.ListConversationsResponse(
            conversations=[
                common_conversation(conversation_id, messages[0].text[:40], [])
                for conversation_id, messages in reversed(self.conversations.items())
            ]
        )

    async def GetConversation(
        self, request: gateway_pb2.GetConversationRequest, context: aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.GetConversationResponse:
        await self._check_key(context)
        messages = self.conversations.get(request.conversation_id)
        if messages is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such conversation")
        return gateway_pb2.GetConversationResponse(
            conversation=common_conversation(
                request.conversation_id, messages[0].text[:40], messages
            )
        )


def common_conversation(
    conversation_id: str, title: str, messages: list[conversation_pb2.Message]
) -> conversation_pb2.Conversation:
    return conversation_pb2.Conversation(
        conversation_id=conversation_id, title=title, messages=messages
    )


def _frame(response_type: Any, frame: Any) -> Any:
    if isinstance(frame, gateway_pb2.TurnAccepted):
        return response_type(accepted=frame)
    if isinstance(frame, gateway_pb2.Token):
        return response_type(token=frame)
    return response_type(finished=frame)


class RunningFake:
    """The fake gateway on a loopback port with grpc.health.v1 (SERVING)."""

    def __init__(
        self, api_key: str, *, credentials: grpc.ServerCredentials | None = None, **options: float
    ) -> None:
        self.fake = FakeGateway(api_key, **options)
        self.server = aio.server()
        self.health = health.aio.HealthServicer()
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server(self.fake, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self) -> None:
        await self.server.stop(0)
