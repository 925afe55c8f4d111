"""One frozen dataclass per message of ``chat.events.v1`` (proto/chat/events/v1/events.proto).

Field names and meanings are those of the proto; the few that differ say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.generation import FinishReason, GenerationOptions, TokenUsage, TurnTimings


@dataclass(frozen=True, slots=True)
class TurnRequested:
    """A turn accepted by a gateway: the record of the request log."""

    turn_id: str
    conversation_id: str = ""
    tenant_id: str = ""
    user_text: str = ""
    options: GenerationOptions = field(default_factory=GenerationOptions)
    request_id: str = ""
    # Nanoseconds since the epoch; None when the record carries no ``accepted_at``.
    accepted_at_ns: int | None = None
    events_start_offset: int = 0
    events_partition: int = 0
    background: bool = False
    key_id: str = ""  # the API key that started it (its safe id); "" when unknown


@dataclass(frozen=True, slots=True)
class TurnStarted:
    """An agent claimed the turn."""

    turn_id: str
    conversation_id: str = ""
    tenant_id: str = ""
    agent_id: str = ""
    request_partition: int = 0
    request_offset: int = 0
    resumed_after_seq: int = 0
    # 1 for the first agent, one more for each takeover; 0 in records from before attempts.
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class TokenEmitted:
    """One piece of generated text; ``seq`` counts the turn's tokens from 1.

    ``more`` are the texts of the tokens ``seq + 1``, ``seq + 2``, ... appended in the same
    record (an agent groups tokens the log has not taken yet). ``decode_events`` returns such a
    record as one ``TokenEmitted`` per token, so readers never see ``more`` set.
    """

    turn_id: str
    seq: int
    text: str
    conversation_id: str = ""
    tenant_id: str = ""
    more: tuple[str, ...] = ()
    attempt: int = 0  # the attempt of the TurnStarted this token belongs to


@dataclass(frozen=True, slots=True)
class TurnFinished:
    """The end of a turn; the first one in log order is the one that counts."""

    turn_id: str
    # A ``chat.common.v1.FinishReason`` number as the record holds it: a reason newer than this
    # code survives being stored and read back (``mesh.codec.finish_reason_from_proto`` reads it).
    finish_reason: int = FinishReason.UNSPECIFIED
    usage: TokenUsage = field(default_factory=TokenUsage)
    timings: TurnTimings = field(default_factory=TurnTimings)
    # The serialized ``google.rpc.Status`` of a FINISH_REASON_ERROR turn; empty when none. Bytes
    # keep this model free of protobuf types.
    error_status: bytes = b""
    conversation_id: str = ""
    tenant_id: str = ""
    last_seq: int = 0
    model: str = ""
    cancel_seen_at_seq: int = 0
    # (source, reason) of each context source the turn was generated without.
    context_skipped: tuple[tuple[str, str], ...] = ()
    attempt: int = 0  # the attempt of the TurnStarted this finish belongs to


@dataclass(frozen=True, slots=True)
class TurnCancelled:
    """A client asked to stop the turn."""

    turn_id: str
    conversation_id: str = ""
    tenant_id: str = ""


@dataclass(frozen=True, slots=True)
class ClientAttached:
    """A client started following the turn (a resume or a retried start) on a gateway."""

    turn_id: str
    conversation_id: str = ""
    tenant_id: str = ""
    gateway_id: str = ""


@dataclass(frozen=True, slots=True)
class ClientDetached:
    """A client stopped following the turn before it ended."""

    turn_id: str
    conversation_id: str = ""
    tenant_id: str = ""
    gateway_id: str = ""


# The records of the turn-event log (the ``TurnEvent`` envelope's oneof).
TurnEvent = (
    TurnStarted | TokenEmitted | TurnFinished | TurnCancelled | ClientAttached | ClientDetached
)
