"""One async start/stop shape for every resource: a client, a store, a worker, a model.

A resource opens in ``start()`` and lets go in ``stop()``; ``async with resource:`` is the same
pair around a block. Long-lived owners (a service's ``serve``) call the two directly or push them
on an ``AsyncExitStack``; tests use ``async with``.
"""

from __future__ import annotations

from typing import Protocol, Self


class AsyncResource(Protocol):
    """What a caller may do with a resource: start it, stop it, or ``async with`` it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


class AsyncStartStop:
    """Mixin: ``async with`` for a class that defines ``start()`` and ``stop()``.

    ``__aenter__`` starts and returns the resource; ``__aexit__`` stops it whether the block
    raised or not, and never swallows the block's exception. A ``start()`` that raises must
    clean up after itself: ``__aexit__`` does not run then.
    """

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = ["AsyncResource", "AsyncStartStop"]
