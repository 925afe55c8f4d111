"""The agent's view of the persister (history) and memory (recall).

Both are optional for a turn: if a service is down, the agent retries briefly, then generates
without it and logs a warning. Losing context makes a worse answer; losing the turn is worse.
Each source has a circuit breaker: after a few turns in a row without it, later turns skip it
at once (no timed-out attempts) until a probe every few seconds finds it back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from chat.common.v1 import conversation_pb2
from chat.memory.v1 import memory_pb2, memory_service_pb2_grpc
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from grpc import aio
from prometheus_client import Counter

from mesh.breaker import CircuitBreaker
from mesh.client import ServiceClient, is_retryable
from mesh.lifecycle import AsyncStartStop
from mesh.retry import Backoff, retry
from mesh.settings import TlsSettings
from services.agent.prompt import ASSISTANT, USER, ChatMessage

log = logging.getLogger(__name__)

SKIPPED = Counter(
    "mesh_agent_context_skipped",
    "Turns generated without a context source, by source and why",
    ["source", "reason"],
)

_T = TypeVar("_T")

# Why a context source was skipped (``mesh_agent_context_skipped_total`` and ``TurnFinished``).
UNAVAILABLE = "unavailable"
CIRCUIT_OPEN = "circuit_open"

# The memory service bounds query length; the start of a long message is the best query anyway.
MAX_QUERY_CHARS = 4000


async def _call_with_retries(
    what: str,
    call: Callable[[], Awaitable[_T]],
    *,
    attempts: int,
    backoff_s: float,
    missing_ok: bool = False,
) -> tuple[_T | None, bool]:
    """Run ``call``; return ``(result, ok)``. NOT_FOUND with ``missing_ok`` is ``(None, True)``."""
    tries = 0

    async def counted() -> _T:
        nonlocal tries
        tries += 1
        return await call()

    try:
        return await retry(
            counted, backoff=Backoff(backoff_s), attempts=attempts, retry_if=is_retryable
        ), True
    except aio.AioRpcError as error:
        code = error.code()
        if missing_ok and code == grpc.StatusCode.NOT_FOUND:
            return None, True
        log.warning(
            "%s failed (%s: %s) after %d attempt(s); continuing without it",
            what,
            code.name,
            error.details(),
            tries,
        )
        return None, False
    except Exception as error:  # a bad address or a client bug: same outcome, no context
        log.warning("%s failed (%r); continuing without it", what, error)
        return None, False


class DependencyClients(AsyncStartStop):
    """Channels to the persister and memory services, with degrade-on-failure calls.

    Args:
        persister_addr, memory_addr: ``host:port``; an empty address disables that source.
        timeout_s: deadline of one call.
        attempts: tries of one call before giving up on it for this turn.

    A source that failed 3 turns in a row is skipped without a call, and probed once every 10 s
    (``CircuitBreaker``'s defaults).
    """

    def __init__(
        self,
        *,
        persister_addr: str,
        memory_addr: str,
        timeout_s: float = 10.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
        tls: TlsSettings | None = None,
        history_messages: int = 100,
    ) -> None:
        self._breakers = {source: CircuitBreaker() for source in ("history", "recall")}
        self._history_messages = history_messages
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._persister = (
            ServiceClient(
                persister_addr,
                persister_service_pb2_grpc.PersisterServiceStub,
                tls=tls,
                server_name="persister",
            )
            if persister_addr
            else None
        )
        self._memory = (
            ServiceClient(
                memory_addr,
                memory_service_pb2_grpc.MemoryServiceStub,
                tls=tls,
                server_name="memory",
            )
            if memory_addr
            else None
        )

    async def start(self) -> None:
        for client in self._clients():
            await client.start()

    async def stop(self) -> None:
        for client in self._clients():
            await client.stop()

    async def _guarded(
        self, source: str, what: str, call: Callable[[], Awaitable[_T]], *, missing_ok: bool = False
    ) -> tuple[_T | None, str]:
        """``_call_with_retries`` behind the source's breaker; returns the result and why it was
        skipped ("" when it was not). Skips are counted by reason."""
        breaker = self._breakers[source]
        if not breaker.allow():
            SKIPPED.labels(source, CIRCUIT_OPEN).inc()
            log.debug("%s skipped: it failed the last turns, probing again later", what)
            return None, CIRCUIT_OPEN
        result, ok = await _call_with_retries(
            what, call, attempts=self._attempts, backoff_s=self._backoff_s, missing_ok=missing_ok
        )
        if ok:
            breaker.succeeded()
            return result, ""
        breaker.failed()
        SKIPPED.labels(source, UNAVAILABLE).inc()
        return result, UNAVAILABLE

    def _clients(self) -> list[ServiceClient]:
        return [c for c in (self._persister, self._memory) if c is not None]

    async def history(
        self, tenant_id: str, conversation_id: str, *, for_turn_id: str = ""
    ) -> tuple[list[ChatMessage], str]:
        """The conversation's messages, oldest first, and why they are missing ("" when the
        read succeeded or no persister is configured: a deliberate setup, not a failure).

        A conversation the persister does not know is a new one: empty history. Messages of
        ``for_turn_id`` (the turn being generated) are left out, and the read waits only for
        the records logged before that turn.
        """
        stub = self._persister.stub if self._persister is not None else None
        if stub is None:
            return [], ""
        request = persister_pb2.GetConversationRequest(
            tenant_id=tenant_id,
            conversation_id=conversation_id,
            consistent=True,
            consistent_before_turn_id=for_turn_id,
            # Bounded, however long the conversation: the prompt keeps what fits of these.
            last_messages=self._history_messages,
        )

        async def call() -> persister_pb2.GetConversationResponse:
            response: persister_pb2.GetConversationResponse = await stub.GetConversation(
                request, timeout=self._timeout_s
            )
            return response

        response, skipped = await self._guarded(
            "history",
            "history (persister GetConversation)",
            call,
            missing_ok=True,
        )
        if response is None:
            return [], skipped
        messages: list[ChatMessage] = []
        for message in response.conversation.messages:
            if for_turn_id and message.turn_id == for_turn_id:
                continue
            if message.role == conversation_pb2.ROLE_USER:
                messages.append(ChatMessage(USER, message.text))
            elif message.role == conversation_pb2.ROLE_ASSISTANT:
                messages.append(ChatMessage(ASSISTANT, message.text))
        return messages, ""

    async def recall(self, tenant_id: str, query: str, top_k: int) -> tuple[list[str], str]:
        """Texts of the tenant's best-matching memory chunks, best first; and why they are
        missing ("" when recall ran, or is turned off or not configured)."""
        stub = self._memory.stub if self._memory is not None else None
        if stub is None or top_k <= 0:
            return [], ""
        request = memory_pb2.RecallRequest(
            tenant_id=tenant_id, query=query[:MAX_QUERY_CHARS], top_k=top_k
        )

        async def call() -> memory_pb2.RecallResponse:
            response: memory_pb2.RecallResponse = await stub.Recall(
                request, timeout=self._timeout_s
            )
            return response

        response, skipped = await self._guarded("recall", "recall (memory Recall)", call)
        if response is None:
            return [], skipped
        return [chunk.text for chunk in response.chunks if chunk.text.strip()], ""
