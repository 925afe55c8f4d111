"""Rich statuses on the wire: what the error interceptor writes and what ``rich_status`` reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from mesh.errors import (
    InvalidArgument,
    MeshError,
    ResourceExhausted,
    error_info_reason,
    rich_status,
    to_status_proto,
)
from mesh.interceptors import ErrorInterceptor

METHOD = "/test.v1.Failing/Fail"
ERRORS: dict[bytes, MeshError] = {
    b"invalid": InvalidArgument("text is empty", reason="TEXT_EMPTY", field="start.text"),
    b"busy": ResourceExhausted("slow down: “quotas”", reason="RATE_LIMITED", retry_after_s=1.5),
}


async def _fail(request: bytes, context: Any) -> bytes:
    raise ERRORS[request]


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.v1.Failing", {"Fail": grpc.unary_unary_rpc_method_handler(_fail)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _call(target: str, request: bytes) -> aio.AioRpcError:
    async with aio.insecure_channel(target) as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await channel.unary_unary(METHOD)(request)  # type: ignore[arg-type]
    return caught.value


@pytest.mark.parametrize("which", sorted(ERRORS))
async def test_the_wire_carries_code_message_and_the_serialized_status(
    target: str, which: bytes
) -> None:
    error = await _call(target, which)
    expected = ERRORS[which]
    assert error.code() == expected.code
    assert error.details() == expected.message
    details = [v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"]
    # Byte for byte what the hand-written trailer carried before grpcio-status wrote it.
    assert details == [to_status_proto(expected).SerializeToString()]


async def test_rich_status_reads_what_the_server_wrote(target: str) -> None:
    error = await _call(target, b"invalid")
    status = rich_status(error)
    assert status == to_status_proto(ERRORS[b"invalid"])
    assert error_info_reason(status) == "TEXT_EMPTY"


class FakeError(grpc.RpcError):
    def __init__(self, trailing: tuple[tuple[str, bytes], ...], code: grpc.StatusCode) -> None:
        self._trailing = trailing
        self._code = code

    def trailing_metadata(self) -> Any:
        return self._trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "message"


def test_rich_status_is_none_without_a_readable_status() -> None:
    good = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="message")
    key = "grpc-status-details-bin"
    assert rich_status(FakeError((("other", b"x"),), grpc.StatusCode.NOT_FOUND)) is None
    assert rich_status(FakeError(((key, b"\xff\xff"),), grpc.StatusCode.NOT_FOUND)) is None
    assert rich_status(grpc.RpcError()) is None  # no accessors at all
    mismatched = FakeError(((key, good.SerializeToString()),), grpc.StatusCode.INTERNAL)
    assert rich_status(mismatched) is None
    matching = FakeError(((key, good.SerializeToString()),), grpc.StatusCode.NOT_FOUND)
    assert rich_status(matching) == good


def test_error_info_reason_takes_the_first_error_info() -> None:
    assert error_info_reason(None) is None
    assert error_info_reason(status_pb2.Status(code=5)) is None
    status = status_pb2.Status(code=5)
    status.details.add().Pack(error_details_pb2.RetryInfo())
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="FIRST"))
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="SECOND"))
    assert error_info_reason(status) == "FIRST"
    empty = status_pb2.Status(code=5)
    empty.details.add().Pack(error_details_pb2.ErrorInfo(reason=""))
    assert error_info_reason(empty) is None
