"""``mesh.server``: the one way every service builds its server, serves, drains and exits."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mesh.errors import NotFound
from mesh.server import build_service_server, run_main, serve_until_signalled, start_metrics
from mesh.settings import SettingsError

SERVICE = "test.v1.EchoService"


async def _echo(request: bytes, context: Any) -> bytes:
    if request == b"missing":
        raise NotFound("no such thing", reason="THING_NOT_FOUND")
    return request


def _add(servicer: Any, server: aio.Server) -> None:
    server.add_generic_rpc_handlers((servicer,))


ECHO = grpc.method_handlers_generic_handler(
    SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
)


class Tagging(aio.ServerInterceptor):
    """An extra interceptor: it runs, and the error interceptor still maps what handlers raise."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.methods.append(details.method)
        return await continuation(details)


@dataclass
class Built:
    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    tagging: Tagging


@pytest.fixture
async def built() -> AsyncIterator[Built]:
    tagging = Tagging()
    server, port, health_servicer = build_service_server(
        "test", SERVICE, _add, ECHO, host="127.0.0.1", port=0, extra_interceptors=[tagging]
    )
    try:
        yield Built(server, port, health_servicer, tagging)
    finally:
        await server.stop(None)


async def _health(channel: aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def test_the_server_serves_the_servicer_with_the_shared_interceptors(built: Built) -> None:
    assert built.port > 0
    await built.server.start()
    async with aio.insecure_channel(f"127.0.0.1:{built.port}") as channel:
        echo: Any = channel.unary_unary(f"/{SERVICE}/Echo")
        assert await echo(b"hi") == b"hi"
        with pytest.raises(aio.AioRpcError) as caught:
            await echo(b"missing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no such thing"
    assert built.tagging.methods == [f"/{SERVICE}/Echo"] * 2


async def test_the_server_has_reflection_for_the_service_and_health(built: Built) -> None:
    await built.server.start()
    async with aio.insecure_channel(f"127.0.0.1:{built.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = set()
        async for reply in replies:
            names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_serve_until_signalled_serves_then_drains_on_sigterm(built: Built) -> None:
    seen_while_draining: list[int] = []
    addr = f"127.0.0.1:{built.port}"

    async with aio.insecure_channel(addr) as channel:

        async def drain() -> None:
            seen_while_draining.append(await _health(channel, SERVICE))

        serving = asyncio.create_task(
            serve_until_signalled(
                built.server, built.health, [SERVICE], grace_s=1.0, on_drain=drain
            )
        )
        # SERVING is set after the signal handlers are in place: SIGTERM is safe from then on.
        for _ in range(200):
            try:
                if await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except aio.AioRpcError:
                pass
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the service never reported SERVING")
        assert await _health(channel, "") == health_pb2.HealthCheckResponse.SERVING
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 10)
    assert seen_while_draining == [health_pb2.HealthCheckResponse.NOT_SERVING]


def test_start_metrics_is_off_for_a_negative_port() -> None:
    assert start_metrics(-1, "127.0.0.1") is None
    port = start_metrics(0, "127.0.0.1")
    assert port is not None and port > 0


@dataclass(frozen=True)
class FakeSettings:
    log_level: str = "INFO"
    log_format: str = "console"
    instance: str = ""


def test_run_main_serves_and_exits_zero() -> None:
    served: list[FakeSettings] = []

    async def serve(settings: FakeSettings) -> None:
        served.append(settings)

    assert run_main("svc", FakeSettings, serve) == 0
    assert served == [FakeSettings()]


def test_run_main_bad_configuration_is_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def load() -> FakeSettings:
        raise SettingsError("MESH_X must be a number")

    async def serve(settings: FakeSettings) -> None:
        pytest.fail("must not serve")

    assert run_main("svc", load, serve) == 2
    assert capsys.readouterr().err == "svc: bad configuration: MESH_X must be a number\n"


def test_run_main_without_config_errors_lets_them_raise() -> None:
    def load() -> FakeSettings:
        raise SettingsError("bad")

    async def serve(settings: FakeSettings) -> None:
        pass

    with pytest.raises(SettingsError):
        run_main("svc", load, serve, config_errors=())


def test_run_main_fatal_errors_are_status_1_and_interrupts_130(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def broken(settings: FakeSettings) -> None:
        raise LookupError("the model file is missing")

    async def interrupted(settings: FakeSettings) -> None:
        raise KeyboardInterrupt

    assert run_main("svc", FakeSettings, broken, fatal_errors=(LookupError,)) == 1
    assert capsys.readouterr().err == "svc: the model file is missing\n"
    assert run_main("svc", FakeSettings, interrupted) == 130
    with pytest.raises(LookupError):
        run_main("svc", FakeSettings, broken)
