"""A request grpc cannot decode gets INVALID_ARGUMENT naming the expected message type, from the
shared error interceptor; grpc.aio alone would answer UNKNOWN with the decoder's exception (the
fault suite's malformed frames found it, bench/fault_frames.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from chat.gateway.v1 import gateway_pb2
from grpc import aio

from mesh.errors import error_info_reason, rich_status
from mesh.interceptors import ErrorInterceptor

SERVICE = "test.v1.Decoding"
REQUEST = gateway_pb2.GetConversationRequest
CORRUPT = b"\x0a\xff\x01abc"  # field 1, a length of 255, three bytes: cut short
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1, a string that is not UTF-8
calls: list[Any] = []


async def _get(request: Any, context: Any) -> bytes:
    calls.append(request)
    return b"ok"


async def _chat(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        calls.append(request)
        yield b"ok"


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = aio.server(interceptors=[ErrorInterceptor()])
    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(_get, REQUEST.FromString),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat, REQUEST.FromString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    calls.clear()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _assert_refused(error: aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details() == (
        "the request is not a valid chat.gateway.v1.GetConversationRequest message"
    )
    assert error_info_reason(rich_status(error)) == "MALFORMED_REQUEST"
    assert calls == []  # the handler never saw it


@pytest.mark.parametrize("raw", [CORRUPT, BAD_UTF8])
async def test_an_undecodable_unary_request_is_invalid_argument(target: str, raw: bytes) -> None:
    async with aio.insecure_channel(target) as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await channel.unary_unary(f"/{SERVICE}/Get")(raw)  # type: ignore[arg-type]
    _assert_refused(caught.value)


async def test_an_undecodable_message_in_a_request_stream_is_invalid_argument(
    target: str,
) -> None:
    async with aio.insecure_channel(target) as channel:
        call = channel.stream_stream(f"/{SERVICE}/Chat")(iter([CORRUPT]))  # type: ignore[arg-type]
        with pytest.raises(aio.AioRpcError) as caught:
            async for _ in call:
                pass
    _assert_refused(caught.value)


async def test_a_valid_request_still_reaches_the_handler(target: str) -> None:
    async with aio.insecure_channel(target) as channel:
        raw = REQUEST(conversation_id="c1").SerializeToString()
        assert await channel.unary_unary(f"/{SERVICE}/Get")(raw) == b"ok"  # type: ignore[arg-type]
    assert [c.conversation_id for c in calls] == ["c1"]
