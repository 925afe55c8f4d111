"""Tokens per minute per tenant, and per key where the key sets its own: a sliding minute of
generated tokens, on this gateway.

A turn reserves its ``max_tokens`` (``DEFAULT_RESERVATION`` when it leaves the agent's default)
when it starts and settles to the tokens it generated when it ends, so a tenant cannot start
more than its budget's worth of turns at once, a turn that stops early gives the rest back, and
one that ran past its reservation (the agent's default length is configurable) counts in full.
A turn may always start when its subject has nothing in the window, however large it is (else a
turn longer than the budget could never run). Turns that end while no stream of this gateway
follows them keep their reservation until it leaves the window: the safe side.

A key with ``tokens_per_minute`` in the keys file (``mesh keys create --tokens-per-minute``) has
a budget of its own, enforced on top of its tenant's: a turn must fit both, and counts in both.
So one key that spends its budget leaves the tenant's other keys served, and a tenant can hand
out keys that share its budget without any one of them taking all of it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.errors import ResourceExhausted

WINDOW_S = 60.0
# What a turn that asks for the agent's default length reserves (the agent's default is 256).
DEFAULT_RESERVATION = 256


@dataclass(eq=False)
class _Spent:
    at: float
    tokens: int


class Reservation:
    """A turn's tokens in each budget it counts in (its tenant's, its key's)."""

    def __init__(self, entries: Sequence[_Spent]) -> None:
        self._entries = tuple(entries)

    @property
    def tokens(self) -> int:
        return self._entries[0].tokens

    def settle(self, generated: int) -> None:
        """The turn ended having generated ``generated`` tokens: what it really used counts,
        less than reserved (the rest goes back) or more (a turn of the agent's default length
        may run past the reservation)."""
        for entry in self._entries:
            entry.tokens = max(0, generated)


@dataclass(frozen=True, slots=True)
class _Budget:
    subject: str  # QuotaFailure's subject: ``tenant:<id>`` or ``key:<key id>``
    per_minute: int
    reason: str
    owner: str  # how the refusal names it
    setting: str  # where the limit is set


class TokenBudget:
    """``per_minute`` tokens per tenant in any minute (0: no limit), and a key's own
    ``tokens_per_minute`` when it has one."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._spent: dict[str, deque[_Spent]] = {}

    def reserve(
        self,
        tenant: str,
        max_tokens: int,
        *,
        key_id: str = "",
        key_per_minute: int | None = None,
    ) -> Reservation | None:
        """Reserve a turn's tokens in its key's budget (if the key has one) and its tenant's,
        or raise RESOURCE_EXHAUSTED (``KEY_TOKEN_RATE``, ``TENANT_TOKEN_RATE``) reserving
        nothing."""
        budgets: list[_Budget] = []
        if key_per_minute:
            budgets.append(
                _Budget(
                    f"key:{key_id}",
                    key_per_minute,
                    "KEY_TOKEN_RATE",
                    f"API key {key_id}",
                    "the key's tokens_per_minute in the keys file",
                )
            )
        if self._per_minute > 0:
            budgets.append(
                _Budget(
                    f"tenant:{tenant}",
                    self._per_minute,
                    "TENANT_TOKEN_RATE",
                    f"tenant {tenant!r}",
                    "MESH_GATEWAY_TOKENS_PER_MINUTE_PER_TENANT",
                )
            )
        if not budgets:
            return None
        now = self._clock()
        wanted = max_tokens or DEFAULT_RESERVATION
        # Every budget is checked before any is charged, so a refused turn costs nothing.
        for budget in budgets:
            spent = self._window(budget.subject, now)
            used = sum(entry.tokens for entry in spent)
            if used and used + wanted > budget.per_minute:
                raise ResourceExhausted(
                    f"{budget.owner} used {used} of its {budget.per_minute} tokens per minute "
                    f"({budget.setting}) and this turn may take {wanted} more; retry later or "
                    "ask for fewer tokens (max_tokens)",
                    reason=budget.reason,
                    retry_after_s=self._retry_after(spent, used + wanted - budget.per_minute, now),
                    quota_subject=budget.subject,
                )
        entries = []
        for budget in budgets:
            entry = _Spent(now, wanted)
            self._spent.setdefault(budget.subject, deque()).append(entry)
            entries.append(entry)
        return Reservation(entries)

    def _window(self, subject: str, now: float) -> deque[_Spent]:
        """The subject's reservations still in the window; one with none keeps no entry."""
        spent = self._spent.pop(subject, deque())
        while spent and spent[0].at <= now - WINDOW_S:
            spent.popleft()
        if spent:
            self._spent[subject] = spent
        return spent

    @staticmethod
    def _retry_after(spent: deque[_Spent], excess: int, now: float) -> float:
        """Seconds until enough of the window's tokens leave it for ``excess`` to fit."""
        freed = 0
        for reservation in spent:
            freed += reservation.tokens
            if freed >= excess:
                return max(0.1, reservation.at + WINDOW_S - now)
        return WINDOW_S
