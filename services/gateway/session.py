"""One bidirectional Chat stream: a sequence of turns, with cancel, resume and credit between."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from opentelemetry.context import Context

from mesh.auth import Principal
from mesh.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, MeshError
from services.gateway.model import (
    CancelFrame,
    CreditFrame,
    Frame,
    FrameError,
    Output,
    ResumeFrame,
    StartFrame,
)
from services.gateway.turn_stream import MAX_CREDIT, TurnStream, gateway_stopping

if TYPE_CHECKING:
    # Only a type here: the core builds sessions (``GatewayCore.chat_session``).
    from services.gateway.core import GatewayCore

# Chat frames read ahead of the session; beyond that, gRPC flow control pushes back on the client.
CONTROL_QUEUE = 64


class ChatSession:
    """One Chat stream: a sequence of turns, with cancel, resume and credit frames in between.

    Frames are read by a task into a small queue; the session's loop handles them between
    outputs, so a cancel is logged even while tokens stream. A frame that fails yields a
    FrameError and the stream goes on. Each turn starts with ``initial_window`` tokens of credit;
    FlowCredit frames add to the current turn's credit.

    ``verify`` re-checks the stream's key before each frame is acted on (``KeyStore.verify``):
    a key revoked or expired while the stream is open ends the stream with UNAUTHENTICATED at
    its next frame, rather than serving turns on a key that no longer exists.
    """

    def __init__(
        self,
        core: GatewayCore,
        principal: Principal,
        *,
        verify: Callable[[Principal], None] | None = None,
        trace_parent: Context | None = None,
    ) -> None:
        self._core = core
        self._trace_parent = trace_parent
        self._principal = principal
        self._verify = verify
        self._wake = asyncio.Event()
        self._control: asyncio.Queue[Frame] = asyncio.Queue(CONTROL_QUEUE)
        self._turn: TurnStream | None = None
        self._credit = 0
        self._had_turn = False
        self._reader_done = False
        self._reader_error: BaseException | None = None

    async def _read(self, frames: AsyncIterator[Frame]) -> None:
        try:
            async for frame in frames:
                await self._control.put(frame)
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the client's side failed; the handler re-raises it
            self._reader_error = error
        finally:
            self._reader_done = True
            self._wake.set()

    async def run(self, frames: AsyncIterator[Frame]) -> AsyncIterator[Output]:
        reader = asyncio.create_task(self._read(frames), name="gateway-chat-reader")
        poll_s = self._core.settings.queue_poll_s
        idle_s = self._core.settings.stream_idle_timeout_s
        control = self._control
        try:
            while True:
                while not control.empty():
                    for output in await self._handle(control.get_nowait()):
                        yield output
                turn = self._turn
                if turn is not None:
                    outputs, used = turn.drain(self._credit)
                    if outputs:
                        self._credit -= used
                        for output in outputs:
                            yield output
                        if turn.done:
                            self._turn = None
                        continue
                    if not turn.has_pending and turn.sub.ready():
                        await turn.fill()
                        continue
                    if turn.sub.closed:
                        raise gateway_stopping()
                elif self._reader_done and control.empty():
                    if self._reader_error is not None:
                        raise self._reader_error
                    return
                self._wake.clear()
                if not control.empty() or (turn is not None and turn.ready(self._credit)):
                    continue
                if turn is not None and turn.waiting:
                    try:
                        async with asyncio.timeout(poll_s):
                            await self._wake.wait()
                    except TimeoutError:
                        accepted = await turn.refresh_position()
                        if accepted is not None:
                            yield accepted
                elif turn is None and idle_s > 0:
                    # No turn and no frame: an idle stream holds a slot of the tenant's limit.
                    try:
                        async with asyncio.timeout(idle_s):
                            await self._wake.wait()
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"this Chat stream had no turn and no frame for {idle_s:g} s "
                            "(MESH_GATEWAY_STREAM_IDLE_TIMEOUT_S); open a new stream when you "
                            "need one",
                            reason="STREAM_IDLE",
                        ) from None
                else:
                    await self._wake.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if self._turn is not None:
                self._turn.close()
                self._turn = None

    async def _handle(self, frame: Frame) -> list[Output]:
        if self._verify is not None:
            # Not a frame error: the stream's credentials are gone, so the stream ends.
            self._verify(self._principal)
        try:
            return await self._dispatch(frame)
        except MeshError as error:
            turn_id = getattr(frame, "turn_id", "") or (self._turn.turn_id if self._turn else "")
            return [FrameError(error, turn_id)]

    async def _dispatch(self, frame: Frame) -> list[Output]:
        core, principal, turn = self._core, self._principal, self._turn
        if isinstance(frame, CreditFrame):
            if frame.tokens <= 0:
                raise InvalidArgument(
                    f"credit.tokens={frame.tokens} must be positive",
                    reason="CREDIT_INVALID",
                    field="credit.tokens",
                )
            if not self._had_turn:
                raise _no_active_turn("credit")
            if turn is not None:
                self._credit = min(MAX_CREDIT, self._credit + frame.tokens)
            # Credit racing the end of a turn is harmless and ignored.
            return []
        if isinstance(frame, CancelFrame):
            if frame.turn_id and (turn is None or frame.turn_id != turn.turn_id):
                await core.cancel_turn(principal, frame.turn_id)
            elif turn is not None:
                await core.cancel(turn.info)
            elif not self._had_turn:
                raise _no_active_turn("cancel")
            return []
        if isinstance(frame, StartFrame | ResumeFrame):
            if turn is not None:
                raise FailedPrecondition(
                    f"turn {turn.turn_id} is still running on this stream; cancel it or wait for "
                    "its TurnFinished before starting another",
                    reason="TURN_IN_PROGRESS",
                )
            if isinstance(frame, StartFrame):
                new = await core.start_turn(
                    principal, frame.start, notify=self._wake, trace_parent=self._trace_parent
                )
            else:
                new = await core.resume_turn(
                    principal,
                    frame.turn_id,
                    frame.after_seq,
                    notify=self._wake,
                    coalesce=frame.coalesce_tokens,
                )
            self._turn = new
            self._had_turn = True
            self._credit = core.settings.initial_window
            return []
        raise InvalidArgument(
            "ChatRequest carried no frame: set start, cancel, resume or credit",
            reason="FRAME_EMPTY",
        )


def _no_active_turn(what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{what} sent before any turn was started or resumed on this stream",
        reason="NO_ACTIVE_TURN",
    )
