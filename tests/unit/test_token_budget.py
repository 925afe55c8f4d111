"""Tokens per minute per tenant (services/gateway/token_budget.py), on a fake clock."""

from __future__ import annotations

import pytest

from mesh.errors import ResourceExhausted
from services.gateway.token_budget import DEFAULT_RESERVATION, TokenBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_tenant_gets_its_budget_and_then_waits_for_the_window() -> None:
    clock = Clock()
    budget = TokenBudget(100, clock)
    budget.reserve("a", 60)
    clock.now += 10
    budget.reserve("a", 40)
    with pytest.raises(ResourceExhausted) as refused:
        budget.reserve("a", 1)
    assert refused.value.reason == "TENANT_TOKEN_RATE"
    assert refused.value.quota_subject == "tenant:a"
    assert refused.value.retry_after_s == pytest.approx(50.0)  # when the first 60 leave
    budget.reserve("b", 100)  # another tenant's budget is its own
    clock.now += 50.5
    budget.reserve("a", 60)


def test_unused_tokens_go_back_when_the_turn_ends() -> None:
    budget = TokenBudget(100, Clock())
    reservation = budget.reserve("a", 100)
    assert reservation is not None
    reservation.settle(30)
    budget.reserve("a", 70)
    with pytest.raises(ResourceExhausted):
        budget.reserve("a", 1)


def test_a_turn_larger_than_the_budget_runs_alone_and_default_lengths_reserve_256() -> None:
    budget = TokenBudget(100, Clock())
    big = budget.reserve("a", 1000)
    assert big is not None and big.tokens == 1000
    default = TokenBudget(1000, Clock()).reserve("a", 0)
    assert default is not None and default.tokens == DEFAULT_RESERVATION


def test_no_limit_reserves_nothing() -> None:
    assert TokenBudget(0, Clock()).reserve("a", 10_000) is None
