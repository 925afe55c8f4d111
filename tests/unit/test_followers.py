"""Counting the clients that follow a turn (services.agent.followers)."""

from __future__ import annotations

from mesh import turnlog
from services.agent.followers import Followers, SeenByTails

ATTACHED = turnlog.ClientAttached("t1", gateway_id="gateway-2")
DETACHED = turnlog.ClientDetached("t1", gateway_id="gateway-1")


def test_the_start_is_the_first_follower() -> None:
    followers = Followers()
    assert followers.orphaned_for_ms(10_000) is None


def test_a_turn_is_unfollowed_from_the_last_departure_until_someone_attaches() -> None:
    followers = Followers()
    assert followers.apply(DETACHED, 1_000)
    assert followers.orphaned_for_ms(1_500) == 500
    assert followers.apply(ATTACHED, 1_200)
    assert followers.orphaned_for_ms(5_000) is None
    followers.apply(DETACHED, 4_000)
    assert followers.orphaned_for_ms(4_250) == 250


def test_a_resume_logged_before_the_departure_keeps_the_turn_followed() -> None:
    followers = Followers()  # the client moved gateways; the new one logged first
    followers.apply(ATTACHED, 1_000)
    followers.apply(DETACHED, 1_001)
    assert followers.orphaned_for_ms(9_999) is None


def test_other_events_are_not_counted() -> None:
    followers = Followers()
    assert not followers.apply(turnlog.TurnCancelled("t1"), 5)
    assert not followers.apply(turnlog.TokenEmitted("t1", 1, "x"), 5)
    assert followers.count == 1


def test_the_tails_hand_over_only_what_the_claims_read_did_not_cover() -> None:
    seen = SeenByTails()
    seen.note(10, DETACHED, 100)
    seen.note(12, ATTACHED, 120)
    seen.note(13, turnlog.ClientDetached("t2"), 130)
    assert seen.since("t1", 11) == [(ATTACHED, 120)]
    assert seen.since("t1", 0) == [(DETACHED, 100), (ATTACHED, 120)]
    assert seen.since("t3", 0) == []


def test_presence_records_round_trip_through_the_codec() -> None:
    for event in (ATTACHED, DETACHED):
        assert turnlog.decode_events(turnlog.encode(event)) == [event]
    requested = turnlog.TurnRequested("t1", "c1", "tenant", "hi", background=True)
    assert turnlog.decode_request(turnlog.encode(requested)).background
