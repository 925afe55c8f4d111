"""Tokens per minute per tenant: a sliding minute of generated tokens, on this gateway.

A turn reserves its ``max_tokens`` (``DEFAULT_RESERVATION`` when it leaves the agent's default)
when it starts and settles to the tokens it generated when it ends, so a tenant cannot start
more than its budget's worth of turns at once, and a turn that stops early gives the rest back.
A turn may always start when its tenant has nothing in the window, however large it is (else a
turn longer than the budget could never run). Turns that end while no stream of this gateway
follows them keep their reservation until it leaves the window: the safe side.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mesh.errors import ResourceExhausted

WINDOW_S = 60.0
# What a turn that asks for the agent's default length reserves (the agent's default is 256).
DEFAULT_RESERVATION = 256


@dataclass(eq=False)
class Reservation:
    at: float
    tokens: int

    def settle(self, generated: int) -> None:
        """The turn ended having generated ``generated`` tokens: the rest goes back."""
        self.tokens = max(0, min(self.tokens, generated))


class TokenBudget:
    """``per_minute`` tokens per tenant in any minute; 0 means no limit."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._spent: dict[str, deque[Reservation]] = {}

    def reserve(self, tenant: str, max_tokens: int) -> Reservation | None:
        """Reserve a turn's tokens, or raise RESOURCE_EXHAUSTED (TENANT_TOKEN_RATE)."""
        if self._per_minute <= 0:
            return None
        now = self._clock()
        spent = self._spent.setdefault(tenant, deque())
        while spent and spent[0].at <= now - WINDOW_S:
            spent.popleft()
        wanted = max_tokens or DEFAULT_RESERVATION
        used = sum(r.tokens for r in spent)
        if used and used + wanted > self._per_minute:
            raise ResourceExhausted(
                f"tenant {tenant!r} used {used} of its {self._per_minute} tokens per minute "
                f"(MESH_GATEWAY_TOKENS_PER_MINUTE_PER_TENANT) and this turn may take {wanted} "
                "more; retry later or ask for fewer tokens (max_tokens)",
                reason="TENANT_TOKEN_RATE",
                retry_after_s=self._retry_after(spent, used + wanted - self._per_minute, now),
                quota_subject=f"tenant:{tenant}",
            )
        reservation = Reservation(now, wanted)
        spent.append(reservation)
        return reservation

    @staticmethod
    def _retry_after(spent: deque[Reservation], excess: int, now: float) -> float:
        """Seconds until enough of the window's tokens leave it for ``excess`` to fit."""
        freed = 0
        for reservation in spent:
            freed += reservation.tokens
            if freed >= excess:
                return max(0.1, reservation.at + WINDOW_S - now)
        return WINDOW_S
