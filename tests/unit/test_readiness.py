"""Readiness: a dependency turns the service NOT_SERVING only after failing past the threshold,
and back at its first good probe; liveness ("") is never touched."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from mesh.errors import Unavailable
from mesh.readiness import DEPENDENCY_UP, HealthSettings, Probe, Readiness
from services.gateway.readiness import AgentCoverage, StartGate

SERVICE = "chat.test.v1.TestService"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Switch:
    """A dependency the test turns up, down or unresponsive."""

    def __init__(self) -> None:
        self.state = "up"

    async def check(self) -> None:
        if self.state == "down":
            raise ConnectionError("refused")
        if self.state == "hung":
            await asyncio.sleep(3600)


async def status(servicer: health.aio.HealthServicer, name: str) -> int:
    reply = await servicer.Check(health_pb2.HealthCheckRequest(service=name), None)
    return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_not_serving_only_past_the_threshold_and_serving_at_the_first_good_probe() -> None:
    clock, db = Clock(), Switch()
    settings = HealthSettings(interval_s=1.0, timeout_s=0.05, threshold_s=3.0)
    readiness = Readiness("unit", [Probe("db", db.check)], settings, clock=clock)
    servicer = health.aio.HealthServicer()
    await servicer.set("", SERVING)
    await servicer.set(SERVICE, SERVING)
    await readiness.attach(servicer, [SERVICE])

    db.state = "hung"  # a stopped process: no answer, not an error
    await readiness.check_once()
    clock.now += 2.0
    await readiness.check_once()
    assert readiness.ready and readiness.down("db") is None
    assert await status(servicer, SERVICE) == SERVING

    clock.now += 1.5  # failing for 3.5 s now
    await readiness.check_once()
    assert not readiness.ready
    assert readiness.down("db") == "no answer within the probe's timeout"
    assert await status(servicer, SERVICE) == NOT_SERVING
    assert await status(servicer, "") == SERVING  # liveness stays
    assert DEPENDENCY_UP.labels("unit", "db")._value.get() == 0

    db.state = "up"
    await readiness.check_once()
    assert readiness.ready and readiness.down("db") is None
    assert await status(servicer, SERVICE) == SERVING
    assert DEPENDENCY_UP.labels("unit", "db")._value.get() == 1


async def test_a_good_probe_restarts_the_threshold() -> None:
    clock, db = Clock(), Switch()
    settings = HealthSettings(interval_s=1.0, timeout_s=0.05, threshold_s=3.0)
    readiness = Readiness("unit2", [Probe("db", db.check)], settings, clock=clock)
    db.state = "down"
    await readiness.check_once()
    clock.now += 2.5
    db.state = "up"
    await readiness.check_once()
    db.state = "down"
    clock.now += 1.0
    await readiness.check_once()
    clock.now += 2.5
    await readiness.check_once()
    assert readiness.ready  # 2.5 s of failing since the good probe, not 6
    clock.now += 1.0
    await readiness.check_once()
    assert readiness.down("db") == "refused"


async def test_optional_dependencies_do_not_decide_readiness() -> None:
    clock, extra = Clock(), Switch()
    settings = HealthSettings(interval_s=1.0, timeout_s=0.05, threshold_s=0.0)
    readiness = Readiness(
        "unit3", [Probe("extra", extra.check, required=False)], settings, clock=clock
    )
    extra.state = "down"
    await readiness.check_once()
    assert readiness.ready
    assert readiness.down("extra") == "refused"


class Partitions:
    """Stands in for the log's view of the agents' group."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.live: frozenset[int] = frozenset()

    async def partition_count(self, topic: str) -> int:
        return self.count

    async def live_partitions(self, topic: str, group: str) -> frozenset[int]:
        return self.live


async def test_start_gate_refuses_with_retry_info_by_reason() -> None:
    clock, db = Clock(), Switch()
    settings = HealthSettings(interval_s=1.0, timeout_s=0.05, threshold_s=2.0)
    log = Partitions(2)
    agents = AgentCoverage(log, clock=clock)  # type: ignore[arg-type]
    readiness = Readiness(
        "gate",
        [
            Probe("log", db.check),
            Probe("persister", db.check),
            Probe("agents", agents.refresh, required=False),
        ],
        settings,
        clock=clock,
    )
    gate = StartGate(readiness, agents, settings)
    gate.check(0)  # agents may start after the gateway: covered at first
    clock.now += 2.5
    with pytest.raises(Unavailable) as refused:
        gate.check(1)
    assert refused.value.reason == "NO_AGENT"
    assert refused.value.retry_after_s == 1.0
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    log.live = frozenset({0, 1})
    await readiness.check_once()
    gate.check(1)

    db.state = "down"
    await readiness.check_once()
    clock.now += 2.5
    await readiness.check_once()
    with pytest.raises(Unavailable) as refused:
        gate.check(0)
    assert refused.value.reason == "LOG_UNAVAILABLE"


async def test_a_probe_that_will_not_stop_does_not_hold_up_the_others() -> None:
    """A client that takes its time to give up a cancelled call (psycopg waits for the server
    to confirm a cancelled query) must not freeze the readiness loop or the other probes."""
    clock = Clock()
    calls = 0

    async def stubborn() -> None:
        nonlocal calls
        calls += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # ignores the cancel for a while
            raise

    other = Switch()
    settings = HealthSettings(interval_s=1.0, timeout_s=0.05, threshold_s=1.0)
    readiness = Readiness(
        "unit4", [Probe("db", stubborn), Probe("other", other.check)], settings, clock=clock
    )
    loop = asyncio.get_running_loop()
    for _ in range(3):
        started = loop.time()
        await readiness.check_once()
        assert loop.time() - started < 0.3
        clock.now += 0.6
    assert readiness.down("db") == "no answer within the probe's timeout"
    assert readiness.down("other") is None
    assert calls == 1  # the stubborn probe was not started again while it still ran
    await readiness.stop()
