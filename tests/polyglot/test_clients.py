"""The Go and TypeScript clients chat, drop, resume and cancel, against the fake gateway and the
live mesh; the TS client both natively (gRPC over HTTP/2) and through Envoy (gRPC-web).

Each turn is checked against the gateway's own account of it (ResumeTurn from seq 0 over native
gRPC): what a client printed before dropping plus what it got on resume is exactly the turn,
with no gap and no repeat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.envoy import ChatBackend
from tests.polyglot.helpers import (
    assert_contiguous,
    json_events,
    replay_turn,
    run,
    scripted_text,
    tokens_of,
)

pytestmark = [pytest.mark.infra, pytest.mark.timeout(600)]

MAX_TOKENS = 12
DROP_AFTER = 3


def split_run(events: list[dict[str, Any]]) -> tuple[str, list[tuple[int, str]]]:
    """The turn id and tokens of a run that dropped its stream after DROP_AFTER tokens."""
    kinds = [event["event"] for event in events]
    assert kinds[0] == "accepted", kinds
    assert "dropped" in kinds, (
        f"the turn ended before {DROP_AFTER} tokens, so there is nothing to resume: {events}"
    )
    tokens = tokens_of(events)
    assert_contiguous(tokens, 1)
    assert len(tokens) == DROP_AFTER
    return str(events[0]["turn_id"]), tokens


async def check_resumed_turn(
    backend: ChatBackend,
    turn_id: str,
    before: list[tuple[int, str]],
    resumed_events: list[dict[str, Any]],
) -> None:
    after = tokens_of(resumed_events)
    assert_contiguous(after, DROP_AFTER + 1)
    finished = [event for event in resumed_events if event["event"] == "finished"]
    assert len(finished) == 1, resumed_events
    assert finished[0]["turn_id"] == turn_id
    assert finished[0]["last_seq"] == DROP_AFTER + len(after)

    replay = await replay_turn(backend.grpc_addr, backend.api_key, turn_id)
    assert before + after == replay.tokens
    assert finished[0]["finish_reason"] == replay.finish_reason
    if backend.scripted:
        assert replay.text == scripted_text(MAX_TOKENS)
        assert replay.finish_reason == "FINISH_REASON_LENGTH"


async def test_go_client_chats_drops_and_resumes(
    chat_backend: ChatBackend, go_client: Path
) -> None:
    common = [str(go_client), "-addr", chat_backend.grpc_addr, "-api-key", chat_backend.api_key]
    first = await run(
        [
            *common,
            "-json",
            "-max-tokens",
            str(MAX_TOKENS),
            "-stop-after",
            str(DROP_AFTER),
            "Hi from Go",
        ]
    )
    assert first.returncode == 0, first.describe()
    turn_id, before = split_run(json_events(first))

    resumed = await run([*common, "-json", "-resume", turn_id, "-after-seq", str(DROP_AFTER)])
    assert resumed.returncode == 0, resumed.describe()
    await check_resumed_turn(chat_backend, turn_id, before, json_events(resumed))


async def test_go_client_rejects_a_bad_key(chat_backend: ChatBackend, go_client: Path) -> None:
    result = await run(
        [str(go_client), "-addr", chat_backend.grpc_addr, "-api-key", "not-a-key", "hello"]
    )
    assert result.returncode == 1
    assert "Unauthenticated" in result.stderr, result.describe()


def ts_address(backend: ChatBackend, transport: str) -> str:
    return f"http://{backend.grpc_addr}" if transport == "grpc" else backend.web_url


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
async def test_ts_client_chats_drops_and_resumes(
    chat_backend: ChatBackend, ts_client: list[str], transport: str
) -> None:
    common = [
        *ts_client,
        "--transport",
        transport,
        "--addr",
        ts_address(chat_backend, transport),
        "--api-key",
        chat_backend.api_key,
        "--json",
    ]
    first = await run(
        [*common, "--max-tokens", str(MAX_TOKENS), "--stop-after", str(DROP_AFTER), "Hi from TS"]
    )
    assert first.returncode == 0, first.describe()
    turn_id, before = split_run(json_events(first))

    resumed = await run([*common, "--resume", turn_id, "--after-seq", str(DROP_AFTER)])
    assert resumed.returncode == 0, resumed.describe()
    await check_resumed_turn(chat_backend, turn_id, before, json_events(resumed))


async def test_ts_client_cancels_through_envoy(
    chat_backend: ChatBackend, ts_client: list[str]
) -> None:
    planned = 200
    result = await run(
        [
            *ts_client,
            "--transport",
            "grpc-web",
            "--addr",
            chat_backend.web_url,
            "--api-key",
            chat_backend.api_key,
            "--json",
            "--max-tokens",
            str(planned),
            "--cancel-after",
            "2",
            "Please write a long story.",
        ]
    )
    assert result.returncode == 0, result.describe()
    events = json_events(result)
    kinds = [event["event"] for event in events]
    assert "cancel_sent" in kinds, f"the turn ended before 2 tokens: {events}"
    finished = [event for event in events if event["event"] == "finished"]
    assert len(finished) == 1, events
    assert finished[0]["finish_reason"] == "FINISH_REASON_CANCELLED", finished
    tokens = tokens_of(events)
    assert_contiguous(tokens, 1)
    # Generation stops at its next token once the cancel lands; 1 s of slack for the round trip.
    assert len(tokens) < 2 + round(1.0 / chat_backend.token_interval_s), len(tokens)
    assert finished[0]["last_seq"] == len(tokens)
