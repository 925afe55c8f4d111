"""Turn ids that say where a turn lives in the logs (see docs/protocol.md)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from mesh.errors import InvalidArgument

_PATTERN = re.compile(r"^t(\d{1,6})\.(\d{1,19})\.(\d{1,19})\.([0-9a-f]{16})$")


@dataclass(frozen=True, slots=True)
class TurnRef:
    """Where a turn's records are: its partition and the offsets its records start at."""

    partition: int
    request_start: int
    events_start: int
    nonce: str

    def __str__(self) -> str:
        return f"t{self.partition}.{self.request_start}.{self.events_start}.{self.nonce}"


def new_turn_ref(partition: int, request_start: int, events_start: int) -> TurnRef:
    return TurnRef(partition, request_start, events_start, secrets.token_hex(8))


def parse_turn_id(turn_id: str, *, field: str = "turn_id") -> TurnRef:
    """Parse a turn id; a malformed one is INVALID_ARGUMENT naming ``field``."""
    if not turn_id:
        raise InvalidArgument(f"{field} is required", field=field, reason="TURN_ID_MISSING")
    match = _PATTERN.match(turn_id)
    if match is None:
        raise InvalidArgument(
            f"{field} {turn_id[:64]!r} is not a turn id issued by this mesh",
            field=field,
            reason="TURN_ID_MALFORMED",
        )
    return TurnRef(int(match[1]), int(match[2]), int(match[3]), match[4])
