"""Per-partition change counters that tasks wait on, so a tail sleeps until its partition grows.

Everything here runs on the event loop: the producer wakes the partitions it wrote, the poller
thread hands over the partitions other processes wrote, and tails and group members wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

Key = tuple[str, int]


class Changes:
    """Per-partition change counters that tasks wait on (loop thread only)."""

    def __init__(self, on_waiting: Callable[[bool], None]) -> None:
        self._versions: dict[Key, int] = {}
        self._waiters: dict[Key, set[asyncio.Future[None]]] = {}
        self._waiting = 0
        self._on_waiting = on_waiting

    def versions(self, keys: Iterable[Key]) -> dict[Key, int]:
        return {key: self._versions.get(key, 0) for key in keys}

    def wake_all(self) -> None:
        self.wake(list(self._waiters))

    def wake(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._versions[key] = self._versions.get(key, 0) + 1
            for waiter in self._waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self, seen: dict[Key, int], within_s: float) -> None:
        """Return once any key moved past ``seen`` (taken before the caller looked), or timeout."""
        if any(self._versions.get(key, 0) != version for key, version in seen.items()):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in seen:
            self._waiters.setdefault(key, set()).add(waiter)
        self._waiting += 1
        if self._waiting == 1:
            self._on_waiting(True)
        try:
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation that races
            # the waiter's completion, which hangs whoever is stopping the reading task.
            await asyncio.wait({waiter}, timeout=within_s)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._on_waiting(False)
            for key in seen:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[key]
