"""Readiness that means something: a service's dependencies, probed in the background.

Two grpc.health.v1 names per service, with different meanings (docs/reliability.md):

- ``""`` (the overall service) is **liveness**: SERVING from the moment the server runs until it
  drains. It never depends on another service, so a supervisor or a Kubernetes liveness probe
  that watches it does not restart a healthy process that is waiting for a dependency.
- The service's own name (``chat.gateway.v1.GatewayService``, ...) is **readiness**: SERVING
  only while every required dependency answers its probe. A dependency that has failed
  continuously for longer than ``threshold_s`` turns it NOT_SERVING; the first probe that
  succeeds again turns it back. Load balancers (Envoy) and readiness probes watch this one.

``Readiness`` runs the probes every ``interval_s`` (each bounded by ``timeout_s``), keeps what
each dependency's state is, exports it as the ``mesh_dependency_up`` gauge, and publishes the
readiness status to the health servicer once ``serve_until_signalled`` attaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2
from prometheus_client import Gauge

from mesh.lifecycle import AsyncStartStop
from mesh.settings import Settings, setting

log = logging.getLogger(__name__)

DEPENDENCY_UP = Gauge(
    "mesh_dependency_up",
    "1 while a dependency answers its readiness probe (or has failed for less than the "
    "threshold), 0 once it has failed for longer",
    ["service", "dependency"],
)


@dataclass(frozen=True, kw_only=True)
class HealthSettings(Settings):
    """How services probe their dependencies (``MESH_HEALTH_*``, shared by every service).

    Attributes:
        interval_s: time between two probes of a dependency (``MESH_HEALTH_INTERVAL_S``).
        timeout_s: how long one probe may take before it counts as failed
            (``MESH_HEALTH_TIMEOUT_S``).
        threshold_s: how long a dependency must fail without a break before readiness turns
            NOT_SERVING and the gateway refuses new turns (``MESH_HEALTH_THRESHOLD_S``); 0 acts
            on the first failed probe.
    """

    env_prefix = "MESH_HEALTH_"

    interval_s: float = setting("INTERVAL_S", 1.0, above=0)
    timeout_s: float = setting("TIMEOUT_S", 1.0, above=0)
    threshold_s: float = setting("THRESHOLD_S", 3.0, minimum=0)


@dataclass(frozen=True)
class Probe:
    """One dependency: ``check`` returns when it is usable and raises (or hangs) when not.

    ``required`` dependencies decide readiness; the others are only tracked (``down``), for
    callers that refuse some work without them.
    """

    name: str
    check: Callable[[], Awaitable[object]]
    required: bool = True


@dataclass
class _State:
    failing_since: float | None = None
    error: str = ""
    down: bool = False


class Readiness(AsyncStartStop):
    """Probes a service's dependencies; ``down`` says which have failed past the threshold.

    Args:
        service: the ``service`` label of the gauge (``gateway``, ``persister``, ...).
        probes: the dependencies.
        settings: interval, timeout and threshold.
        clock: ``time.monotonic`` (tests pass their own).
    """

    def __init__(
        self,
        service: str,
        probes: Sequence[Probe],
        settings: HealthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self._probes = tuple(probes)
        self._settings = settings
        self._clock = clock
        self._states = {probe.name: _State() for probe in self._probes}
        self._task: asyncio.Task[None] | None = None
        # Probes still running, by dependency (see ``_check``).
        self._running: dict[str, asyncio.Task[object]] = {}
        self._health: health.aio.HealthServicer | None = None
        self._names: tuple[str, ...] = ()
        self._published: bool | None = None
        for probe in self._probes:
            DEPENDENCY_UP.labels(service, probe.name).set(1)

    @property
    def settings(self) -> HealthSettings:
        return self._settings

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"{self._service}-readiness")

    async def stop(self) -> None:
        await self.detach()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        running, self._running = list(self._running.values()), {}
        for probe in running:
            probe.cancel()

    def down(self, name: str) -> str | None:
        """Why ``name`` is down (its last error), or None while it counts as up."""
        state = self._states[name]
        if not state.down:
            return None
        return state.error or "probe failed"

    @property
    def ready(self) -> bool:
        """True unless a required dependency is down."""
        return not any(self._states[p.name].down for p in self._probes if p.required)

    async def attach(
        self, servicer: health.aio.HealthServicer, service_names: Sequence[str]
    ) -> None:
        """Publish readiness on ``service_names`` from now on (the server is serving)."""
        self._health, self._names, self._published = servicer, tuple(service_names), None
        await self._publish()

    async def detach(self) -> None:
        """Stop publishing (the server drains and reports NOT_SERVING itself)."""
        self._health, self._names = None, ()

    async def check_once(self) -> None:
        """Probe every dependency once, concurrently, and publish what changed."""
        await asyncio.gather(*(self._check(probe) for probe in self._probes))
        await self._publish()

    async def _check(self, probe: Probe) -> None:
        started = self._clock()
        # A probe that outlives its timeout is cancelled but not awaited: a client may take its
        # time to give up (psycopg waits for the server to confirm a cancelled query), and the
        # other probes and the readiness status must not wait for it. The next round waits on
        # the same probe again rather than piling up new ones.
        task = self._running.get(probe.name)
        if task is not None and task.done():
            # A probe given up on earlier that has stopped since: its outcome is stale.
            del self._running[probe.name]
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it as lost
            task = None
        if task is None:
            task = asyncio.create_task(_run(probe.check), name=f"probe-{probe.name}")
            self._running[probe.name] = task
        done, _ = await asyncio.wait({task}, timeout=self._settings.timeout_s)
        if not done:
            if not task.cancelling():  # once: a second cancel may cut its clean-up short
                task.cancel()
            self._failed(probe.name, started, "no answer within the probe's timeout")
            return
        del self._running[probe.name]
        if task.cancelled():
            self._failed(probe.name, started, "no answer within the probe's timeout")
            return
        error = task.exception()
        if error is None:
            self._succeeded(probe.name)
        else:  # any failure of a probe means "not usable now"
            self._failed(probe.name, started, _describe(error))

    def _failed(self, name: str, started: float, error: str) -> None:
        state = self._states[name]
        if state.failing_since is None:
            state.failing_since = started
        state.error = error
        if not state.down and self._clock() - state.failing_since >= self._settings.threshold_s:
            state.down = True
            DEPENDENCY_UP.labels(self._service, name).set(0)
            log.warning("%s: dependency %s is down: %s", self._service, name, error)

    def _succeeded(self, name: str) -> None:
        state = self._states[name]
        if state.down:
            log.info("%s: dependency %s is back", self._service, name)
            DEPENDENCY_UP.labels(self._service, name).set(1)
        state.failing_since, state.error, state.down = None, "", False

    async def _publish(self) -> None:
        servicer = self._health
        if servicer is None:
            return
        ready = self.ready
        if ready == self._published:
            return
        self._published = ready
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await servicer.set(name, status)

    async def _loop(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._settings.interval_s)


async def _run(check: Callable[[], Awaitable[object]]) -> object:
    return await check()


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer within the probe's timeout"
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300]


__all__ = ["DEPENDENCY_UP", "HealthSettings", "Probe", "Readiness"]
