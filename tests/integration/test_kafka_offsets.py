"""``KafkaLog.committed`` on a real broker: a live group's offsets, read without disturbing it.

The admin client's offset fetch crashed the process (SIGSEGV in librdkafka's
``rd_kafka_cgrp_op``) when the coordinator answered NOT_COORDINATOR; the log now reads through a
consumer of the group that never joins it (mesh/log/kafka/offsets.py). These tests check that it
reads right, that the group's members see no rebalance, and that reads go on across a broker
restart (when NOT_COORDINATOR is answered) without a crash.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from mesh.infra.kafka import KafkaServer, default_jars_dir
from mesh.log.kafka import KafkaLog
from mesh.settings import default_state_dir

pytestmark = [pytest.mark.integration, pytest.mark.infra]

ROOT = Path(__file__).resolve().parents[2]


class Member:
    """A plain librdkafka member of a group, counting the rebalances it goes through."""

    def __init__(self, bootstrap: str, config: dict[str, str], group: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "client.id": "observed-member",
                "enable.auto.commit": False,
                # As the mesh's members: cooperative rebalances, short sessions.
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
                "log_level": 3,
                **config,
            }
        )
        self.assigned: list[list[int]] = []
        self.revoked: list[list[int]] = []
        self._stop = threading.Event()
        self._commits: queue.SimpleQueue[tuple[list[TopicPartition], threading.Event]] = (
            queue.SimpleQueue()
        )
        self.consumer.subscribe(
            [topic],
            on_assign=lambda _, tps: self.assigned.append([tp.partition for tp in tps]),
            on_revoke=lambda _, tps: self.revoked.append([tp.partition for tp in tps]),
        )
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        # Commits are made here: a synchronous commit from another thread waits for a result
        # that this thread's poll would take.
        while not self._stop.is_set():
            self.consumer.poll(0.1)
            try:
                offsets, done = self._commits.get_nowait()
            except queue.Empty:
                continue
            self.consumer.commit(offsets=offsets, asynchronous=False)
            done.set()

    def commit(self, offsets: dict[int, int], topic: str) -> None:
        done = threading.Event()
        self._commits.put(([TopicPartition(topic, p, o) for p, o in offsets.items()], done))
        assert done.wait(30), "the member's commit did not complete"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


async def test_committed_reads_a_live_groups_offsets_and_never_joins_it(
    kafka_bootstrap: str, kafka_client_config: dict[str, str]
) -> None:
    topic, group = f"offsets-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"
    async with KafkaLog(kafka_bootstrap, config=kafka_client_config) as log:
        await log.ensure_topic(topic, 2)
        for partition in (0, 1):
            for _ in range(6):
                log.append(topic, partition, b"k", b"v")
        await log.flush()
        member = Member(kafka_bootstrap, kafka_client_config, group, topic)
        try:
            deadline = time.monotonic() + 30
            while sorted(p for ps in member.assigned for p in ps) != [0, 1]:
                assert time.monotonic() < deadline, "the member never got both partitions"
                await asyncio.sleep(0.1)
            await asyncio.to_thread(member.commit, {0: 3, 1: 5}, topic)

            # Reads repeated over a few heartbeats: a reader that joined would show up as a
            # second member and move a partition away from the first.
            for _ in range(15):
                assert await log.committed(topic, group, 0) == 3
                assert await log.committed(topic, group, 1) == 5
                await asyncio.sleep(0.2)
            assert await log.committed(topic, f"{group}-idle", 0) == 0  # nothing committed
            await asyncio.to_thread(member.commit, {0: 4}, topic)
            assert await log.committed(topic, group, 0) == 4

            admin = AdminClient({"bootstrap.servers": kafka_bootstrap, **kafka_client_config})
            described = admin.describe_consumer_groups([group])[group].result(timeout=30)
            assert [m.client_id for m in described.members] == ["observed-member"]
            assert member.assigned == [[0, 1]] and member.revoked == []
        finally:
            await asyncio.to_thread(member.close)


def commit(bootstrap: str, offset: int) -> None:
    committer = Consumer({"bootstrap.servers": bootstrap, "group.id": "g"})
    try:
        committer.commit(offsets=[TopicPartition("t", 0, offset)], asynchronous=False)
    finally:
        committer.close()


def read_until(probe: subprocess.Popen[str], wanted: str, lines: list[str]) -> None:
    assert probe.stdout is not None
    for line in probe.stdout:
        lines.append(line.strip())
        if line.strip() == wanted:
            return
    raise AssertionError(f"the probe ended (status {probe.wait()}) before {wanted!r}: {lines[-5:]}")


def test_reads_survive_a_broker_restart(tmp_path: Path) -> None:
    """NOT_COORDINATOR while ``__consumer_offsets`` loads again is an error, not a crash."""
    state_dir = default_state_dir({"MESH_STATE_DIR": str(ROOT / ".state"), **os.environ})
    server = KafkaServer(tmp_path, jars_dir=default_jars_dir(state_dir), data_dir=tmp_path)
    bootstrap = server.start()
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("t", num_partitions=1)])["t"].result(timeout=30)
        commit(bootstrap, 7)
        probe = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.kafka_offsets_probe", bootstrap, "g", "t"]
            + ["180"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        try:
            started = time.monotonic()
            read_until(probe, "ok 7", lines)
            print(f"first read after {time.monotonic() - started:.1f} s")
            server.stop()
            time.sleep(1.0)  # reads while the broker is gone
            server.start()
            print(f"broker back after {time.monotonic() - started:.1f} s")
            # A new offset, committed after the restart, read by the same process.
            commit(bootstrap, 9)
            read_until(probe, "ok 9", lines)
            print(f"read it after {time.monotonic() - started:.1f} s")
            rest, _ = probe.communicate("", timeout=60)  # closing its stdin stops it
            lines += rest.splitlines()
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait()
        assert probe.returncode == 0, f"the probe died with status {probe.returncode}"
        errors = sorted({line[:100] for line in lines if line.startswith("error")})
        print(f"{len(lines)} reads, {len(errors)} kinds of errors: {errors}")
    finally:
        server.stop()
