"""``mesh.client``: the channel lifecycle and retry policy the service clients share."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from grpc import aio

from mesh.client import RETRYABLE_CODES, ServiceClient, is_retryable
from services.agent.clients import _call_with_retries
from services.persister.memory_client import MemoryIndexer


def rpc_error(code: grpc.StatusCode, details: str = "details") -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details=details)


# -- ServiceClient ----------------------------------------------------------------------------


async def test_service_client_has_a_stub_only_while_started() -> None:
    channels: list[aio.Channel] = []

    def new_stub(channel: aio.Channel) -> object:
        channels.append(channel)
        return ("stub", channel)

    client = ServiceClient("127.0.0.1:1", new_stub)
    assert client.stub is None
    async with client:
        stub = client.stub
        assert stub == ("stub", channels[0])
        await client.start()  # a second start keeps the first channel
        assert client.stub is stub and len(channels) == 1
    assert client.stub is None
    await client.stop()  # stopping twice is harmless
    with pytest.raises(aio.UsageError):  # the channel was closed
        await channels[0].unary_unary("/x.Y/Z")(b"")  # type: ignore[arg-type]


# -- the retry policy -------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_retryable_codes(code: grpc.StatusCode) -> None:
    expected = code in {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
    assert (code in RETRYABLE_CODES) is expected
    assert is_retryable(rpc_error(code)) is expected


def test_only_grpc_aio_errors_are_retryable() -> None:
    assert not is_retryable(grpc.RpcError())
    assert not is_retryable(ConnectionError("not a call"))


# -- the agent's degrade-on-failure calls -----------------------------------------------------


class Calls:
    def __init__(self, *outcomes: BaseException | str) -> None:
        self.outcomes = list(outcomes)
        self.count = 0

    async def __call__(self) -> str:
        self.count += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def test_agent_call_retries_transient_codes_with_doubling_delays(
    sleeps: list[float],
) -> None:
    call = Calls(rpc_error(grpc.StatusCode.UNAVAILABLE), rpc_error(grpc.StatusCode.ABORTED), "ok")
    assert await _call_with_retries("x", call, attempts=3, backoff_s=0.2) == ("ok", True)
    assert sleeps == [0.2, 0.4]


async def test_agent_call_gives_up_after_its_attempts(
    sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    call = Calls(*(rpc_error(grpc.StatusCode.UNAVAILABLE, "down") for _ in range(4)))
    with caplog.at_level(logging.WARNING):
        assert await _call_with_retries("recall", call, attempts=4, backoff_s=0.1) == (
            None,
            False,
        )
    assert call.count == 4
    assert sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert "recall failed (UNAVAILABLE: down) after 4 attempt(s)" in caplog.text


async def test_agent_call_stops_at_a_permanent_code_and_counts_the_tries(
    sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    call = Calls(rpc_error(grpc.StatusCode.UNAVAILABLE), rpc_error(grpc.StatusCode.INTERNAL))
    with caplog.at_level(logging.WARNING):
        assert await _call_with_retries("h", call, attempts=5, backoff_s=0.1) == (None, False)
    assert sleeps == [0.1]
    assert "after 2 attempt(s)" in caplog.text


async def test_agent_call_missing_is_an_empty_success(sleeps: list[float]) -> None:
    call = Calls(rpc_error(grpc.StatusCode.NOT_FOUND))
    assert await _call_with_retries("h", call, attempts=3, backoff_s=0.1, missing_ok=True) == (
        None,
        True,
    )
    call = Calls(rpc_error(grpc.StatusCode.NOT_FOUND))
    assert await _call_with_retries("h", call, attempts=3, backoff_s=0.1) == (None, False)
    assert sleeps == []


async def test_agent_call_other_errors_are_not_retried(sleeps: list[float]) -> None:
    call = Calls(ValueError("client bug"), "never")
    assert await _call_with_retries("h", call, attempts=3, backoff_s=0.1) == (None, False)
    assert call.count == 1 and sleeps == []


# -- the persister's memory indexer -----------------------------------------------------------


class FakeMemoryStub:
    def __init__(self, *outcomes: BaseException | None) -> None:
        self.outcomes = list(outcomes)
        self.wait_for_ready: list[bool] = []

    async def Remember(self, request: Any, **options: Any) -> None:
        self.wait_for_ready.append(options["wait_for_ready"])
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


async def remember_with(stub: FakeMemoryStub) -> None:
    indexer = MemoryIndexer("127.0.0.1:1", initial_backoff_s=0.1, max_backoff_s=0.3)
    async with indexer:
        indexer._stub = stub
        await indexer.remember(tenant_id="t", conversation_id="c", text="x", request_id="r")


async def test_indexer_retries_transient_failures_until_it_succeeds(
    sleeps: list[float],
) -> None:
    stub = FakeMemoryStub(*(rpc_error(grpc.StatusCode.UNAVAILABLE) for _ in range(4)), None)
    await remember_with(stub)
    assert sleeps == pytest.approx([0.1, 0.2, 0.3, 0.3])
    # The first try fails fast; later ones wait for the channel to be ready.
    assert stub.wait_for_ready == [False, True, True, True, True]


async def test_indexer_drops_what_the_service_rejects(
    sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    stub = FakeMemoryStub(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "too long"))
    with caplog.at_level(logging.ERROR):
        await remember_with(stub)
    assert sleeps == []
    assert "failed with INVALID_ARGUMENT; not indexed: too long" in caplog.text


async def test_indexer_lets_other_errors_through(sleeps: list[float]) -> None:
    with pytest.raises(ValueError):
        await remember_with(FakeMemoryStub(ValueError("bug")))


async def test_indexer_must_be_started() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        await MemoryIndexer("127.0.0.1:1").remember(
            tenant_id="t", conversation_id="c", text="x", request_id="r"
        )
