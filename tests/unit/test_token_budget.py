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


def test_a_turn_that_ran_past_its_reservation_counts_in_full() -> None:
    budget = TokenBudget(1000, Clock())
    reservation = budget.reserve("a", 0)  # the agent's default length: 256 reserved
    assert reservation is not None
    reservation.settle(900)  # the agent's default was set higher
    with pytest.raises(ResourceExhausted):
        budget.reserve("a", 200)


def test_a_key_with_its_own_budget_is_refused_while_another_key_of_its_tenant_is_served() -> None:
    clock = Clock()
    budget = TokenBudget(0, clock)  # no tenant limit: only the key's own
    budget.reserve("a", 80, key_id="k1", key_per_minute=100)
    clock.now += 5
    with pytest.raises(ResourceExhausted) as refused:
        budget.reserve("a", 30, key_id="k1", key_per_minute=100)
    assert refused.value.reason == "KEY_TOKEN_RATE"
    assert refused.value.quota_subject == "key:k1"
    assert refused.value.retry_after_s == pytest.approx(55.0)
    assert "API key k1 used 80 of its 100 tokens per minute" in refused.value.message
    # The tenant's other keys, with or without a budget of their own, are served.
    budget.reserve("a", 1000, key_id="k2")
    budget.reserve("a", 90, key_id="k3", key_per_minute=100)
    clock.now += 55.5
    budget.reserve("a", 30, key_id="k1", key_per_minute=100)


def test_a_key_budget_counts_in_its_tenant_budget_too() -> None:
    budget = TokenBudget(100, Clock())
    budget.reserve("a", 60, key_id="k1", key_per_minute=1000)
    with pytest.raises(ResourceExhausted) as refused:
        budget.reserve("a", 50, key_id="k2", key_per_minute=1000)
    assert refused.value.reason == "TENANT_TOKEN_RATE"
    assert refused.value.quota_subject == "tenant:a"


def test_a_refused_turn_reserves_nothing_and_a_settled_turn_settles_both() -> None:
    budget = TokenBudget(100, Clock())
    first = budget.reserve("a", 40, key_id="k1", key_per_minute=50)
    with pytest.raises(ResourceExhausted) as refused:
        budget.reserve("a", 20, key_id="k1", key_per_minute=50)  # the key's budget is full
    assert refused.value.reason == "KEY_TOKEN_RATE"
    budget.reserve("a", 60, key_id="k2")  # so the tenant's 40 + 60 still fit
    assert first is not None
    first.settle(10)  # 30 tokens go back to both budgets
    budget.reserve("a", 30, key_id="k1", key_per_minute=50)
