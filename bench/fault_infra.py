"""Faults in the servers under the mesh, for bench/faults.py: PostgreSQL, memory or
Elasticsearch frozen for a while, the Kafka broker killed and started again, the embedded log's
volume full. Each runs turns through the fault the way a client would (retrying a refused start,
resuming a broken stream) and judges every turn that was accepted."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.fault_mesh import (
    FAULT_AFTER_TOKENS,
    Followed,
    Launched,
    Outcome,
    cmdline,
    follow_turn,
    judge,
    send_signal,
)

# The embedded log's volume in the disk-full fault: room for the log of the warm-up and the
# runs, small enough to fill in a moment.
LOG_VOLUME_MB = 64
DISK_FULL_S = 20.0  # how long the volume stays full before the filler is removed


def judge_all(mesh: Launched, turns: list[Followed]) -> Outcome:
    """One outcome for the turns of one run: every accepted turn judged, their losses added up;
    turns never accepted (refused at the start) are noted, not lost, and so are the statuses of
    the calls that failed on the way (refused starts, streams cut) and the slowest turn."""
    total = Outcome(finished=True)
    for followed in turns:
        if not followed.turn_id:
            continue
        one = judge(mesh, followed, Outcome())
        total.finished = total.finished and one.finished
        total.lost += one.lost
        total.duplicated += one.duplicated
        total.persisted_differs = total.persisted_differs or one.persisted_differs
    refusals = sorted({e for f in turns for e in f.errors})
    accepted = sum(bool(f.turn_id) for f in turns)
    ended = [f for f in turns if f.finished is not None]
    slowest = max((f.finished_at - f.started_at for f in ended), default=0.0)
    total.note = f"{accepted} turns accepted, slowest {slowest:.0f} s"
    total.note += f", calls failed with {refusals}" if refusals else ""
    return total


def _recall_skipped(followed: Followed) -> bool:
    return followed.finished is not None and any(
        s.source == "recall" for s in followed.finished.context_skipped
    )


def freeze(mesh: Launched, what: str, pids: Callable[[], list[int]], outage_s: float) -> Outcome:
    """SIGSTOP ``pids`` (``what``: postgres, memory, elasticsearch) for ``outage_s`` while
    turns run back to back, then SIGCONT. Every turn must end, and PostgreSQL must catch up with
    exactly the streamed text. Recovery: for PostgreSQL, from SIGCONT until every turn of the
    outage is persisted; for memory and Elasticsearch, until a turn's recall is not skipped."""
    frozen = pids()
    if not frozen:
        return Outcome(note=f"no {what} process found")
    for pid in frozen:
        send_signal(pid, signal.SIGSTOP)
    began = time.monotonic()
    turns: list[Followed] = []
    try:
        while time.monotonic() - began < outage_s:
            left = outage_s - (time.monotonic() - began)
            turns.append(
                follow_turn(mesh, f"outage {what} {random.random()}", deadline_s=left + 90)
            )
    finally:
        for pid in frozen:
            send_signal(pid, signal.SIGCONT)
    woke = time.monotonic()
    outcome = judge_all(mesh, turns)  # waits until PostgreSQL holds every turn
    if what == "postgres":
        outcome.recovery_s = time.monotonic() - woke
    else:
        skipped = sum(_recall_skipped(f) for f in turns)
        outcome.note += f", recall skipped in {skipped}"
        outcome.recovery_s = _until_recall(mesh, woke)
    outcome.note += f", outage {woke - began:.0f} s"
    return outcome


def _until_recall(mesh: Launched, since: float, timeout_s: float = 180.0) -> float | None:
    """Seconds from ``since`` until a turn's recall is not skipped, or None."""
    while time.monotonic() - since < timeout_s:
        probe = follow_turn(mesh, f"after the outage {random.random()}")
        if probe.finished is not None and not _recall_skipped(probe):
            return time.monotonic() - since
    return None


