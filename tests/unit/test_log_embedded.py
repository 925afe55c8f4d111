"""The embedded (SQLite) log driver: multi-process safety and group behaviour.

Behaviour shared with Kafka lives in tests/conformance/test_log.py; these tests cover what only
the embedded driver can be asked to prove cheaply: several OS processes on one file, and members
that die without leaving.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mesh.log import Fenced, GroupConsumer, LogError, Record
from mesh.log.embedded import EmbeddedLog, assign
from mesh.log.embedded.fs_watch import DirectoryWatch

ROOT = Path(__file__).resolve().parents[2]
FAST = {"session_timeout_s": 1.0, "heartbeat_interval_s": 0.1}


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    async with EmbeddedLog(tmp_path / "log.sqlite3", **FAST) as opened:
        await opened.ensure_topic("t", 4)
        yield opened


async def spawn(code: str, *args: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'gen' / 'python'}")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(code),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> str:
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


APPENDER = """
    import asyncio, sys
    from pathlib import Path
    from mesh.log.embedded import EmbeddedLog

    async def main(path: str, name: str, count: int) -> None:
        async with EmbeddedLog(Path(path)) as log:
            await log.ensure_topic("t", 4)
            futures = []
            for i in range(count):
                futures.append(log.append("t", 0, name.encode(), str(i).encode()))
                if i % 50 == 0:  # several transactions, interleaving with the other writer
                    await asyncio.sleep(0)
            await log.flush()
            print(",".join(str(f.result()) for f in futures))

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_two_processes_append_unique_gap_free_offsets(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    count = 1500
    writers = [await spawn(APPENDER, str(path), name, str(count)) for name in ("w1", "w2")]
    async with EmbeddedLog(path) as log:
        await log.ensure_topic("t", 4)
        mine = [log.append("t", 0, b"w0", str(i).encode()) for i in range(count)]
        await log.flush()
        outputs = [await finish(writer) for writer in writers]
        offsets = [int(o) for out in outputs for o in out.strip().split(",")]
        offsets += [future.result() for future in mine]
        assert sorted(offsets) == list(range(3 * count))
        assert await log.end_offset("t", 0) == 3 * count
        records = await log.read_range("t", 0, 0, 3 * count)
    assert [r.offset for r in records] == list(range(3 * count))
    # Each writer's records keep the order it appended them in.
    for name in (b"w0", b"w1", b"w2"):
        values = [int(r.value) for r in records if r.key == name]
        assert values == list(range(count))


async def test_tail_sees_records_appended_by_another_process(
    tmp_path: Path, log: EmbeddedLog
) -> None:
    tail = log.read("t", 0, 0).__aiter__()
    first = asyncio.create_task(anext(tail))
    await asyncio.sleep(0.05)
    assert not first.done()
    writer = await spawn(APPENDER, str(log.path), "other", "3")
    await finish(writer)
    record = await asyncio.wait_for(first, 5)
    assert (record.key, record.value, record.offset) == (b"other", b"0", 0)
    assert [(await asyncio.wait_for(anext(tail), 5)).value for _ in range(2)] == [b"1", b"2"]


async def test_other_processes_appends_are_noticed_through_inotify(log: EmbeddedLog) -> None:
    """On Linux the poller sleeps until a write is reported, and no report goes missing."""
    poller = log._poller
    assert poller is not None and poller.watching, "inotify is not in use on this machine"
    tail = log.read("t", 1, 0).__aiter__()
    first = asyncio.create_task(anext(tail))
    await asyncio.sleep(0.05)
    async with EmbeddedLog(log.path) as other:  # its own connection: a second process to SQLite
        for i in range(20):
            await other.append("t", 1, b"k", str(i).encode())
            await asyncio.sleep(0.005)
    assert (await asyncio.wait_for(first, 5)).value == b"0"
    assert [(await asyncio.wait_for(anext(tail), 5)).value for _ in range(19)][-1] == b"19"
    assert poller.watching, "a commit arrived without an inotify report"


async def test_a_lost_inotify_report_falls_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The poller watches a directory nobody writes to: every commit arrives unreported.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_open = DirectoryWatch.open
    monkeypatch.setattr(
        DirectoryWatch, "open", classmethod(lambda cls, directory: real_open(elsewhere))
    )
    async with EmbeddedLog(tmp_path / "log.sqlite3", **FAST) as log:
        await log.ensure_topic("t", 4)
        poller = log._poller
        assert poller is not None and poller.watching
        tail = log.read("t", 2, 0).__aiter__()
        first = asyncio.create_task(anext(tail))
        await asyncio.sleep(0.05)
        async with EmbeddedLog(log.path) as other:
            await other.append("t", 2, b"k", b"late")
        # Found by the slow re-check; from then on the poller polls.
        assert (await asyncio.wait_for(first, 5)).value == b"late"
        for _ in range(100):
            if not poller.watching:
                break
            await asyncio.sleep(0.02)
        assert not poller.watching
        async with EmbeddedLog(log.path) as other:
            await other.append("t", 2, b"k", b"polled")
        assert (await asyncio.wait_for(anext(tail), 5)).value == b"polled"


def test_directory_watch_reports_writes_and_times_out(tmp_path: Path) -> None:
    watch = DirectoryWatch.open(tmp_path)
    assert watch is not None
    try:
        assert watch.wait(0.05) is False
        (tmp_path / "f").write_bytes(b"x")
        with (tmp_path / "f").open("ab") as handle:
            for _ in range(100):
                handle.write(b"y")
                handle.flush()
        assert watch.wait(1.0) is True
        assert watch.wait(0.05) is False, "one wait consumes every pending report"
    finally:
        watch.close()


async def test_append_to_missing_partition_fails_only_that_record(log: EmbeddedLog) -> None:
    good = log.append("t", 1, b"k", b"v")
    bad_partition = log.append("t", 9, b"k", b"v")
    bad_topic = log.append("nope", 0, b"k", b"v")
    assert await good == 0
    with pytest.raises(LogError, match="partition 9"):
        await bad_partition
    with pytest.raises(LogError, match="nope"):
        await bad_topic
    with pytest.raises(LogError):
        await log.end_offset("t", 4)


async def test_flush_raises_when_an_append_failed(log: EmbeddedLog) -> None:
    failing = log.append("missing", 0, b"k", b"v")
    with pytest.raises(LogError, match="append failed"):
        await log.flush()
    assert failing.exception() is not None


async def test_appends_are_batched_into_few_transactions(log: EmbeddedLog) -> None:
    futures = [log.append("t", 2, b"k", str(i).encode()) for i in range(5000)]
    await log.flush()
    assert [f.result() for f in futures] == list(range(5000))


def test_assign_spreads_partitions_by_sorted_member_index() -> None:
    members = ["a", "b", "c"]
    assert assign(members, "a", 4) == {0, 3}
    assert assign(members, "b", 4) == {1}
    assert assign(members, "c", 4) == {2}
    assert assign(members, "zz", 4) == frozenset()


async def collect(consumer: GroupConsumer, sink: list[Record], *, commit: bool = False) -> None:
    async for record in consumer:
        sink.append(record)
        if commit:
            await consumer.commit(record)


async def wait_until(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_joining_member_takes_partitions_and_old_owner_stops(log: EmbeddedLog) -> None:
    a_seen: list[Record] = []
    b_seen: list[Record] = []
    a = log.consumer("t", "g", "a")
    a_task = asyncio.create_task(collect(a, a_seen, commit=True))
    await wait_until(lambda: a.assignment() == {0, 1, 2, 3})
    b = log.consumer("t", "g", "b")
    b_task = asyncio.create_task(collect(b, b_seen, commit=True))
    await wait_until(lambda: b.assignment() == {1, 3} and a.assignment() == {0, 2})
    # Give the join's settle delay time to pass, then write to every partition.
    await asyncio.sleep(0.3)
    for partition in range(4):
        await log.append("t", partition, b"k", b"v")
    await wait_until(lambda: len(a_seen) + len(b_seen) == 4)
    assert {r.partition for r in a_seen} == {0, 2}
    assert {r.partition for r in b_seen} == {1, 3}
    await b.close()
    await a.close()
    await asyncio.wait_for(asyncio.gather(a_task, b_task), 5)


async def test_close_hands_partitions_over_at_once_with_redelivery(log: EmbeddedLog) -> None:
    for offset in range(3):
        await log.append("t", 1, b"k", str(offset).encode())
    a_seen: list[Record] = []
    b_seen: list[Record] = []
    a = log.consumer("t", "g", "a")
    b = log.consumer("t", "g", "b")
    tasks = [asyncio.create_task(collect(a, a_seen)), asyncio.create_task(collect(b, b_seen))]
    await wait_until(lambda: len(b_seen) == 3)  # partition 1 belongs to b
    await b.commit(b_seen[0])  # b finished only the first record
    await b.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await wait_until(lambda: len(a_seen) == 2, within_s=FAST["session_timeout_s"])
    assert loop.time() - started < FAST["session_timeout_s"]  # a leave needs no lease expiry
    assert [r.offset for r in a_seen] == [1, 2]
    assert await log.committed("t", "g", 1) == 1
    await a.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_commit_from_a_member_that_lost_the_partition_is_dropped(
    log: EmbeddedLog,
) -> None:
    await log.append("t", 1, b"k", b"v")
    a_seen: list[Record] = []
    a = log.consumer("t", "g", "a")
    task = asyncio.create_task(collect(a, a_seen))
    await wait_until(lambda: len(a_seen) == 1)
    b = log.consumer("t", "g", "b")
    b_task = asyncio.create_task(collect(b, []))
    await wait_until(lambda: 1 not in a.assignment())
    await a.commit(a_seen[0])
    assert await log.committed("t", "g", 1) == 0
    await b.close()
    await a.close()
    await asyncio.wait_for(asyncio.gather(task, b_task), 5)


MEMBER = """
    import asyncio, json, sys
    from pathlib import Path
    from mesh.log.embedded import EmbeddedLog

    async def main(path: str) -> None:
        async with EmbeddedLog(Path(path), session_timeout_s=1.0, heartbeat_interval_s=0.1) as log:
            consumer = log.consumer("t", "g", "a-doomed")
            async for record in consumer:
                if record.offset == 0:
                    await consumer.commit(record)  # only the first record is done
                print(json.dumps([record.partition, record.offset]), flush=True)

    asyncio.run(main(sys.argv[1]))
"""


async def test_dead_member_uncommitted_records_are_redelivered(log: EmbeddedLog) -> None:
    doomed = await spawn(MEMBER, str(log.path))
    assert doomed.stdout is not None
    survivor_seen: list[Record] = []
    survivor = log.consumer("t", "g", "b-survivor")
    task = asyncio.create_task(collect(survivor, survivor_seen))
    try:
        # Sorted ids: "a-doomed" owns partitions 0 and 2, the survivor 1 and 3.
        await wait_until(lambda: survivor.assignment() == {1, 3}, within_s=15)
        await asyncio.sleep(0.3)  # past the newcomer's settle delay
        for partition in range(4):
            for offset in range(3):
                await log.append("t", partition, b"k", f"{partition}:{offset}".encode())
        doomed_seen: set[tuple[int, int]] = set()
        while len(doomed_seen) < 6:
            line = await asyncio.wait_for(doomed.stdout.readline(), 10)
            assert line, "the member process ended early"
            partition, offset = json.loads(line)
            doomed_seen.add((partition, offset))
        assert {p for p, _ in doomed_seen} == {0, 2}
        await wait_until(lambda: len(survivor_seen) == 6)
        assert {r.partition for r in survivor_seen} == {1, 3}
        doomed.send_signal(signal.SIGKILL)  # no close, no leave: only the lease expires
        await doomed.wait()
        await wait_until(lambda: survivor.assignment() == {0, 1, 2, 3}, within_s=5)
        await wait_until(lambda: len(survivor_seen) == 10, within_s=5)
        redelivered = sorted((r.partition, r.offset) for r in survivor_seen[6:])
        assert redelivered == [(0, 1), (0, 2), (2, 1), (2, 2)]
        await asyncio.sleep(0.3)
        assert len(survivor_seen) == 10  # nothing committed came back
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()
        await survivor.close()
        await asyncio.wait_for(task, 5)


async def test_member_back_from_a_long_pause_restarts_from_the_committed_offset(
    log: EmbeddedLog,
) -> None:
    for offset in range(3):
        await log.append("t", 0, b"k", str(offset).encode())
    a = log.consumer("t", "g", "a")
    a_records = aiter(a)
    assert (await asyncio.wait_for(anext(a_records), 5)).offset == 0
    # Freeze a as a stopped process would be: no heartbeats, its iterator suspended.
    assert a._heartbeat_task is not None
    a._heartbeat_task.cancel()
    b_seen: list[Record] = []
    b = log.consumer("t", "g", "b")
    b_task = asyncio.create_task(collect(b, b_seen, commit=True))
    await wait_until(lambda: len(b_seen) == 3, within_s=5)  # a's lease expired; b took over
    await b.close()
    await asyncio.wait_for(b_task, 5)
    assert await log.committed("t", "g", 0) == 3
    # a wakes up: it must not go on from its stale position (offset 1) but from the commit.
    next_record = asyncio.create_task(anext(a_records))
    await asyncio.sleep(0.3)
    assert not next_record.done()
    await log.append("t", 0, b"k", b"3")
    assert (await asyncio.wait_for(next_record, 5)).offset == 3
    await a.close()


async def test_stop_closes_consumers_and_ends_their_iteration(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "x.sqlite3", **FAST)
    await log.start()
    await log.ensure_topic("t", 2)
    consumer = log.consumer("t", "g", "a")
    task = asyncio.create_task(collect(consumer, []))
    await wait_until(lambda: consumer.assignment() == {0, 1})
    await log.stop()
    await asyncio.wait_for(task, 5)
    with pytest.raises(LogError, match="not started"):
        log.append("t", 0, b"k", b"v")


async def test_a_member_back_from_a_pause_gets_a_new_epoch(log: EmbeddedLog) -> None:
    """Even when no one took its partitions, a member that was out of the group claims them
    afresh: what it appended under the old claim before its pause is not continued blindly."""
    await log.append("t", 0, b"k", b"r")
    a = log.consumer("t", "g", "a")
    records = aiter(a)
    await asyncio.wait_for(anext(records), 5)
    old = a.claim(0)
    assert old is not None
    assert a._heartbeat_task is not None
    a._heartbeat_task.cancel()  # frozen, as a stopped process is
    await asyncio.sleep(1.3)  # past the session
    next_record = asyncio.create_task(anext(records))  # wakes up: heartbeats, rejoins
    await wait_until(lambda: a.claim(0) is not None and a.claim(0) != old, within_s=5)
    with pytest.raises(Fenced):
        await log.append("t", 0, b"k", b"stale", fence=old)
    next_record.cancel()
    await a.close()
