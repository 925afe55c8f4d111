"""One behavioural suite for every log driver, so the embedded one cannot drift from Kafka.

Each test runs against the embedded SQLite driver and against a real Kafka broker (marked
``infra``). Driver-specific guarantees (several OS processes on one SQLite file, a member killed
without leaving) are in tests/unit/test_log_embedded.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mesh.log import EventLog, Fenced, GroupConsumer, LogError, Record, partition_for
from mesh.log.embedded import EmbeddedLog

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
# Short sessions so leave/rebalance tests stay fast; the Kafka fixture's broker allows 1 s.
SESSION_S = 2.0
HEARTBEAT_S = 0.25


@dataclass
class Driver:
    name: str
    # A new, unstarted client on the same storage (a second process, or the same one reopened).
    make: Callable[[], EventLog]
    # The SQLite file or the bootstrap address, for clients in other processes.
    location: str
    # Settings those processes need besides (Kafka's TLS and SASL: MESH_LOG_KAFKA_*).
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(
    params=["embedded", "embedded-polling", pytest.param("kafka", marks=pytest.mark.infra)]
)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Driver:
    if request.param == "kafka":
        from mesh.log.kafka import KafkaLog

        bootstrap: str = request.getfixturevalue("kafka_bootstrap")
        # The session's broker takes SASL_SSL only, like the scale profile's.
        config: dict[str, str] = request.getfixturevalue("kafka_client_config")
        return Driver(
            "kafka",
            lambda: KafkaLog(
                bootstrap,
                session_timeout_s=SESSION_S,
                heartbeat_interval_s=HEARTBEAT_S,
                config=config,
            ),
            bootstrap,
            request.getfixturevalue("kafka_client_env"),
        )
    path = tmp_path / "log.sqlite3"
    # "embedded" learns of other processes' appends from inotify; "embedded-polling" by polling.
    watch = request.param == "embedded"
    return Driver(
        request.param,
        lambda: EmbeddedLog(
            path,
            session_timeout_s=SESSION_S,
            heartbeat_interval_s=HEARTBEAT_S,
            watch_writes=watch,
        ),
        str(path),
    )


@pytest.fixture
async def event_log(driver: Driver) -> AsyncIterator[EventLog]:
    async with driver.make() as log:
        yield log


@pytest.fixture
async def topic(event_log: EventLog) -> str:
    # Unique names: the Kafka broker is shared by the whole session.
    name = f"conformance.{uuid.uuid4().hex[:12]}"
    await event_log.ensure_topic(name, PARTITIONS)
    return name


def unique_group() -> str:
    return f"group-{uuid.uuid4().hex[:12]}"


async def wait_until(predicate: Callable[[], bool], within_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_offsets_start_at_zero_and_grow_by_one_per_partition(
    event_log: EventLog, topic: str
) -> None:
    zero = [event_log.append(topic, 0, b"a", str(i).encode()) for i in range(10)]
    one = [event_log.append(topic, 1, b"b", str(i).encode()) for i in range(5)]
    assert [await f for f in zero] == list(range(10))
    assert [await f for f in one] == list(range(5))
    assert await event_log.end_offset(topic, 0) == 10
    assert await event_log.end_offset(topic, 1) == 5
    assert await event_log.end_offset(topic, 2) == 0


async def test_records_keep_order_key_value_and_timestamp(event_log: EventLog, topic: str) -> None:
    futures = [event_log.append(topic, 2, f"k{i}".encode(), f"v{i}".encode()) for i in range(50)]
    await event_log.flush()
    assert all(f.done() for f in futures)
    records = await event_log.read_range(topic, 2, 0, 50)
    assert [r.offset for r in records] == list(range(50))
    assert [(r.key, r.value) for r in records] == [
        (f"k{i}".encode(), f"v{i}".encode()) for i in range(50)
    ]
    assert all(r.topic == topic and r.partition == 2 for r in records)
    assert all(r.timestamp_ms > 1_600_000_000_000 for r in records)
    assert [r.timestamp_ms for r in records] == sorted(r.timestamp_ms for r in records)


async def test_headers_round_trip_and_default_to_none(event_log: EventLog, topic: str) -> None:
    headers = (("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"), ("x-é", "ünïcode"))
    with_headers = await event_log.append(topic, 1, b"k", b"v", headers)
    without = await event_log.append(topic, 1, b"k", b"w")
    first, second = await event_log.read_range(topic, 1, with_headers, without + 1)
    assert first.headers == headers
    assert second.headers == ()
    tail = event_log.read(topic, 1, with_headers)
    assert (await anext(tail)).headers == headers
    await tail.aclose()


async def test_empty_keys_and_values_round_trip(event_log: EventLog, topic: str) -> None:
    await event_log.append(topic, 0, b"", b"")
    [record] = await event_log.read_range(topic, 0, 0, 1)
    assert (record.key, record.value) == (b"", b"")


async def test_read_range_returns_only_written_records_in_bounds(
    event_log: EventLog, topic: str
) -> None:
    for i in range(6):
        event_log.append(topic, 3, b"k", str(i).encode())
    await event_log.flush()
    assert [r.value for r in await event_log.read_range(topic, 3, 2, 5)] == [b"2", b"3", b"4"]
    assert [r.offset for r in await event_log.read_range(topic, 3, 4, 100)] == [4, 5]
    assert await event_log.read_range(topic, 3, 6, 10) == []
    assert await event_log.read_range(topic, 3, 3, 3) == []


async def test_read_tails_from_an_offset_and_wakes_on_new_records(
    event_log: EventLog, topic: str
) -> None:
    for i in range(3):
        await event_log.append(topic, 1, b"k", str(i).encode())
    tail = aiter(event_log.read(topic, 1, 1))
    assert (await asyncio.wait_for(anext(tail), 10)).value == b"1"
    assert (await asyncio.wait_for(anext(tail), 10)).value == b"2"
    waiting = asyncio.create_task(anext(tail))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # a tail waits for records that do not exist yet
    await event_log.append(topic, 1, b"k", b"3")
    record = await asyncio.wait_for(waiting, 10)
    assert (record.offset, record.value) == (3, b"3")
    await tail.aclose()  # type: ignore[attr-defined]


async def test_tails_of_one_partition_are_independent(event_log: EventLog, topic: str) -> None:
    for i in range(4):
        event_log.append(topic, 0, b"k", str(i).encode())
    await event_log.flush()
    late = aiter(event_log.read(topic, 0, 3))
    assert (await asyncio.wait_for(anext(late), 10)).offset == 3
    early = aiter(event_log.read(topic, 0, 0))  # starts before the other tail's position
    assert [(await asyncio.wait_for(anext(early), 10)).offset for _ in range(4)] == [0, 1, 2, 3]
    await event_log.append(topic, 0, b"k", b"4")
    assert (await asyncio.wait_for(anext(late), 10)).offset == 4
    assert (await asyncio.wait_for(anext(early), 10)).offset == 4
    for tail in (late, early):
        await tail.aclose()  # type: ignore[attr-defined]


async def test_a_second_client_sees_the_first_clients_records(
    driver: Driver, event_log: EventLog, topic: str
) -> None:
    async with driver.make() as other:
        tail = aiter(other.read(topic, 2, 0))
        waiting = asyncio.create_task(anext(tail))
        await event_log.append(topic, 2, b"k", b"from-first")
        assert (await asyncio.wait_for(waiting, 10)).value == b"from-first"
        assert await other.end_offset(topic, 2) == 1
        await tail.aclose()  # type: ignore[attr-defined]


async def test_stopping_the_log_ends_open_tails_with_an_error(driver: Driver, topic: str) -> None:
    log = driver.make()
    await log.start()
    tail = aiter(log.read(topic, 0, 0))
    waiting = asyncio.create_task(anext(tail))
    await asyncio.sleep(0.2)
    await log.stop()
    with pytest.raises(LogError, match="stopped"):
        await asyncio.wait_for(waiting, 10)


async def test_ensure_topic_is_idempotent_and_counts_partitions(
    event_log: EventLog, topic: str
) -> None:
    await event_log.ensure_topic(topic, PARTITIONS)
    assert await event_log.partition_count(topic) == PARTITIONS
    with pytest.raises(LogError):
        await event_log.partition_count(f"missing.{uuid.uuid4().hex}")
    with pytest.raises(LogError):
        await event_log.end_offset(topic, PARTITIONS)


async def test_flush_waits_for_every_append(event_log: EventLog, topic: str) -> None:
    futures = [event_log.append(topic, i % PARTITIONS, b"k", b"v") for i in range(400)]
    await event_log.flush()
    assert all(f.done() and not f.exception() for f in futures)
    assert sum([await event_log.end_offset(topic, p) for p in range(PARTITIONS)]) == 400


async def test_partition_for_places_keys_identically_everywhere(
    event_log: EventLog, topic: str
) -> None:
    # Fixed values: a change here would move existing conversations to other partitions.
    keys = [f"conversation-{i}".encode() for i in range(8)]
    assert [partition_for(key, 4) for key in keys] == [2, 0, 2, 0, 3, 1, 3, 1]
    assert partition_for(b"conversation-0", 1) == 0
    with pytest.raises(ValueError):
        partition_for(b"x", 0)
    key = b"conversation-5"
    partition = partition_for(key, await event_log.partition_count(topic))
    offset = await event_log.append(topic, partition, key, b"hello")
    [record] = await event_log.read_range(topic, partition, offset, offset + 1)
    assert record.key == key


async def test_records_and_commits_survive_reopening(driver: Driver, topic: str) -> None:
    group = unique_group()
    async with driver.make() as first:
        for i in range(5):
            first.append(topic, 1, b"k", str(i).encode())
        await first.flush()
        member = first.consumer(topic, group, "m1")
        seen: list[Record] = []
        task = asyncio.create_task(collect(member, seen, commit_up_to=2))
        await wait_until(lambda: len(seen) == 5)
        await wait_until_committed(first, topic, group, 1, 3)
        await member.close()
        await asyncio.wait_for(task, 30)
    async with driver.make() as reopened:
        assert await reopened.end_offset(topic, 1) == 5
        records = await reopened.read_range(topic, 1, 0, 5)
        assert [r.value for r in records] == [str(i).encode() for i in range(5)]
        assert await reopened.committed(topic, group, 1) == 3
        assert await reopened.partition_count(topic) == PARTITIONS


async def collect(
    consumer: GroupConsumer, sink: list[Record], *, commit_up_to: int | None = None
) -> None:
    """Take records; commit those with offset <= commit_up_to (all when None)."""
    async for record in consumer:
        sink.append(record)
        if commit_up_to is None or record.offset <= commit_up_to:
            await consumer.commit(record)


async def wait_until_committed(
    log: EventLog, topic: str, group: str, partition: int, offset: int
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while await log.committed(topic, group, partition) != offset:
        if loop.time() > deadline:
            raise AssertionError(f"{group} never committed {offset} on {topic}/{partition}")
        await asyncio.sleep(0.05)


def settled(*members: GroupConsumer) -> bool:
    """Every partition owned by exactly one member, and every member owning some."""
    owned = [m.assignment() for m in members]
    union: set[int] = set().union(*owned)
    return (
        all(owned) and union == set(range(PARTITIONS)) and sum(len(o) for o in owned) == PARTITIONS
    )


async def test_committed_is_zero_before_any_commit(event_log: EventLog, topic: str) -> None:
    assert await event_log.committed(topic, unique_group(), 0) == 0


async def test_group_spreads_partitions_and_delivers_each_record_once(
    event_log: EventLog, topic: str
) -> None:
    group = unique_group()
    a, b = event_log.consumer(topic, group, "a"), event_log.consumer(topic, group, "b")
    a_seen: list[Record] = []
    b_seen: list[Record] = []
    tasks = [asyncio.create_task(collect(a, a_seen)), asyncio.create_task(collect(b, b_seen))]
    try:
        await wait_until(lambda: settled(a, b))
        for partition in range(PARTITIONS):
            for i in range(3):
                event_log.append(topic, partition, b"k", f"{partition}:{i}".encode())
        await event_log.flush()
        await wait_until(lambda: len(a_seen) + len(b_seen) >= 3 * PARTITIONS)
        await asyncio.sleep(0.5)  # nothing more must come
        assert len(a_seen) + len(b_seen) == 3 * PARTITIONS
        assert {r.partition for r in a_seen} == a.assignment()
        assert {r.partition for r in b_seen} == b.assignment()
        for seen in (a_seen, b_seen):
            for partition in {r.partition for r in seen}:
                offsets = [r.offset for r in seen if r.partition == partition]
                assert offsets == [0, 1, 2]
        for partition in range(PARTITIONS):
            await wait_until_committed(event_log, topic, group, partition, 3)
    finally:
        await a.close()
        await b.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_uncommitted_records_go_to_the_next_owner_when_a_member_leaves(
    event_log: EventLog, topic: str
) -> None:
    group = unique_group()
    stay, leave = event_log.consumer(topic, group, "a"), event_log.consumer(topic, group, "b")
    stay_seen: list[Record] = []
    leave_seen: list[Record] = []
    stay_task = asyncio.create_task(collect(stay, stay_seen))
    # The leaving member finishes only the first record of each of its partitions.
    leave_task = asyncio.create_task(collect(leave, leave_seen, commit_up_to=0))
    try:
        await wait_until(lambda: settled(stay, leave))
        handed_over = leave.assignment()
        for partition in range(PARTITIONS):
            for i in range(3):
                event_log.append(topic, partition, b"k", f"{partition}:{i}".encode())
        await event_log.flush()
        await wait_until(lambda: len(leave_seen) == 3 * len(handed_over))
        for partition in handed_over:
            await wait_until_committed(event_log, topic, group, partition, 1)
        await leave.close()
        await asyncio.wait_for(leave_task, 30)
        assert leave.assignment() == frozenset()
        await wait_until(lambda: stay.assignment() == set(range(PARTITIONS)))
        expected = sorted((p, offset) for p in handed_over for offset in (1, 2))
        await wait_until(
            lambda: (
                sorted((r.partition, r.offset) for r in stay_seen if r.partition in handed_over)
                == expected
            )
        )
        for partition in range(PARTITIONS):
            await wait_until_committed(event_log, topic, group, partition, 3)
    finally:
        await stay.close()
        await leave.close()
        await asyncio.wait_for(asyncio.gather(stay_task, leave_task), 30)


async def test_a_member_stops_receiving_and_committing_partitions_it_lost(
    event_log: EventLog, topic: str
) -> None:
    group = unique_group()
    first = event_log.consumer(topic, group, "a")
    first_seen: list[Record] = []
    first_task = asyncio.create_task(collect(first, first_seen, commit_up_to=-1))
    await wait_until(lambda: first.assignment() == set(range(PARTITIONS)))
    for partition in range(PARTITIONS):
        await event_log.append(topic, partition, b"k", b"before")
    await wait_until(lambda: len(first_seen) == PARTITIONS)
    second = event_log.consumer(topic, group, "b")
    second_seen: list[Record] = []
    second_task = asyncio.create_task(collect(second, second_seen, commit_up_to=-1))
    try:
        await wait_until(lambda: settled(first, second))
        lost = second.assignment()
        # A late commit of a lost partition must not move the new owner's offset.
        for record in first_seen:
            if record.partition in lost:
                await first.commit(record)
        for partition in lost:
            assert await event_log.committed(topic, group, partition) == 0
        # The new owner gets what was never committed; the old owner gets nothing new there.
        await wait_until(
            lambda: {(r.partition, r.offset) for r in second_seen} >= {(p, 0) for p in lost}
        )
        count_before = len(first_seen)
        for partition in lost:
            await event_log.append(topic, partition, b"k", b"after")
        await wait_until(lambda: sum(r.offset == 1 for r in second_seen) == len(lost))
        await asyncio.sleep(0.3)
        assert len(first_seen) == count_before
    finally:
        await first.close()
        await second.close()
        await asyncio.wait_for(asyncio.gather(first_task, second_task), 30)


async def test_an_append_fenced_by_a_lost_claim_is_refused_and_writes_nothing(
    event_log: EventLog, topic: str
) -> None:
    group = unique_group()
    first = event_log.consumer(topic, group, "a")
    first_task = asyncio.create_task(collect(first, [], commit_up_to=-1))
    second: GroupConsumer | None = None
    second_task: asyncio.Task[None] | None = None
    try:
        await wait_until(lambda: first.assignment() == set(range(PARTITIONS)))
        before = {p: first.claim(p) for p in range(PARTITIONS)}
        assert all(claim is not None for claim in before.values())
        assert await event_log.append(topic, 0, b"k", b"owner", fence=before[0]) == 0
        second = event_log.consumer(topic, group, "b")
        second_task = asyncio.create_task(collect(second, [], commit_up_to=-1))
        await wait_until(lambda: settled(first, second))
        lost = sorted(second.assignment())
        for partition in lost:
            end = await event_log.end_offset(topic, partition)
            with pytest.raises(Fenced):
                await event_log.append(topic, partition, b"k", b"zombie", fence=before[partition])
            assert first.claim(partition) is None
            current = second.claim(partition)
            assert current is not None and current != before[partition]
            assert await event_log.append(topic, partition, b"k", b"new", fence=current) == end
            records = await event_log.read_range(topic, partition, end, end + 5)
            assert [r.value for r in records] == [b"new"]
        for partition in first.assignment():
            assert first.claim(partition) == before[partition]
            await event_log.append(topic, partition, b"k", b"still", fence=before[partition])
    finally:
        await first.close()
        if second is not None:
            await second.close()
        await asyncio.wait_for(
            asyncio.gather(first_task, *([second_task] if second_task else [])), 30
        )


ZOMBIE = """
import asyncio, json, signal, sys
from pathlib import Path
from mesh.log import Fenced

