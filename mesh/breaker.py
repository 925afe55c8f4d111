"""A circuit breaker: after repeated failures, stop calling a dependency for a while.

An optional dependency that is down (memory for recall, the persister for history) should cost
a turn nothing, not three timed-out attempts each. After ``failures_to_open`` failed calls in a
row the breaker opens and calls are skipped at once; after ``open_s`` one call is let through as
a probe, and its outcome closes the breaker or opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    """Counts consecutive failures of one dependency and says whether to call it now."""

    def __init__(
        self,
        *,
        failures_to_open: int = 3,
        open_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failures_to_open = failures_to_open
        self._open_s = open_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether to call now: always while closed; once open, one probe per ``open_s``."""
        if self._opened_at is None:
            return True
        if self._clock() - self._opened_at < self._open_s:
            return False
        self._opened_at = self._clock()  # this call is the probe; the next waits again
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._opened_at = None

    def failed(self) -> None:
        self._failures += 1
        if self._opened_at is not None or self._failures >= self._failures_to_open:
            self._opened_at = self._clock()


__all__ = ["CircuitBreaker"]
