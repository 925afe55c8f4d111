"""The supervisor's restart decisions, on a fake clock and fake services."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.supervisor import RESTARTS, STABLE_AFTER_S, RestartPolicy, Supervisor


@dataclass
class FakeService:
    name: str
    code: int | None = None

    def exit_code(self) -> int | None:
        return self.code


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(policy: RestartPolicy | None = None) -> tuple[Supervisor, Clock, list[str], FakeService]:
    clock = Clock()
    started: list[str] = []
    service = FakeService("agent-1")

    def respawn(name: str) -> None:
        started.append(name)
        service.code = None

    return Supervisor(respawn, policy=policy, clock=clock), clock, started, service


def test_an_exited_service_is_started_again_after_the_backoff_and_others_are_left_alone() -> None:
    supervisor, clock, started, agent = make()
    gateway = FakeService("gateway-1")
    supervisor.check([agent, gateway])
    agent.code = -9
    assert supervisor.check([agent, gateway]) == []  # noticed: restart due in 0.5 s
    clock.now += 0.4
    assert supervisor.check([agent, gateway]) == []
    before = RESTARTS.labels("agent-1")._value.get()
    clock.now += 0.1
    assert supervisor.check([agent, gateway]) == ["agent-1"]
    assert started == ["agent-1"]
    assert supervisor.restarts("agent-1") == 1
    assert supervisor.restarts("gateway-1") == 0
    assert RESTARTS.labels("agent-1")._value.get() == before + 1


def test_quick_exits_double_the_backoff_up_to_the_cap_and_a_stable_run_resets_it() -> None:
    policy = RestartPolicy(initial_backoff_s=1.0, max_backoff_s=3.0, budget=100)
    supervisor, clock, started, agent = make(policy)
    waits = []
    for _ in range(4):
        agent.code = 1
        supervisor.check([agent])
        noticed = clock.now
        while not supervisor.check([agent]):
            clock.now += 0.25
        waits.append(clock.now - noticed)
        clock.now += 1.0  # a quick exit: up for 1 s only
    assert waits == [1.0, 2.0, 3.0, 3.0]
    clock.now += STABLE_AFTER_S  # up long enough: the next exit is a first one again
    agent.code = 1
    supervisor.check([agent])
    noticed = clock.now
    while not supervisor.check([agent]):
        clock.now += 0.25
    assert clock.now - noticed == 1.0


def test_a_service_that_uses_up_its_budget_is_left_down() -> None:
    policy = RestartPolicy(initial_backoff_s=0.0, budget=2, window_s=100.0)
    supervisor, clock, started, agent = make(policy)
    for _ in range(2):
        agent.code = 1
        supervisor.check([agent])
        assert supervisor.check([agent]) == ["agent-1"]
        clock.now += 1.0
    agent.code = 1
    supervisor.check([agent])
    clock.now += 10.0
    assert supervisor.check([agent]) == []
    assert supervisor.gave_up("agent-1")
    assert started == ["agent-1", "agent-1"]


def test_restarts_older_than_the_window_do_not_count_against_the_budget() -> None:
    policy = RestartPolicy(initial_backoff_s=0.0, budget=1, window_s=50.0)
    supervisor, clock, started, agent = make(policy)
    agent.code = 1
    supervisor.check([agent])
    assert supervisor.check([agent]) == ["agent-1"]
    clock.now += 60.0
    agent.code = 1
    supervisor.check([agent])
    assert supervisor.check([agent]) == ["agent-1"]
    assert not supervisor.gave_up("agent-1")
