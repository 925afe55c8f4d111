"""Plain values the gateway core works with; the servicer converts protos to these.

Log records are ``mesh.turnlog`` dataclasses; the core reads them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.errors import MeshError
from mesh.generation import FinishReason, GenerationOptions, TokenUsage, TurnTimings


@dataclass(frozen=True, slots=True)
class StartRequest:
    conversation_id: str
    text: str
    options: GenerationOptions = field(default_factory=GenerationOptions)
    request_id: str = ""
    # Send the tokens that are ready together as one TokenRun frame.
    coalesce_tokens: bool = False
    # Run to the end with no client attached (otherwise cancelled after the orphan grace period).
    background: bool = False
    # What a retry with the same request_id must repeat, when the start is derived from what
    # the client sent rather than sent as such (the HTTP API: a digest of its JSON body); empty:
    # the start itself (``idempotency.fingerprint``).
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class TurnInfo:
    """What a gateway knows about a turn once its TurnRequested is found (or written)."""

    turn_id: str
    conversation_id: str
    tenant_id: str
    partition: int
    request_offset: int
    events_start: int


# -- what a stream sends out -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    turn_id: str
    conversation_id: str
    queue_position: int


@dataclass(frozen=True, slots=True)
class TokenOut:
    turn_id: str
    seq: int
    text: str


@dataclass(slots=True)
class TokenRunOut:
    """Consecutive tokens for a stream that coalesces: ``texts[i]`` has seq ``first_seq + i``."""

    turn_id: str
    first_seq: int
    texts: list[str]


@dataclass(frozen=True, slots=True)
class FinishedOut:
    """The stream's last frame for a turn (``chat.gateway.v1.TurnFinished``)."""

    turn_id: str
    finish_reason: FinishReason
    last_seq: int
    usage: TokenUsage | None = None
    timings: TurnTimings | None = None
    error_status: bytes = b""
    # (source, reason) of each context source the reply was generated without.
    context_skipped: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class FrameError:
    """A Chat frame failed; the stream stays open."""

    error: MeshError
    turn_id: str = ""


@dataclass(frozen=True, slots=True)
class TurnError:
    """A turn ended with an agent-side error (the status the agent logged)."""

    status: bytes
    turn_id: str


Output = Accepted | TokenOut | TokenRunOut | FinishedOut | FrameError | TurnError


# -- Chat frames coming in -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartFrame:
    start: StartRequest


@dataclass(frozen=True, slots=True)
class CancelFrame:
    turn_id: str = ""


@dataclass(frozen=True, slots=True)
class ResumeFrame:
    turn_id: str
    after_seq: int = 0
    coalesce_tokens: bool = False


@dataclass(frozen=True, slots=True)
class CreditFrame:
    tokens: int


@dataclass(frozen=True, slots=True)
class EmptyFrame:
    """A ChatRequest with no frame set (a client bug, reported but not fatal)."""


Frame = StartFrame | CancelFrame | ResumeFrame | CreditFrame | EmptyFrame