def restart_broker(mesh: Launched) -> Outcome:
    """SIGKILL the Kafka broker mid-stream and start it again at once with the command line,
    environment and working directory the launcher gave it (the launcher does not supervise
    the servers it starts). Recovery: the client's longest token stall after the kill."""
    outcome = Outcome()
    killed_at: list[float] = []

    def on_token(followed: Followed) -> None:
        if killed_at or len(followed.seqs) < FAULT_AFTER_TOKENS:
            return
        pids = mesh.infra_pids("kafka.Kafka")
        if pids:
            killed_at.append(time.monotonic())
            _restart(mesh, pids[0])

    followed = follow_turn(mesh, f"fault broker {random.random()}", on_token, deadline_s=240)
    if killed_at:
        outcome.recovery_s = followed.stall_after(killed_at[0])
    else:
        outcome.note = "the turn ended before the fault"
    return judge(mesh, followed, outcome)


def _restart(mesh: Launched, pid: int) -> None:
    proc = Path(f"/proc/{pid}")
    argv = cmdline(pid)
    env = dict(
        line.decode(errors="replace").split("=", 1)
        for line in (proc / "environ").read_bytes().split(b"\0")
        if b"=" in line
    )
    cwd = os.readlink(proc / "cwd")
    send_signal(pid, signal.SIGKILL)
    while proc.exists() and "zombie" not in _state(proc):
        time.sleep(0.05)
    with (mesh.root / "restarted-broker.log").open("ab") as out:
        mesh.adopted.append(
            subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )


def _state(proc: Path) -> str:
    try:
        return (proc / "status").read_text().split("State:", 1)[1].splitlines()[0]
    except (OSError, IndexError):
        return "zombie"  # gone


def mount_log_volume(state: Path) -> None:
    """A LOG_VOLUME_MB tmpfs where the launcher puts the embedded log (``state/log``)."""
    log_dir = state / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={LOG_VOLUME_MB}m", "tmpfs", str(log_dir)],
        check=True, capture_output=True,
    )  # fmt: skip


def unmount_log_volume(state: Path) -> None:
    subprocess.run(["umount", "-l", str(state / "log")], check=False, capture_output=True)


def disk_full(mesh: Launched) -> Outcome:
    """Fill the embedded log's volume mid-turn and free it DISK_FULL_S later. Meanwhile a
    second client starts a turn (retrying a refused start with the same request id): while full,
    starts must be refused with a clear UNAVAILABLE. Both turns must then end intact. Recovery:
    the streaming turn's longest token stall from the fill."""
    filler = mesh.root / "state" / "log" / "filler"
    filled = threading.Event()
    filled_at: list[float] = []
    freed: list[float] = []

    def on_token(followed: Followed) -> None:
        if not filled.is_set() and len(followed.seqs) >= FAULT_AFTER_TOKENS:
            _fill(filler)
            filled_at.append(time.monotonic())
            filled.set()
            threading.Timer(DISK_FULL_S, lambda: freed.append(_free(filler))).start()

    second: list[Followed] = []

    def start_while_full() -> None:
        if filled.wait(60):
            second.append(follow_turn(mesh, f"while full {random.random()}", deadline_s=150))

    starter = threading.Thread(target=start_while_full)
    starter.start()
    streaming = follow_turn(mesh, f"fault disk {random.random()}", on_token, deadline_s=150)
    if not filled.is_set():
        filled.set()  # the turn ended before the fault: the starter need not wait
    starter.join()
    if not freed:
        freed.append(_free(filler))
    outcome = judge_all(mesh, [streaming, *second])
    if filled_at:
        outcome.recovery_s = streaming.stall_after(filled_at[0])
    # Counted seconds in a message ("for 12s") would make each refusal a note of its own.
    refused = sorted({re.sub(r"\d+", "N", m) for f in second for m in f.error_messages})
    outcome.note = f"{outcome.note}; the start while full was refused with {refused or 'nothing'}"
    if any(not m.startswith("UNAVAILABLE") for m in refused):
        outcome.failed_calls += 1  # not the clear status a client can act on
    return outcome


def _free(filler: Path) -> float:
    filler.unlink(missing_ok=True)
    return time.monotonic()


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until its volume has no space left."""
    block = b"\0" * (1 << 20)
    with path.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(block)
        except OSError:
            pass
    with path.open("ab", buffering=0) as out:  # the last partial megabyte
        try:
            while True:
                out.write(block[:4096])
        except OSError:
            pass
