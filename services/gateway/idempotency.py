"""Idempotent starts across gateways: a ``request_id`` names one turn, whichever gateway is asked.

This gateway's ``caches.IdempotencyCache`` answers a retry it saw itself without a round trip.
Every other retry (another gateway, this one after a restart) is decided by a claim at the
persister (``services/persister/claims.py``), made after the turn id is known and before its
request is appended:

- won: the start goes on as if there were no request id;
- lost: the retry attaches to the winner's turn, once that turn is on the log. A claim younger
  than ``takeover_after_s`` may still be on its way to the log (the winner's append is in
  flight), so the loser waits for it; an older one whose turn is not on the log was made by a
  gateway that died before its append, and the retry takes it over (compare-and-swap on the
  turn id, so of two such retries one wins and the other attaches to it).

A retry that asks for something else than the original (another conversation, text or options)
is refused: FAILED_PRECONDITION, reason REQUEST_ID_REUSED, as with the idempotency keys of
payment APIs; a client that means a new turn sends a new request id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from prometheus_client import Counter

from mesh.errors import FailedPrecondition, MeshError, NotFound, Unavailable
from services.gateway.caches import BoundedLru
from services.gateway.model import StartRequest, TurnInfo

# Starts with a request id decided at the persister: ``won`` (appended), ``attached`` (to the
# winner's turn), ``taken_over`` (an abandoned claim), ``reused`` (refused: another body).
CLAIMS = Counter(
    "mesh_gateway_request_id_claims_total",
    "Starts with a request_id decided by a claim at the persister, by outcome.",
    ["outcome"],
)


@dataclass(frozen=True, slots=True)
class Claim:
    """The claim that holds for a request id (``ClaimRequestIdResponse``)."""

    won: bool
    turn_id: str
    conversation_id: str
    fingerprint: str
    age_s: float


class RequestClaims(Protocol):
    """Where claims are made: the persister (``PersisterClient.claim_request_id``)."""

    async def claim_request_id(
        self,
        *,
        tenant_id: str,
        request_id: str,
        turn_id: str,
        conversation_id: str,
        fingerprint: str,
        replace_turn_id: str,
        timeout_s: float,
    ) -> Claim:
        """The claim that holds after this one; raises Unavailable when it cannot be made
        within ``timeout_s``."""
        ...


class ClaimedElsewhere(Exception):
    """Raised instead of appending: the request id already names another turn."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(f"request id claimed by turn {claim.turn_id}")
        self.claim = claim


def fingerprint(request: StartRequest) -> str:
    """A digest of what the client asked for: a true retry has the same one.

    Delivery preferences (``coalesce_tokens``) are left out: a retry may read differently.
    """
    if request.fingerprint:
        return request.fingerprint
    body = {
        "conversation_id": request.conversation_id,
        "text": request.text,
        "options": asdict(request.options),
        "background": request.background,
    }
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def reused(request_id: str, turn_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"request_id {request_id[:128]!r} was already used for another request (turn "
        f"{turn_id}); a retry must send the same conversation, text and options, and a new "
        "request needs a new request_id",
        reason="REQUEST_ID_REUSED",
        field="start.request_id",
    )


# Looks a turn up on the log for the caller's tenant (``GatewayCore.find_turn``): NotFound when
# it is not there.
FindTurn = Callable[[str], Awaitable[TurnInfo]]
# Claims the request id for a turn id (and its conversation) about to be appended.
Claimer = Callable[[str, str], Awaitable[None]]


class RequestIds:
    """The request-id side of ``GatewayCore._start_turn``; without ``claims``, this gateway's
    own cache is all there is (tests, and a gateway without a persister)."""

    def __init__(
        self,
        claims: RequestClaims | None,
        *,
        takeover_after_s: float,
        poll_s: float = 0.1,
        max_entries: int = 10_000,
    ) -> None:
        self._claims = claims
        self._takeover_after_s = takeover_after_s
        self._poll_s = poll_s
        # The fingerprint of each request id this gateway started or attached, so a local
        # cache hit is checked like a claim.
        self._fingerprints: BoundedLru[tuple[str, str], str] = BoundedLru(max_entries)

    @property
    def shared(self) -> bool:
        return self._claims is not None

    def check_local(self, key: tuple[str, str], request: StartRequest, turn_id: str) -> None:
        """REQUEST_ID_REUSED when this gateway saw the request id with another body."""
        known = self._fingerprints.peek(key)
        if known is not None and known != fingerprint(request):
            raise reused(key[1], turn_id)

    def remember(self, key: tuple[str, str], request: StartRequest) -> None:
        self._fingerprints.put(key, fingerprint(request))

    def claimer(self, tenant_id: str, request: StartRequest, replace_turn_id: str) -> Claimer:
        """What the core calls between choosing the turn id and appending the request."""
        claims = self._claims
        assert claims is not None
        digest = fingerprint(request)
        limit_s = self._takeover_after_s / 2

        async def claim(turn_id: str, conversation_id: str) -> None:
            asked = time.monotonic()
            held = await claims.claim_request_id(
                tenant_id=tenant_id,
                request_id=request.request_id,
                turn_id=turn_id,
                conversation_id=conversation_id,
                fingerprint=digest,
                replace_turn_id=replace_turn_id,
                # A later answer could not be used anyway (below).
                timeout_s=limit_s,
            )
            if not held.won:
                raise ClaimedElsewhere(held)
            CLAIMS.labels("taken_over" if replace_turn_id else "won").inc()
            if time.monotonic() - asked > limit_s:
                # The answer came so late that another gateway may already count the claim as
                # abandoned: appending now could log the request twice. The client retries.
                raise Unavailable(
                    "the conversation store answered too slowly to start this turn safely; "
                    "retry with the same request_id",
                    reason="PERSISTER_SLOW",
                    retry_after_s=1.0,
                )

        return claim

    async def settle(
        self, key: tuple[str, str], request: StartRequest, claim: Claim, find: FindTurn
    ) -> TurnInfo | str:
        """After losing ``claim``: the winner's turn to attach to, or (a str) the turn id of an
        abandoned claim to take over."""
        if claim.fingerprint != fingerprint(request):
            CLAIMS.labels("reused").inc()
            raise reused(request.request_id, claim.turn_id)
        waited_from = time.monotonic()
        pause_s = self._poll_s
        while True:
            try:
                info = await find(claim.turn_id)
            except NotFound:
                info = None
            except MeshError:
                raise
            if info is not None:
                self.remember(key, request)
                CLAIMS.labels("attached").inc()
                return info
            age_s = claim.age_s + (time.monotonic() - waited_from)
            if age_s >= self._takeover_after_s:
                return claim.turn_id
            # The winner's append may still be in flight: look again shortly, less often the
            # longer it takes (each look is a persister call and maybe a short log read).
            await asyncio.sleep(min(pause_s, self._takeover_after_s - age_s))
            pause_s = min(pause_s * 2, 1.0)


__all__ = [
    "Claim",
    "ClaimedElsewhere",
    "Claimer",
    "RequestClaims",
    "RequestIds",
    "fingerprint",
    "reused",
]
