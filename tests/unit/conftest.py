"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits the code under test asks ``asyncio.sleep`` for, recorded instead of slept."""
    waited: list[float] = []

    async def fake_sleep(delay: float) -> None:
        waited.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return waited
