"""A key's own limits against the launched mesh: the key that spent its token budget, or holds
its streams, is refused (RESOURCE_EXHAUSTED, QuotaFailure ``key:<id>``, RetryInfo) while another
key of the same tenant is still served."""

from __future__ import annotations

import time

import grpc
import pytest
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2
from google.rpc import error_details_pb2, status_pb2

from mesh.auth import add_key_to_file, hash_key
from tests.fixtures.mesh import RunningMesh
from tests.integration.grpc_helpers import (
    ChatSession,
    TurnResult,
    auth,
    error_reason,
    gateway,
    retry_delay_s,
    rich_status,
    start_request,
    stream_turn,
)

pytestmark = pytest.mark.integration

BUDGET = 40
TURN_TOKENS = 32


def first_turn(running_mesh: RunningMesh, key: str) -> TurnResult:
    """A turn with a key just added to the keys file: the gateway reads it within a second."""
    deadline = time.monotonic() + 10
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        while True:
            try:
                return stream_turn(
                    gateway(channel), key, start_request("hello", max_tokens=TURN_TOKENS)
                )
            except grpc.RpcError as error:
                unknown = error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
                if not unknown or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def quota_subjects(status: status_pb2.Status) -> list[str]:
    subjects = []
    for detail in status.details:
        quota = error_details_pb2.QuotaFailure()
        if detail.Unpack(quota):
            subjects += [violation.subject for violation in quota.violations]
    return subjects


def test_a_key_that_spent_its_budget_is_refused_and_its_tenants_other_key_served(
    running_mesh: RunningMesh,
) -> None:
    keys_file = running_mesh.state_dir / "api-keys.json"
    limited = add_key_to_file(
        keys_file, running_mesh.tenant_id, rate_per_s=100.0, burst=100, tokens_per_minute=BUDGET
    )
    key_id = hash_key(limited)[:12]
    first = first_turn(running_mesh, limited)
    assert first.finished is not None
    used = first.finished.usage.completion_tokens
    assert used + TURN_TOKENS > BUDGET  # the tiny model runs to max_tokens
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        stub = gateway(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stream_turn(stub, limited, start_request("again", max_tokens=TURN_TOKENS))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        status = rich_status(refused.value)
        assert error_reason(status) == "KEY_TOKEN_RATE"
        delay = retry_delay_s(status)
        assert delay is not None and 0 < delay <= 60
        assert quota_subjects(status) == [f"key:{key_id}"]
        # The same tenant's other key is not held back by this key's budget.
        other = stream_turn(
            stub, running_mesh.api_key, start_request("hello", max_tokens=TURN_TOKENS)
        )
        assert other.finished is not None
        assert other.finished.finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_a_key_that_holds_its_streams_is_refused_and_its_tenants_other_key_served(
    running_mesh: RunningMesh,
) -> None:
    keys_file = running_mesh.state_dir / "api-keys.json"
    limited = add_key_to_file(
        keys_file, running_mesh.tenant_id, rate_per_s=100.0, burst=100, max_streams=1
    )
    first_turn(running_mesh, limited)  # the gateway knows the key now
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        stub = gateway(channel)
        # The first stream runs a turn, so it holds its slot on the gateway. The client sees
        # first_turn's stream end a moment before the gateway frees its slot: retry briefly.
        deadline = time.monotonic() + 10
        while True:
            held = ChatSession(stub, limited)
            held.send(gateway_pb2.ChatRequest(start=start_request("hello", max_tokens=4)))
            try:
                assert held.next().WhichOneof("frame") == "accepted"
                break
            except grpc.RpcError:
                held.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        refused = ChatSession(stub, limited)
        other = ChatSession(stub, running_mesh.api_key)
        try:
            with pytest.raises(grpc.RpcError) as error:
                refused.next()
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            status = rich_status(error.value)
            assert error_reason(status) == "KEY_STREAM_LIMIT"
            assert quota_subjects(status) == [f"key:{hash_key(limited)[:12]}"]
            assert retry_delay_s(status) is not None
            # Meanwhile the tenant's other key opens a stream and runs a turn.
            other.send(gateway_pb2.ChatRequest(start=start_request("hello", max_tokens=4)))
            assert other.next().WhichOneof("frame") == "accepted"
        finally:
            for session in (held, refused, other):
                session.close()


def test_a_key_that_holds_its_queued_turns_is_refused_and_its_tenants_other_key_served(
    running_mesh: RunningMesh,
) -> None:
    keys_file = running_mesh.state_dir / "api-keys.json"
    limited = add_key_to_file(
        keys_file, running_mesh.tenant_id, rate_per_s=100.0, burst=100, max_queued_turns=1
    )
    first_turn(running_mesh, limited)  # the gateway knows the key now
    # Long enough to be still running below (the agent paces tokens).
    long_turn = max(50, int(5.0 / running_mesh.token_interval_s))
    with grpc.insecure_channel(running_mesh.gateway_addr) as channel:
        stub = gateway(channel)
        held = ChatSession(stub, limited)
        turn_id = ""
        try:
            held.send(gateway_pb2.ChatRequest(start=start_request("hi", max_tokens=long_turn)))
            accepted = held.next()
            assert accepted.WhichOneof("frame") == "accepted"
            turn_id = accepted.accepted.turn_id
            with pytest.raises(grpc.RpcError) as refused:
                stream_turn(stub, limited, start_request("again", max_tokens=4))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            status = rich_status(refused.value)
            assert error_reason(status) == "KEY_QUEUE_FULL"
            assert quota_subjects(status) == [f"key:{hash_key(limited)[:12]}"]
            assert retry_delay_s(status) is not None
            # The tenant's other key is not held back by this key's turn.
            other = stream_turn(stub, running_mesh.api_key, start_request("hello", max_tokens=4))
            assert other.finished is not None
        finally:
            if turn_id:
                stub.CancelTurn(
                    gateway_pb2.CancelTurnRequest(turn_id=turn_id), metadata=auth(limited)
                )
            held.close()
