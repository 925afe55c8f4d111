"""``mesh.lifecycle.AsyncStartStop``: ``async with`` runs start and stop around the block."""

from __future__ import annotations

import pytest

from mesh.lifecycle import AsyncResource, AsyncStartStop


class Recorder(AsyncStartStop):
    def __init__(self, *, fail_start: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_start = fail_start

    async def start(self) -> None:
        self.calls.append("start")
        if self.fail_start:
            raise RuntimeError("cannot start")

    async def stop(self) -> None:
        self.calls.append("stop")


async def test_async_with_starts_returns_itself_and_stops() -> None:
    resource = Recorder()
    async with resource as entered:
        assert entered is resource
        assert resource.calls == ["start"]
    assert resource.calls == ["start", "stop"]


async def test_stops_when_the_block_raises_and_keeps_the_error() -> None:
    resource = Recorder()
    with pytest.raises(ValueError, match="in the block"):
        async with resource:
            raise ValueError("in the block")
    assert resource.calls == ["start", "stop"]


async def test_a_failed_start_does_not_stop() -> None:
    resource = Recorder(fail_start=True)
    with pytest.raises(RuntimeError, match="cannot start"):
        async with resource:
            pytest.fail("the block must not run")
    assert resource.calls == ["start"]


async def test_start_and_stop_must_be_defined() -> None:
    with pytest.raises(NotImplementedError):
        async with AsyncStartStop():
            pass


def test_a_mixin_user_is_an_async_resource() -> None:
    resource: AsyncResource = Recorder()  # mypy checks the protocol; this checks it imports
    assert isinstance(resource, AsyncStartStop)
