"""What the gateway needs to accept a turn, probed in the background (``mesh.readiness``).

Readiness (the ``chat.gateway.v1.GatewayService`` health name) needs the request log writable
and the persister ready. Agents are tracked too but do not make the gateway unready: without an
agent, resuming, cancelling and reading conversations still work; only ``StartTurn`` is refused.
``StartGate.check`` is what ``StartTurn`` asks before it appends anything: a turn that cannot
start fails fast with UNAVAILABLE and a RetryInfo, instead of waiting in the log for an agent
that is not there.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mesh.client import ServiceClient
from mesh.errors import Unavailable
from mesh.log import AGENTS_GROUP, TURN_REQUESTS, EventLog
from mesh.readiness import HealthSettings, Probe, Readiness

PERSISTER_SERVICE = "chat.persister.v1.PersisterService"


class AgentCoverage:
    """When each request partition last had a live member of the agents' group."""

    def __init__(self, log: EventLog, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._clock = clock
        # Every partition counts as covered at start: agents may start after the gateway.
        self._started = clock()
        self._seen: dict[int, float] = {}

    async def refresh(self) -> None:
        partitions = await self._log.partition_count(TURN_REQUESTS)
        covered = await self._log.live_partitions(TURN_REQUESTS, AGENTS_GROUP)
        now = self._clock()
        for partition in covered:
            self._seen[partition] = now
        missing = set(range(partitions)) - covered
        if missing:
            raise ConnectionError(f"no agent consumes request partitions {sorted(missing)}")

    def uncovered_for(self, partition: int) -> float:
        """Seconds since an agent was last seen owning ``partition``."""
        return self._clock() - self._seen.get(partition, self._started)


class StartGate:
    """Refuses new turns the mesh cannot run now; built by ``gateway_readiness``."""

    def __init__(
        self,
        readiness: Readiness,
        agents: AgentCoverage,
        settings: HealthSettings,
        *,
        require_agent: bool = True,
        require_persister: bool = True,
    ) -> None:
        self.readiness = readiness
        self._agents = agents
        self._settings = settings
        self._require_agent = require_agent
        self._require_persister = require_persister

    def require_persister(self) -> None:
        """UNAVAILABLE while the persister has been down for longer than the threshold."""
        down = self.readiness.down("persister")
        if down is not None and self._require_persister:
            raise Unavailable(
                f"the conversation store (persister) is unavailable ({down}); retry shortly",
                reason="PERSISTER_UNAVAILABLE",
                retry_after_s=max(1.0, self._settings.interval_s),
            )

    def check(self, partition: int) -> None:
        """Return if a turn on request ``partition`` can start; UNAVAILABLE otherwise."""
        retry_after_s = max(1.0, self._settings.interval_s)
        down = self.readiness.down("log")
        if down is not None:
            raise Unavailable(
                f"the turn log is not writable ({down}); retry shortly",
                reason="LOG_UNAVAILABLE",
                retry_after_s=retry_after_s,
            )
        self.require_persister()
        missing_s = self._agents.uncovered_for(partition)
        if self._require_agent and missing_s > self._settings.threshold_s:
            raise Unavailable(
                f"no agent has consumed this conversation's partition for {missing_s:.0f}s, so "
                "the turn would not start; retry shortly",
                reason="NO_AGENT",
                retry_after_s=retry_after_s,
            )


def gateway_readiness(
    log: EventLog,
    persister: ServiceClient,
    settings: HealthSettings,
    *,
    require_agent: bool = True,
    require_persister: bool = True,
) -> StartGate:
    """The gateway's probes (log, persister, agents) and the gate ``StartTurn`` asks; start
    ``gate.readiness`` once the log's topics exist. Without ``require_persister`` the persister
    is tracked but decides neither readiness nor starts; without ``require_agent`` starts do
    not wait for an agent."""
    agents = AgentCoverage(log)

    async def persister_ready() -> None:
        await persister.check_ready(PERSISTER_SERVICE, timeout_s=settings.timeout_s)

    readiness = Readiness(
        "gateway",
        [
            Probe("log", lambda: log.check_writable(TURN_REQUESTS)),
            Probe("persister", persister_ready, required=require_persister),
            Probe("agents", agents.refresh, required=False),
        ],
        settings,
    )
    return StartGate(
        readiness,
        agents,
        settings,
        require_agent=require_agent,
        require_persister=require_persister,
    )


__all__ = ["PERSISTER_SERVICE", "AgentCoverage", "StartGate", "gateway_readiness"]
