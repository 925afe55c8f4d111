"""The turn log: its events, their one codec, and the rule for duplicate records.

Two topics make up the turn log (``mesh.log.TURN_REQUESTS`` and ``mesh.log.TURN_EVENTS``, see
docs/protocol.md). Their records are ``chat.events.v1`` protobufs; services see them only as the
frozen dataclasses here, one per message, converted by ``encode``/``decode_request``/
``decode_events``. A service that needs a narrower view derives it from these dataclasses.

Whenever a record repeats one already in the log (the same token ``seq`` of a turn, a second
``TurnFinished``), the first in log order wins; ``FirstWins`` is that rule. Before it, a
zombie agent's records are fenced off by attempt: ``Attempts`` is that rule.
"""

from mesh.turnlog._codec import UndecodableRecord, decode_events, decode_request, encode
from mesh.turnlog._events import (
    ClientAttached,
    ClientDetached,
    TokenEmitted,
    TurnCancelled,
    TurnEvent,
    TurnFinished,
    TurnRequested,
    TurnStarted,
)
from mesh.turnlog._order import Attempts, FirstWins

__all__ = [
    "Attempts",
    "ClientAttached",
    "ClientDetached",
    "FirstWins",
    "TokenEmitted",
    "TurnCancelled",
    "TurnEvent",
    "TurnFinished",
    "TurnRequested",
    "TurnStarted",
    "UndecodableRecord",
    "decode_events",
    "decode_request",
    "encode",
]
