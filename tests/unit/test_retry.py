"""``mesh.retry``: the backoff delays and caps, and what ``retry`` retries, raises and waits."""

from __future__ import annotations

import asyncio
import sys

import pytest

from mesh.retry import Backoff, retry


class Flaky:
    """Fails with the given errors in turn, then returns ``"done"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


# -- Backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.1, max_s=1.0)
    assert [backoff.advance() for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_backoff_without_a_cap_grows_like_base_times_two_to_the_attempt() -> None:
    backoff = Backoff(0.2)
    assert [backoff.advance() for _ in range(5)] == [0.2 * 2**n for n in range(5)]


def test_backoff_reset_starts_from_the_initial_delay() -> None:
    backoff = Backoff(0.1, max_s=5.0)
    for _ in range(4):
        backoff.advance()
    assert backoff.delay == pytest.approx(1.6)
    backoff.reset()
    assert backoff.delay == 0.1
    assert backoff.advance() == 0.1
    assert backoff.delay == 0.2


def test_backoff_first_wait_may_exceed_the_cap() -> None:
    # As the loops it replaced: the cap applies to the waits that grow from the first.
    backoff = Backoff(0.1, max_s=0.05)
    assert [backoff.advance() for _ in range(3)] == [0.1, 0.05, 0.05]


def test_backoff_factor_one_is_a_constant_delay() -> None:
    backoff = Backoff(1.0, factor=1.0)
    assert [backoff.advance() for _ in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("initial", "cap", "factor"), [(-0.1, 1.0, 2.0), (0.1, -1.0, 2.0), (0.1, 1.0, 0.5)]
)
def test_backoff_rejects_nonsense(initial: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, max_s=cap, factor=factor)


async def test_backoff_wait_sleeps_the_delay_then_grows(sleeps: list[float]) -> None:
    backoff = Backoff(0.5, max_s=1.5)
    for _ in range(4):
        await backoff.wait()
    assert sleeps == [0.5, 1.0, 1.5, 1.5]


# -- retry ------------------------------------------------------------------------------------


async def test_retry_returns_after_transient_failures_with_backoff_delays(
    sleeps: list[float],
) -> None:
    call = Flaky(*(RuntimeError(f"fail {n}") for n in range(6)))
    result = await retry(call, backoff=Backoff(0.1, max_s=1.0))
    assert result == "done"
    assert call.calls == 7
    assert sleeps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


async def test_retry_gives_up_after_attempts_with_the_last_error_and_no_last_wait(
    sleeps: list[float],
) -> None:
    call = Flaky(*(RuntimeError(f"fail {n}") for n in range(10)))
    with pytest.raises(RuntimeError, match="fail 4"):
        await retry(call, backoff=Backoff(0.1), attempts=5)
    assert call.calls == 5
    assert sleeps == [0.1, 0.2, 0.4, 0.8]


async def test_retry_with_one_attempt_never_waits(sleeps: list[float]) -> None:
    call = Flaky(RuntimeError("once"))
    with pytest.raises(RuntimeError, match="once"):
        await retry(call, backoff=Backoff(0.1), attempts=1)
    assert sleeps == []


async def test_retry_raises_a_refused_error_at_once(sleeps: list[float]) -> None:
    call = Flaky(ConnectionError("transient"), ValueError("permanent"))
    with pytest.raises(ValueError, match="permanent"):
        await retry(
            call,
            backoff=Backoff(0.1),
            retry_if=lambda error: isinstance(error, ConnectionError),
        )
    assert call.calls == 2
    assert sleeps == [0.1]


async def test_on_retry_sees_attempt_error_and_delay_inside_the_except_block(
    sleeps: list[float],
) -> None:
    seen: list[tuple[int, str, float, bool]] = []

    def on_retry(attempt: int, error: Exception, delay: float) -> None:
        # log.exception needs the exception being handled.
        seen.append((attempt, str(error), delay, sys.exc_info()[1] is error))

    call = Flaky(RuntimeError("a"), RuntimeError("b"))
    assert await retry(call, backoff=Backoff(0.25, max_s=0.3), on_retry=on_retry) == "done"
    assert seen == [(1, "a", 0.25, True), (2, "b", 0.3, True)]
    assert sleeps == [0.25, 0.3]


async def test_on_retry_is_not_called_for_the_error_that_ends_the_retries(
    sleeps: list[float],
) -> None:
    attempts: list[int] = []
    call = Flaky(RuntimeError("a"), RuntimeError("b"), RuntimeError("c"))
    with pytest.raises(RuntimeError, match="b"):
        await retry(
            call, backoff=Backoff(0.1), attempts=2, on_retry=lambda a, e, d: attempts.append(a)
        )
    assert attempts == [1]


async def test_cancellation_is_never_retried(sleeps: list[float]) -> None:
    call = Flaky(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await retry(call, backoff=Backoff(0.1))
    assert call.calls == 1
    assert sleeps == []


async def test_retry_rejects_zero_attempts() -> None:
    with pytest.raises(ValueError):
        await retry(Flaky(), backoff=Backoff(0.1), attempts=0)


async def test_a_retried_task_stops_when_cancelled_during_a_wait() -> None:
    called = asyncio.Event()
    calls = 0

    async def always_fails() -> None:
        nonlocal calls
        calls += 1
        called.set()
        raise RuntimeError("down")

    task = asyncio.create_task(retry(always_fails, backoff=Backoff(60.0)))
    await called.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
