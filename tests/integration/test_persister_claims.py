"""The persister's ClaimRequestId RPC over gRPC, on real PostgreSQL and an embedded log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc

from mesh.log.embedded import EmbeddedLog
from mesh.server import channel
from services.persister.claims import ClaimStore
from services.persister.codec import decode
from services.persister.core import Persister
from services.persister.server import PersisterDeps, build_server
from services.persister.settings import PersisterSettings
from services.persister.store import PgStore
from tests.integration.test_persister import error_reason

pytestmark = pytest.mark.integration


async def serve(
    pg_dsn: str, tmp_path: Path, *, with_claims: bool
) -> AsyncIterator[persister_service_pb2_grpc.PersisterServiceStub]:
    async with (
        EmbeddedLog(tmp_path / "log.sqlite3") as log,
        PgStore(pg_dsn) as store,
        Persister(log=log, store=store, decode=decode, partitions=2, member_id="p1") as persister,
    ):
        claims = ClaimStore(store, ttl_s=600) if with_claims else None
        server, port = build_server(
            PersisterSettings(port=0), PersisterDeps(persister=persister, claims=claims)
        )
        await server.start()
        try:
            async with channel(f"127.0.0.1:{port}") as ch:
                yield persister_service_pb2_grpc.PersisterServiceStub(ch)  # type: ignore[no-untyped-call]
        finally:
            await server.stop(None)


@pytest.fixture
async def stub(
    pg_dsn: str, tmp_path: Path
) -> AsyncIterator[persister_service_pb2_grpc.PersisterServiceStub]:
    async for opened in serve(pg_dsn, tmp_path, with_claims=True):
        yield opened


def claim_request(turn_id: str, **changes: str) -> persister_pb2.ClaimRequestIdRequest:
    fields = {
        "tenant_id": "acme",
        "request_id": "r-1",
        "turn_id": turn_id,
        "conversation_id": "c-1",
        "fingerprint": "f-1",
        **changes,
    }
    return persister_pb2.ClaimRequestIdRequest(**fields)


async def test_the_first_claim_wins_over_grpc(
    stub: persister_service_pb2_grpc.PersisterServiceStub,
) -> None:
    first = await stub.ClaimRequestId(claim_request("t-a"))
    assert first.won and first.turn_id == "t-a" and first.age_ms == 0
    second = await stub.ClaimRequestId(claim_request("t-b", fingerprint="f-2"))
    assert not second.won
    assert (second.turn_id, second.conversation_id, second.fingerprint) == ("t-a", "c-1", "f-1")
    taken = await stub.ClaimRequestId(claim_request("t-b", replace_turn_id="t-a"))
    assert taken.won and taken.turn_id == "t-b"


async def test_a_claim_without_a_request_id_is_invalid(
    stub: persister_service_pb2_grpc.PersisterServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ClaimRequestId(claim_request("t-a", request_id=""))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(refused.value) == "REQUEST_ID_MISSING"


async def test_a_persister_without_claims_answers_unavailable(pg_dsn: str, tmp_path: Path) -> None:
    async for bare in serve(pg_dsn, tmp_path, with_claims=False):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await bare.ClaimRequestId(claim_request("t-a"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(refused.value) == "CLAIMS_UNAVAILABLE"
