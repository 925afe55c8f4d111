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
