"""What every launcher relies on: ServerProcess's start/stop lifecycle and Maven's fetch-once."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from mesh.infra.digests import sha256_file
from mesh.infra.maven import fetch_once, run_maven, verify_digests
from mesh.infra.process import ServerProcess, log_tail, spawn, wait_until


class StartError(RuntimeError):
    pass


def _group_gone(pgid: int, timeout_s: float = 5.0) -> bool:
    """Whether the group empties within the timeout (killed orphans are reaped by init)."""

    def alive() -> str | None:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return None
        return "alive"

    return wait_until(alive, timeout_s=timeout_s, poll_s=0.02) is None


def _shell(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def test_spawn_appends_output_to_the_log_in_a_session_of_its_own(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "server.log"
    log.parent.mkdir()
    log.write_text("earlier run\n")
    process = spawn(_shell("echo out; echo err >&2; read x || echo no-stdin"), log_path=log)
    assert process.wait(10) == 0
    assert os.getpgid(0) != process.pid  # it led a group of its own, not ours
    assert log.read_text().splitlines() == ["earlier run", "out", "err", "no-stdin"]


def test_wait_ready_returns_once_the_check_passes(tmp_path: Path) -> None:
    server = ServerProcess("sleeper", tmp_path / "s.log", error=StartError)
    server.spawn(["sleep", "30"])
    answers = iter(["starting", "still starting", None])
    try:
        server.wait_ready(lambda: next(answers), timeout_s=10, poll_s=0.01)
        assert server.process is not None and server.process.poll() is None
    finally:
        server.stop()
    assert server.process is None


def test_an_early_exit_raises_with_the_log_and_the_exit_code(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("an old run's output\n")
    server = ServerProcess("crasher", log, error=StartError)
    server.spawn(_shell("echo 'bad config: port'; exit 3"))
    with pytest.raises(StartError) as raised:
        server.wait_ready(lambda: "not yet", timeout_s=10, poll_s=0.01)
    message = str(raised.value)
    assert message == "crasher did not start (exited with code 3):\nbad config: port"
    assert server.process is None


def test_a_timeout_stops_the_server_and_says_what_was_missing(tmp_path: Path) -> None:
    server = ServerProcess("slow", tmp_path / "slow.log", error=StartError)
    process = server.spawn(["sleep", "30"])
    with pytest.raises(StartError, match=r"not ready after 0 s: port not open"):
        server.wait_ready(lambda: "port not open", timeout_s=0.2, poll_s=0.01)
    assert process.returncode is not None
    assert server.process is None


def test_an_interrupted_wait_stops_the_server(tmp_path: Path) -> None:
    server = ServerProcess("sleeper", tmp_path / "s.log")
    process = server.spawn(["sleep", "30"])

    def interrupted() -> str | None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        server.wait_ready(interrupted, timeout_s=10)
    assert process.returncode is not None


def test_stop_reaches_the_children_too(tmp_path: Path) -> None:
    # The leader exits on SIGTERM at once; its child must not be left behind.
    server = ServerProcess("forker", tmp_path / "f.log", stop_timeout_s=10)
    process = server.spawn(_shell("sleep 30 & echo started; wait"))
    wait_until(lambda: None if "started" in log_tail(server.log_path) else "no", timeout_s=10)
    began = time.monotonic()
    server.stop()
    assert time.monotonic() - began < 5
    assert process.returncode == -signal.SIGTERM
    assert _group_gone(process.pid)


def test_stop_kills_a_group_that_ignores_the_stop_signal(tmp_path: Path) -> None:
    server = ServerProcess("stubborn", tmp_path / "s.log", stop_timeout_s=0.5)
    process = server.spawn(_shell("trap '' TERM; sleep 30 & echo started; wait"))
    wait_until(lambda: None if "started" in log_tail(server.log_path) else "no", timeout_s=10)
    server.stop()
    assert process.returncode == -signal.SIGKILL
    assert _group_gone(process.pid)
    server.stop()  # a second stop, like one before any start, is harmless


def test_stop_sends_the_configured_signal(tmp_path: Path) -> None:
    script = "import signal, sys, time; signal.signal(signal.SIGINT, lambda *_: sys.exit(7))"
    server = ServerProcess("pg-like", tmp_path / "p.log", stop_signal=signal.SIGINT)
    process = server.spawn(
        [sys.executable, "-c", f"{script}; print('up', flush=True); time.sleep(30)"]
    )
    wait_until(lambda: None if "up" in log_tail(server.log_path) else "no", timeout_s=10)
    server.stop()
    assert process.returncode == 7


def test_log_tail_keeps_the_head_and_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert "nothing in" in log_tail(log)
    log.write_text("".join(f"line {n}\n" for n in range(100)))
    assert log_tail(log, lines=2, head=1).splitlines() == ["line 0", "[...]", "line 98", "line 99"]
    assert log_tail(log, lines=200).count("\n") == 99
    other = tmp_path / "other.log"
    other.write_text("from the server itself\n")
    tail = ServerProcess("x", log, other_logs=(other,)).log_tail(lines=1, head=0)
    assert tail.splitlines() == [
        f"==> {log} <==",
        "[...]",
        "line 99",
        f"==> {other} <==",
        "from the server itself",
    ]


def test_fetch_once_fetches_once_and_redoes_a_failed_fetch(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "thing-1.0"
    calls: list[Path] = []

    def failing(scratch: Path) -> tuple[Path, str]:
        (scratch / "half").mkdir()
        raise StartError("network down")

    def fetch(scratch: Path) -> tuple[Path, str]:
        calls.append(scratch)
        assert list(scratch.iterdir()) == []  # the failed attempt left nothing behind
        (scratch / "out").mkdir()
        (scratch / "out" / "a.jar").write_text("jar")
        return scratch / "out", "a.jar\n"

    with pytest.raises(StartError, match="network down"):
        fetch_once(target, failing, marker=".done")
    assert not target.exists()
    assert fetch_once(target, fetch, marker=".done") == target
    assert fetch_once(target, fetch, marker=".done") == target
    assert len(calls) == 1
    assert (target / "a.jar").read_text() == "jar"
    assert (target / ".done").read_text() == "a.jar\n"
    assert sorted(p.name for p in target.parent.iterdir()) == [".thing-1.0.lock", "thing-1.0"]


def test_run_maven_without_maven_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StartError, match=r"fetch the widget: apt-get install maven"):
        run_maven(["dependency:copy"], cwd=tmp_path, what="the widget", error=StartError)


def test_run_maven_failures_quote_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "mvn"
    fake.write_text('#!/bin/sh\necho "[ERROR] could not resolve $*"\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        StartError, match=r"(?s)fetching the widget failed .*could not resolve .*x:y"
    ):
        run_maven(["x:y"], cwd=tmp_path, what="the widget", error=StartError)


def test_fetch_once_fresh_rebuilds_and_keeps_the_old_copy_until_the_new_one_is_ready(
    tmp_path: Path,
) -> None:
    target = tmp_path / "thing"

    def build(text: str) -> object:
        def fetch(scratch: Path) -> tuple[Path, str]:
            (scratch / "out").mkdir()
            (scratch / "out" / "a.jar").write_text(text)
            return scratch / "out", text

        return fetch

    def broken(scratch: Path) -> tuple[Path, str]:
        raise StartError("digest mismatch")

    fetch_once(target, build("one"), marker=".done")  # type: ignore[arg-type]
    with pytest.raises(StartError):
        fetch_once(target, broken, marker=".done", fresh=True)
    assert (target / "a.jar").read_text() == "one"  # a failed refetch removes nothing
    fetch_once(target, build("two"), marker=".done", fresh=True)  # type: ignore[arg-type]
    assert (target / "a.jar").read_text() == "two"


def test_verify_digests_names_every_missing_extra_and_different_file(tmp_path: Path) -> None:
    (tmp_path / "good.jar").write_bytes(b"good")
    (tmp_path / "bad.jar").write_bytes(b"tampered")
    (tmp_path / "extra.jar").write_bytes(b"extra")
    (tmp_path / "notes.txt").write_bytes(b"not matched by the pattern")
    good = sha256_file(tmp_path / "good.jar")
    assert good == "770e607624d689265ca6c44884d0807d9b054d23c473c106c72be9de08b7376c"
    pinned = {"good.jar": good, "bad.jar": "0" * 64, "gone.jar": "1" * 64}
    with pytest.raises(StartError) as caught:
        verify_digests(tmp_path, pinned, pattern="*.jar", what="the widget", error=StartError)
    message = str(caught.value)
    assert message.startswith("the widget: the download does not match")
    assert "missing: gone.jar" in message
    assert "not pinned (the dependency set changed?): extra.jar" in message
    bad = sha256_file(tmp_path / "bad.jar")
    assert f"bad.jar: expected sha256 {'0' * 64}, got {bad}" in message
    assert "good.jar" not in message.split("\n", 1)[1]
    assert "mesh/infra/digests.py" in message
    del pinned["gone.jar"], pinned["bad.jar"]
    (tmp_path / "bad.jar").unlink()
    (tmp_path / "extra.jar").unlink()
    verify_digests(tmp_path, pinned, pattern="*.jar", what="the widget", error=StartError)
