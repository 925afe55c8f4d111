"""Plain values the gateway core works with; the servicer and codec convert protos to these."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mesh.errors import MeshError
from mesh.generation import FinishReason, GenerationOptions


@dataclass(frozen=True, slots=True)
class StartRequest:
    conversation_id: str
    text: str
    options: GenerationOptions = field(default_factory=GenerationOptions)
    request_id: str = ""
    # Send the tokens that are ready together as one TokenRun frame.
    coalesce_tokens: bool = False


@dataclass(frozen=True, slots=True)
class TurnInfo:
    """What a gateway knows about a turn once its TurnRequested is found (or written)."""

    turn_id: str
    conversation_id: str
    tenant_id: str
    partition: int
    request_offset: int
    events_start: int


# -- events read from the turn-event log ---------------------------------------------------------


class EventKind(enum.IntEnum):
    STARTED = 1
    TOKEN = 2
    FINISHED = 3
    CANCELLED = 4


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    queued_ms: float = 0.0
    retrieval_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class TurnEventView:
    """One decoded record of the turn-event log; immutable and shared between subscribers."""

    kind: EventKind
    turn_id: str
    offset: int
    seq: int = 0
    text: str = ""
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    usage: Usage | None = None
    timings: Timings | None = None
    last_seq: int = 0
    model: str = ""
    # Serialized google.rpc.Status of a FINISH_REASON_ERROR turn (bytes keep the core pb-free).
    error_status: bytes = b""


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
class Finished:
    turn_id: str
    finish_reason: FinishReason
    last_seq: int
    usage: Usage | None = None
    timings: Timings | None = None
    error_status: bytes = b""


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


Output = Accepted | TokenOut | TokenRunOut | Finished | FrameError | TurnError


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
