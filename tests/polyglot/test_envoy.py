"""Envoy in front of the fake gateway: gRPC-web translation (streamed, not buffered), CORS,
native gRPC on the same port, the page on the same origin, and health-checked upstreams."""

from __future__ import annotations

import asyncio
import http.client
import struct
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from grpc import aio

from mesh.infra.envoy import EnvoyProxy
from tests.fixtures.envoy import FAKE_API_KEY, TEST_ORIGIN, wait_upstreams_healthy
from tests.polyglot.helpers import scripted_text

pytestmark = pytest.mark.infra

STREAM_TURN = "/chat.gateway.v1.GatewayService/StreamTurn"


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)


@dataclass
class GrpcWebReply:
    status: int
    headers: dict[str, str]
    # (arrival time, message bytes) of each data frame, in order.
    messages: list[tuple[float, bytes]] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)

    def grpc_status(self) -> str:
        return self.trailers.get("grpc-status") or self.headers.get("grpc-status", "")


def _grpc_web_call(url: str, path: str, message: bytes, headers: dict[str, str]) -> GrpcWebReply:
    """One gRPC-web call as a browser makes it (HTTP/1.1 POST), reading frames as they come."""
    connection = _connection(url)
    try:
        body = b"\x00" + struct.pack(">I", len(message)) + message
        connection.request(
            "POST",
            path,
            body=body,
            headers={
                "content-type": "application/grpc-web+proto",
                "x-grpc-web": "1",
                "accept": "application/grpc-web+proto",
                **headers,
            },
        )
        response = connection.getresponse()
        reply = GrpcWebReply(response.status, {k.lower(): v for k, v in response.getheaders()})
        while True:
            head = response.read(5)
            if len(head) < 5:
                break
            flags, length = head[0], struct.unpack(">I", head[1:])[0]
            payload = response.read(length)
            if flags & 0x80:
                for line in payload.decode().split("\r\n"):
                    if ":" in line:
                        key, value = line.split(":", 1)
                        reply.trailers[key.strip().lower()] = value.strip()
            else:
                reply.messages.append((time.monotonic(), payload))
        return reply
    finally:
        connection.close()


async def grpc_web_stream_turn(
    url: str, text: str, max_tokens: int, **headers: str
) -> GrpcWebReply:
    request = gateway_pb2.StreamTurnRequest(
        start=gateway_pb2.StartTurn(text=text, options={"max_tokens": max_tokens})
    )
    # http.client blocks; the fake gateway runs on this event loop, so call from a thread.
    return await asyncio.to_thread(
        _grpc_web_call, url, STREAM_TURN, request.SerializeToString(), headers
    )


def _get(url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    connection = _connection(url)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


async def test_grpc_web_streams_tokens_as_they_are_generated(fake_envoy: EnvoyProxy) -> None:
    reply = await grpc_web_stream_turn(fake_envoy.url, "hello", 8, **{"x-api-key": FAKE_API_KEY})
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/grpc-web")
    assert reply.grpc_status() == "0", reply
    frames = [gateway_pb2.StreamTurnResponse.FromString(m) for _, m in reply.messages]
    tokens = [f.token for f in frames if f.WhichOneof("frame") == "token"]
    assert [t.seq for t in tokens] == list(range(1, 9))
    assert "".join(t.text for t in tokens) == scripted_text(8)
    assert frames[0].WhichOneof("frame") == "accepted"
    assert frames[-1].WhichOneof("frame") == "finished"
    # The fake emits a token every 50 ms: a proxy that buffered the response would deliver
    # them all at once at the end.
    arrivals = [
        at for (at, _), f in zip(reply.messages, frames, strict=True) if f.HasField("token")
    ]
    assert arrivals[-1] - arrivals[0] > 0.2, arrivals


async def test_grpc_web_reports_grpc_errors(fake_envoy: EnvoyProxy) -> None:
    reply = await grpc_web_stream_turn(fake_envoy.url, "hello", 3, **{"x-api-key": "wrong"})
    assert reply.status == 200
    assert reply.grpc_status() == "16", reply  # UNAUTHENTICATED
    assert reply.messages == []


async def test_cors_allows_configured_origins_only(fake_envoy: EnvoyProxy) -> None:
    preflight = {
        "Origin": TEST_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-api-key,x-grpc-web,x-user-agent",
    }
    status, headers, _ = await asyncio.to_thread(
        _get, fake_envoy.url, STREAM_TURN, "OPTIONS", preflight
    )
    assert status == 200
    assert headers["access-control-allow-origin"] == TEST_ORIGIN
    allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "x-api-key", "x-grpc-web", "x-user-agent"} <= allowed
    exposed = {h.strip() for h in headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed

    stranger = {**preflight, "Origin": "http://evil.example"}
    _, headers, _ = await asyncio.to_thread(_get, fake_envoy.url, STREAM_TURN, "OPTIONS", stranger)
    assert "access-control-allow-origin" not in headers

    # The actual call from an allowed origin exposes the gRPC status headers to the page.
    reply = await grpc_web_stream_turn(
        fake_envoy.url, "hi", 1, **{"x-api-key": FAKE_API_KEY, "origin": TEST_ORIGIN}
    )
    assert reply.headers.get("access-control-allow-origin") == TEST_ORIGIN
    assert "grpc-status-details-bin" in reply.headers.get("access-control-expose-headers", "")


async def test_page_is_served_on_the_same_origin(fake_envoy: EnvoyProxy) -> None:
    status, headers, body = await asyncio.to_thread(_get, fake_envoy.url, "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b'<script type="module" src="app.js">' in body
    status, headers, body = await asyncio.to_thread(_get, fake_envoy.url, "/app.js")
    assert status == 200
    assert headers["content-type"].startswith("text/javascript")
    assert len(body) > 10_000
    status, _, _ = await asyncio.to_thread(_get, fake_envoy.url, "/no-such-file.js")
    assert status == 404
    # A POST outside the gateway's service is not forwarded anywhere: it falls to the page's
    # file server, which only serves GET.
    status, _, _ = await asyncio.to_thread(_get, fake_envoy.url, "/other.Service/Call", "POST")
    assert status == 405


async def test_native_grpc_bidi_through_the_same_port(fake_envoy: EnvoyProxy) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{fake_envoy.port}") as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        call = stub.Chat(metadata=(("x-api-key", FAKE_API_KEY),), timeout=30)
        await call.write(
            gateway_pb2.ChatRequest(
                start=gateway_pb2.StartTurn(text="hi", options={"max_tokens": 4})
            )
        )
        seqs = []
        async for response in call:
            if response.HasField("token"):
                seqs.append(response.token.seq)
                await call.write(gateway_pb2.ChatRequest(credit=gateway_pb2.FlowCredit(tokens=1)))
            if response.HasField("finished"):
                break
        await call.done_writing()
    assert seqs == [1, 2, 3, 4]


async def test_envoy_takes_a_draining_gateway_out_and_back(
    fake_envoy: EnvoyProxy, fake_gateway: Any
) -> None:
    [address] = fake_envoy.config.upstreams
    await fake_gateway.set_serving(False)
    try:
        deadline = time.monotonic() + 10
        health = await fake_envoy.upstream_health()
        while health.get(address) != "unhealthy" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            health = await fake_envoy.upstream_health()
        assert health == {address: "unhealthy"}
    finally:
        await fake_gateway.set_serving(True)
    await wait_upstreams_healthy(fake_envoy, timeout_s=10)