async def main(driver: str, location: str, topic: str, group: str) -> None:
    if driver == "kafka":
        from mesh.log import LogSettings
        from mesh.log.kafka import KafkaLog
        log = KafkaLog(
            location,
            session_timeout_s=SESSION_S,
            heartbeat_interval_s=HEARTBEAT_S,
            config=LogSettings.from_env().kafka_config(),
        )
    else:
        from mesh.log.embedded import EmbeddedLog
        log = EmbeddedLog(
            Path(location), session_timeout_s=SESSION_S, heartbeat_interval_s=HEARTBEAT_S
        )
    async with log:
        member = log.consumer(topic, group, "zombie")
        records = aiter(member)
        record = await anext(records)
        claim = member.claim(record.partition)
        assert claim is not None
        resumed = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGCONT, resumed.set)
        print(json.dumps([record.partition, claim.epoch]), flush=True)
        # Stopped here (SIGSTOP) while another member takes the partition over; the first thing
        # it does once resumed is to append as if nothing had happened.
        await resumed.wait()
        try:
            offset = await log.append(topic, record.partition, b"k", b"zombie", fence=claim)
        except Fenced as error:
            print(json.dumps({"fenced": str(error)}), flush=True)
        else:
            print(json.dumps({"offset": offset}), flush=True)
        await member.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_stopped_process_that_lost_its_claim_cannot_append(
    driver: Driver, event_log: EventLog, topic: str
) -> None:
    """A real zombie: a member's process stopped (SIGSTOP) past its session while another
    member takes its partition, then resumed: its append with the old claim is refused, and
    the partition holds only what the new owner wrote."""
    group = unique_group()
    for partition in range(PARTITIONS):
        await event_log.append(topic, partition, b"k", b"request")
    code = f"SESSION_S = {SESSION_S}\nHEARTBEAT_S = {HEARTBEAT_S}\n{ZOMBIE}"
    zombie = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        driver.name,
        driver.location,
        topic,
        group,
        env=dict(
            os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'gen' / 'python'}", **driver.env
        ),
        stdout=asyncio.subprocess.PIPE,
    )
    assert zombie.stdout is not None
    successor = event_log.consumer(topic, group, "successor")
    task: asyncio.Task[None] | None = None
    try:
        line = await asyncio.wait_for(zombie.stdout.readline(), 60)
        partition, _ = json.loads(line)
        zombie.send_signal(signal.SIGSTOP)
        seen: list[Record] = []
        task = asyncio.create_task(collect(successor, seen, commit_up_to=-1))
        await wait_until(
            lambda: any(r.partition == partition for r in seen), within_s=SESSION_S + 30
        )
        claim = successor.claim(partition)
        assert claim is not None
        taken = await event_log.append(topic, partition, b"k", b"successor", fence=claim)
        zombie.send_signal(signal.SIGCONT)
        outcome = json.loads(await asyncio.wait_for(zombie.stdout.readline(), 60))
        assert "fenced" in outcome, outcome
        records = await event_log.read_range(topic, partition, 0, taken + 5)
        assert [r.value for r in records] == [b"request", b"successor"]
        assert await asyncio.wait_for(zombie.wait(), 60) == 0
    finally:
        if zombie.returncode is None:
            zombie.send_signal(signal.SIGCONT)
            zombie.kill()
            await zombie.wait()
        await successor.close()
        if task is not None:
            await asyncio.wait_for(task, 30)


