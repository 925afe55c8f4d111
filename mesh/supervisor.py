"""Restarting the mesh's services when they exit, as a process supervisor would.

A service that exits is started again after a backoff that doubles with each quick exit (0.5 s,
1 s, 2 s, ... up to a cap) and starts over once a service has stayed up for a while, like
Kubernetes' CrashLoopBackOff. A restart budget bounds it: a service that exits more often than
that within the window is left down and reported, so that a broken configuration does not spin
for ever. The others are never touched: the log keeps every turn, so a restarted agent takes its
turns back and a restarted persister goes on from its committed offsets.

The supervisor owns no processes; ``check`` is called from the launcher's watch loop, and a
``respawn`` callback starts a service again with its own command line, environment and ports, so
that its peers' addresses stay valid.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

RESTARTS = Counter(
    "mesh_launcher_restarts", "Services the launcher started again after they exited", ["service"]
)
GAVE_UP = Gauge(
    "mesh_launcher_gave_up",
    "1 while a service is left down because it used up its restart budget",
    ["service"],
)


class Supervised(Protocol):
    """What the supervisor needs of a service: its name and whether (how) it exited."""

    @property
    def name(self) -> str: ...

    def exit_code(self) -> int | None: ...


# A service up at least this long counts as stable: its next exit is treated as a first one.
STABLE_AFTER_S = 60.0


@dataclass(frozen=True)
class RestartPolicy:
    """How soon, and how often, an exited service is started again: the first wait, doubled
    by each quick exit up to the longest, and at most ``budget`` restarts within ``window_s``
    (one more exit leaves the service down)."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    budget: int = 5
    window_s: float = 600.0


@dataclass
class _State:
    started_at: float
    backoff_s: float = 0.0
    restart_at: float | None = None  # set while an exited service waits for its restart
    restarts: deque[float] = field(default_factory=deque)
    gave_up: bool = False


class Supervisor:
    """Decides when an exited service is started again; ``check`` acts on it."""

    def __init__(
        self,
        respawn: Callable[[str], object],
        *,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._respawn = respawn
        self._policy = policy or RestartPolicy()
        self._clock = clock
        self._states: dict[str, _State] = {}

    def restarts(self, name: str) -> int:
        """How many times ``name`` was started again (within the budget window or not)."""
        state = self._states.get(name)
        return 0 if state is None else len(state.restarts)

    def gave_up(self, name: str) -> bool:
        state = self._states.get(name)
        return state is not None and state.gave_up

    def check(self, services: Iterable[Supervised]) -> list[str]:
        """Note exits, start again the services whose backoff has passed; returns their names."""
        now = self._clock()
        restarted = []
        for service in services:
            state = self._states.setdefault(service.name, _State(started_at=now))
            code = service.exit_code()
            if code is None or state.gave_up:
                continue
            if state.restart_at is None:
                self._schedule(service.name, state, code, now)
            elif now >= state.restart_at:
                self._respawn(service.name)
                state.restart_at = None
                state.started_at = now
                state.restarts.append(now)
                RESTARTS.labels(service.name).inc()
                log.warning("%s started again (restart %d)", service.name, len(state.restarts))
                restarted.append(service.name)
        return restarted

    def _schedule(self, name: str, state: _State, code: int, now: float) -> None:
        policy = self._policy
        recent = [at for at in state.restarts if now - at < policy.window_s]
        if len(recent) >= policy.budget:
            state.gave_up = True
            GAVE_UP.labels(name).set(1)
            log.error(
                "%s exited (%d) after %d restarts within %.0f s; leaving it down",
                name,
                code,
                len(recent),
                policy.window_s,
            )
            return
        if now - state.started_at >= STABLE_AFTER_S or state.backoff_s == 0.0:
            state.backoff_s = policy.initial_backoff_s
        else:
            state.backoff_s = min(state.backoff_s * 2, policy.max_backoff_s)
        state.restart_at = now + state.backoff_s
        log.warning("%s exited (%d); starting it again in %.1f s", name, code, state.backoff_s)


__all__ = ["GAVE_UP", "RESTARTS", "STABLE_AFTER_S", "RestartPolicy", "Supervised", "Supervisor"]
