"""The chat page in headless Chromium, served by Envoy on the same origin as gRPC-web.

Runs against the fake gateway (scripted tokens every 50 ms, so text is exact) and against the
live mesh (the tiny model paced at 20 ms a token, so a turn outlasts a click or a reload). The
page is driven by tests/browser/web_chat.mjs (playwright-core with Debian's chromium); these
tests check what it saw. Screenshots go to artifacts/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.envoy import ChatBackend
from tests.polyglot.helpers import REPO, replay_turn, run, scripted_text

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts"
DRIVER = Path(__file__).with_name("web_chat.mjs")


@pytest.fixture(scope="session")
def browser_tools() -> str:
    """node, Debian's chromium and playwright-core, or a failure saying how to get them."""
    node = shutil.which("node")
    missing = []
    if node is None:
        missing.append("node (apt-get install -y nodejs)")
    if not CHROMIUM.is_file():
        missing.append("chromium (apt-get install -y chromium)")
    if not (REPO / "node_modules" / "playwright-core").is_dir():
        missing.append(f"playwright-core (npm ci in {REPO})")
    if missing:
        pytest.fail("the browser tests need " + ", ".join(missing))
    assert node is not None
    return node


async def drive(node: str, backend: ChatBackend, scenario: str, **options: Any) -> dict[str, Any]:
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / f"web-chat-{backend.name}-{scenario}.png"
    screenshot.unlink(missing_ok=True)
    spec = {
        "url": backend.web_url + "/",
        "apiKey": backend.api_key,
        "scenario": scenario,
        "screenshot": str(screenshot),
        "chromium": str(CHROMIUM),
        "timeoutMs": 120_000,
        **options,
    }
    result = await run([node, str(DRIVER), json.dumps(spec)], timeout_s=300)
    try:
        report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(
            f"the browser driver printed no report:\n{result.describe()}"
        ) from None
    assert result.returncode == 0 and report["ok"], f"{report.get('error')}\n{result.describe()}"
    assert screenshot.is_file(), f"no screenshot at {screenshot}"
    assert report["consoleErrors"] == [], report["consoleErrors"]
    return report


def growth_times(report: dict[str, Any]) -> list[float]:
    """When the assistant bubble grew (ms, page clock), before the turn finished."""
    times = []
    last_length = 0
    for seen in report["seen"]["bubbles"]:
        if seen["length"] > last_length and not seen["finish"]:
            times.append(seen["t"])
        last_length = max(last_length, seen["length"])
    return times


async def test_tokens_appear_as_they_arrive(chat_backend: ChatBackend, browser_tools: str) -> None:
    report = await drive(browser_tools, chat_backend, "stream", maxTokens=24)
    final = report["final"]
    assert final["finish"].startswith("FINISH_REASON_"), final
    assert final["active"] is None, "a finished turn must leave nothing to resume"

    replay = await replay_turn(chat_backend.grpc_addr, chat_backend.api_key, final["turnId"])
    assert final["text"] == replay.text
    assert final["lastSeq"] == len(replay.tokens)
    assert final["finish"] == replay.finish_reason

    # 24 tokens at least one interval apart: seen over that time, not in one burst.
    times = growth_times(report)
    distinct = sorted({round(t) for t in times})
    assert len(distinct) >= 8, f"tokens did not arrive progressively: {report['seen']['bubbles']}"
    spread_ms = 10 * chat_backend.token_interval_s * 1000
    assert distinct[-1] - distinct[0] > spread_ms, distinct
    states = [s["state"] for s in report["seen"]["statuses"]]
    assert "generating" in states, states
    if chat_backend.scripted:
        assert final["text"] == scripted_text(24)
        # The fake keeps every turn queued for 0.3 s at position 1.
        queued = [s for s in report["seen"]["statuses"] if s["state"] == "queued"]
        assert queued and queued[0]["queuePosition"] == "1", report["seen"]["statuses"]


async def test_cancel_stops_the_tokens(chat_backend: ChatBackend, browser_tools: str) -> None:
    planned = 200
    report = await drive(
        browser_tools, chat_backend, "cancel", maxTokens=planned, cancelAfterSeq=3, settleMs=1500
    )
    at_cancel, final, later = report["atCancel"], report["final"], report["later"]
    assert at_cancel is not None, f"the turn ended before 3 tokens: {final}"
    assert final["finish"] == "FINISH_REASON_CANCELLED", final
    assert final["lastSeq"] < planned
    assert later["text"] == final["text"], "tokens kept arriving after the turn was cancelled"
    assert final["active"] is None

    replay = await replay_turn(chat_backend.grpc_addr, chat_backend.api_key, final["turnId"])
    assert replay.finish_reason == "FINISH_REASON_CANCELLED"
    assert final["text"] == replay.text
    # Generation stops at its next token once the cancel lands; 1 s of slack for the round trip.
    slack = round(1.0 / chat_backend.token_interval_s)
    assert final["lastSeq"] < at_cancel["lastSeq"] + slack, (at_cancel, final)


async def test_reload_resumes_the_turn_without_duplicates(
    chat_backend: ChatBackend, browser_tools: str
) -> None:
    # About 2.5 s of tokens: long enough that the reload lands mid-turn.
    planned = round(2.5 / chat_backend.token_interval_s)
    report = await drive(browser_tools, chat_backend, "reload", maxTokens=planned, reloadAfterSeq=5)
    before, after, final = report["beforeReload"], report["afterReload"], report["final"]
    assert before is not None, f"the turn ended before 5 tokens, so no reload: {final}"
    assert before["lastSeq"] >= 5
    # After the reload the page shows what it had, then resumes after that seq.
    assert after["resumedAfter"] is not None, after
    resumed_after = int(after["resumedAfter"])
    assert resumed_after >= before["lastSeq"]
    assert after["turnId"] == before["turnId"]

    replay = await replay_turn(chat_backend.grpc_addr, chat_backend.api_key, final["turnId"])
    assert final["text"] == replay.text, "the resumed page lost or repeated tokens"
    assert final["lastSeq"] == len(replay.tokens)
    assert final["finish"] == replay.finish_reason
    assert final["active"] is None
    assert resumed_after < planned, "the turn finished before the page resumed it"
    if chat_backend.scripted:
        assert final["text"] == scripted_text(planned)
