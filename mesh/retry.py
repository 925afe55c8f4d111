"""One retry helper: capped exponential backoff, and a loop that retries a call with it.

``Backoff`` is the delay policy alone, for loops that keep running and reset their delay when
they make progress (a log tail, a consumer that rejoins its group). ``retry`` is the whole loop
for one call: try, and after a failure worth retrying, wait and try again.

Only ``Exception`` is retried: cancellation (``asyncio.CancelledError``) and ``KeyboardInterrupt``
always pass through, so a retrying task still stops when it is told to.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

_T = TypeVar("_T")


class Backoff:
    """The waits of a retry loop: ``initial_s``, then ``factor`` times the last, at most ``max_s``.

    The first wait is ``initial_s`` even when it exceeds ``max_s``; the cap applies to the waits
    that grow from it. ``factor=1`` gives a constant delay.

    Args:
        initial_s: the first wait, and the wait after ``reset()``.
        max_s: the cap on later waits (none by default).
        factor: how much each wait grows.
    """

    def __init__(self, initial_s: float, *, max_s: float = math.inf, factor: float = 2.0) -> None:
        if initial_s < 0 or max_s < 0 or factor < 1:
            raise ValueError("backoff delays must be >= 0 and the factor >= 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._delay = initial_s

    @property
    def delay(self) -> float:
        """The next wait, in seconds (what a log line should say before ``wait()``)."""
        return self._delay

    def reset(self) -> None:
        """Start again from ``initial_s``: the loop made progress."""
        self._delay = self.initial_s

    def advance(self) -> float:
        """Return the next wait and grow the one after it, without sleeping."""
        delay = self._delay
        self._delay = min(delay * self.factor, self.max_s)
        return delay

    async def wait(self) -> None:
        """Sleep for the next wait, then grow it."""
        await asyncio.sleep(self.advance())


def _always(error: Exception) -> bool:
    return True


async def retry(
    call: Callable[[], Awaitable[_T]],
    *,
    backoff: Backoff,
    attempts: int | None = None,
    retry_if: Callable[[Exception], bool] = _always,
    on_retry: Callable[[int, Exception, float], object] | None = None,
) -> _T:
    """Await ``call()`` until it returns, waiting ``backoff`` between failed tries.

    Args:
        call: makes one try; called afresh for each.
        backoff: the waits between tries (not reset here: pass a fresh one per retried call).
        attempts: how many tries at most; ``None`` retries for as long as it takes.
        retry_if: whether a failure is worth another try; one it refuses is raised at once.
        on_retry: called as ``on_retry(attempt, error, delay)`` inside the ``except`` block
            (``log.exception`` works there) before each wait; ``attempt`` counts from 1.

    Returns:
        What the first successful try returned.

    Raises:
        Exception: the failure ``retry_if`` refused, or the last one when ``attempts`` ran out
            (no wait follows it).
    """
    if attempts is not None and attempts < 1:
        raise ValueError("attempts must be at least 1")
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as error:
            if not retry_if(error) or (attempts is not None and attempt >= attempts):
                raise
            if on_retry is not None:
                on_retry(attempt, error, backoff.delay)
        await backoff.wait()


__all__ = ["Backoff", "retry"]