async def test_live_partitions_follow_the_groups_members(event_log: EventLog, topic: str) -> None:
    group = unique_group()
    assert await event_log.live_partitions(topic, group) == frozenset()
    member = event_log.consumer(topic, group, "a")
    task = asyncio.create_task(collect(member, []))
    try:
        await wait_until(lambda: member.assignment() == set(range(PARTITIONS)))
        covered: frozenset[int] = frozenset()
        for _ in range(100):
            covered = await event_log.live_partitions(topic, group)
            if covered == set(range(PARTITIONS)):
                break
            await asyncio.sleep(0.1)
        assert covered == set(range(PARTITIONS))
    finally:
        await member.close()
        await asyncio.wait_for(task, 30)
    for _ in range(100):
        if not await event_log.live_partitions(topic, group):
            break
        await asyncio.sleep(0.1)
    assert await event_log.live_partitions(topic, group) == frozenset()


async def test_check_writable_answers_while_started_and_fails_once_stopped(
    driver: Driver, topic: str
) -> None:
    log = driver.make()
    async with log:
        await log.check_writable(topic)
        with pytest.raises(LogError):
            await log.check_writable("no.such.topic")
    with pytest.raises(LogError):
        await log.check_writable(topic)


MEMBER = """
import asyncio, json, sys
from pathlib import Path

async def main(driver: str, location: str, topic: str, group: str) -> None:
    if driver == "kafka":
        from mesh.log import LogSettings
        from mesh.log.kafka import KafkaLog
        log = KafkaLog(
            location,
            session_timeout_s=SESSION_S,
            heartbeat_interval_s=HEARTBEAT_S,
            config=LogSettings.from_env().kafka_config(),
        )
    else:
        from mesh.log.embedded import EmbeddedLog
        log = EmbeddedLog(
            Path(location), session_timeout_s=SESSION_S, heartbeat_interval_s=HEARTBEAT_S
        )
    async with log:
        member = log.consumer(topic, group, "doomed")
        async for record in member:
            if record.offset == 0:
                await member.commit(record)  # only the first record of a partition is done
            print(json.dumps([record.partition, record.offset]), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_killed_member_loses_its_partitions_and_its_uncommitted_records_move(
    driver: Driver, event_log: EventLog, topic: str
) -> None:
    group = unique_group()
    code = f"SESSION_S = {SESSION_S}\nHEARTBEAT_S = {HEARTBEAT_S}\n{MEMBER}"
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        driver.name,
        driver.location,
        topic,
        group,
        env=dict(
            os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'gen' / 'python'}", **driver.env
        ),
        stdout=asyncio.subprocess.PIPE,
    )
    assert doomed.stdout is not None
    survivor = event_log.consumer(topic, group, "survivor")
    survivor_seen: list[Record] = []
    task = asyncio.create_task(collect(survivor, survivor_seen))
    try:
        # The other member is live once the survivor owns only part of the topic.
        await wait_until(lambda: 0 < len(survivor.assignment()) < PARTITIONS, within_s=60)
        await asyncio.sleep(3 * HEARTBEAT_S)
        doomed_partitions = set(range(PARTITIONS)) - survivor.assignment()
        for partition in range(PARTITIONS):
            for i in range(3):
                event_log.append(topic, partition, b"k", f"{partition}:{i}".encode())
        await event_log.flush()
        doomed_seen: set[tuple[int, int]] = set()
        while len(doomed_seen) < 3 * len(doomed_partitions):
            line = await asyncio.wait_for(doomed.stdout.readline(), 30)
            assert line, "the member process ended early"
            partition, offset = json.loads(line)
            doomed_seen.add((partition, offset))
        assert {p for p, _ in doomed_seen} == doomed_partitions
        for partition in doomed_partitions:
            await wait_until_committed(event_log, topic, group, partition, 1)
        doomed.send_signal(signal.SIGKILL)  # no leave: only the session timeout tells
        await doomed.wait()
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await wait_until(lambda: survivor.assignment() == set(range(PARTITIONS)), within_s=30)
        moved_after = loop.time() - killed_at
        assert moved_after < SESSION_S + 5, f"partitions moved only after {moved_after:.1f} s"
        expected = sorted((p, offset) for p in doomed_partitions for offset in (1, 2))
        await wait_until(
            lambda: (
                sorted(
                    (r.partition, r.offset)
                    for r in survivor_seen
                    if r.partition in doomed_partitions
                )
                == expected
            )
        )
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()
        await survivor.close()
        await asyncio.wait_for(task, 30)


@pytest.mark.infra
async def test_a_kafka_member_starved_past_its_session_hands_its_records_out_again(
    kafka_bootstrap: str,
    kafka_client_config: dict[str, str],
) -> None:
    """Kafka only: a member whose thread did not run for a whole session voids its claims (it
    may have been stopped, and the broker may have moved its partitions). When the broker did
    not (the thread was only starved), the records handed out under the void claims come again
    under new claims, so nothing handed out is lost."""
    from mesh.log.kafka import KafkaLog

    log = KafkaLog(
        kafka_bootstrap,
        session_timeout_s=SESSION_S,
        heartbeat_interval_s=HEARTBEAT_S,
        config=kafka_client_config,
    )
    async with log:
        topic = f"conformance.{uuid.uuid4().hex[:12]}"
        await log.ensure_topic(topic, PARTITIONS)
        await log.append(topic, 1, b"k", b"turn")
        member = log.consumer(topic, unique_group(), "starved")
        records = aiter(member)
        try:
            first = await asyncio.wait_for(anext(records), 60)
            before = member.claim(first.partition)
            assert before is not None
            member._last_round -= 10 * SESSION_S  # as if its thread had not run for that long
            again = await asyncio.wait_for(anext(records), 30)
            assert (again.partition, again.offset) == (first.partition, first.offset)
            after = member.claim(first.partition)
            assert after is not None and after != before
            with pytest.raises(Fenced):
                await log.append(topic, 1, b"k", b"stale", fence=before)
            assert await log.append(topic, 1, b"k", b"current", fence=after) == 1
        finally:
            await member.close()


@pytest.mark.infra
async def test_a_kafka_member_whose_event_loop_hangs_leaves_its_group(
    kafka_bootstrap: str,
    kafka_client_config: dict[str, str],
) -> None:
    """Kafka only: librdkafka heartbeats from its own thread, so a member whose event loop is
    stuck would keep its partitions for ever; it leaves the group instead, voiding its claims."""
    from mesh.log.kafka import KafkaLog

    log = KafkaLog(
        kafka_bootstrap,
        session_timeout_s=SESSION_S,
        heartbeat_interval_s=HEARTBEAT_S,
        max_loop_stall_s=1.0,
        config=kafka_client_config,
    )
    async with log:
        topic = f"conformance.{uuid.uuid4().hex[:12]}"
        group = unique_group()
        await log.ensure_topic(topic, PARTITIONS)
        await log.append(topic, 2, b"k", b"turn")
        member = log.consumer(topic, group, "hung")
        records = aiter(member)
        try:
            first = await asyncio.wait_for(anext(records), 60)
            claim = member.claim(first.partition)
            assert claim is not None
            time.sleep(3.0)  # noqa: ASYNC251 - the event loop hangs, as a stuck agent's would
            await asyncio.sleep(0.5)
            assert member.claim(first.partition) is None
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(records), 30)
            with pytest.raises(Fenced):
                await log.append(topic, 2, b"k", b"late", fence=claim)
            await wait_until(lambda: not member.assignment())
            for _ in range(100):
                if not await log.live_partitions(topic, group):
                    break
                await asyncio.sleep(0.1)
            assert await log.live_partitions(topic, group) == frozenset()
        finally:
            await member.close()
