"""The circuit breaker, and the agent's context sources behind it."""

from __future__ import annotations

from mesh.breaker import CircuitBreaker
from mesh.infra.process import free_port
from services.agent.clients import SKIPPED, DependencyClients


def test_opens_after_consecutive_failures_and_probes_once_per_interval() -> None:
    now = [100.0]

    def clock() -> float:
        return now[0]

    breaker = CircuitBreaker(failures_to_open=2, open_s=5.0, clock=clock)
    breaker.failed()
    assert breaker.allow() and not breaker.is_open
    breaker.failed()
    assert breaker.is_open and not breaker.allow()
    now[0] += 5.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one per interval
    breaker.failed()  # the probe failed: open for another interval
    now[0] += 4.9
    assert not breaker.allow()
    now[0] += 0.1
    assert breaker.allow()
    breaker.succeeded()
    assert not breaker.is_open and breaker.allow() and breaker.allow()


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failures_to_open=2)
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    assert not breaker.is_open


async def test_recall_from_a_dead_memory_service_is_skipped_at_once_after_a_few_turns() -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    clients = DependencyClients(
        persister_addr="",
        memory_addr=dead,
        timeout_s=0.5,
        attempts=2,
        backoff_s=0.01,
    )
    unavailable = SKIPPED.labels("recall", "unavailable")._value.get()
    skipped = SKIPPED.labels("recall", "circuit_open")._value.get()
    async with clients:
        for _ in range(3):  # the breaker opens after 3 failed turns
            assert await clients.recall("tenant", "what did I say?", 3) == ([], "unavailable")
        # Skipped without a call: counted as circuit_open, not as another unavailable.
        assert await clients.recall("tenant", "what did I say?", 3) == ([], "circuit_open")
    assert SKIPPED.labels("recall", "unavailable")._value.get() == unavailable + 3
    assert SKIPPED.labels("recall", "circuit_open")._value.get() == skipped + 1


async def test_a_history_read_asks_only_for_the_newest_messages() -> None:
    """The agent's history read is bounded (MESH_AGENT_HISTORY_MESSAGES), whatever the length of
    the conversation; a real gRPC server records what it was asked."""
    from chat.common.v1 import conversation_pb2
    from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
    from grpc import aio

    asked: list[persister_pb2.GetConversationRequest] = []

    class Persister(persister_service_pb2_grpc.PersisterServiceServicer):
        async def GetConversation(  # noqa: N802 (the generated name)
            self, request: persister_pb2.GetConversationRequest, context: object
        ) -> persister_pb2.GetConversationResponse:
            asked.append(request)
            message = conversation_pb2.Message(role=conversation_pb2.ROLE_USER, text="hi")
            return persister_pb2.GetConversationResponse(
                conversation=conversation_pb2.Conversation(messages=[message])
            )

    server = aio.server()
    persister_service_pb2_grpc.add_PersisterServiceServicer_to_server(Persister(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        clients = DependencyClients(
            persister_addr=f"127.0.0.1:{port}", memory_addr="", history_messages=7
        )
        async with clients:
            history, skipped = await clients.history("tenant", "conv", for_turn_id="t-1")
    finally:
        await server.stop(None)
    assert skipped == "" and len(history) == 1
    [request] = asked
    assert (request.last_messages, request.consistent_before_turn_id) == (7, "t-1")
