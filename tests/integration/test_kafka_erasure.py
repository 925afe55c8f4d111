"""Erasure on the Kafka log, proven on the broker's disk (issue 12).

The mesh runs through the launcher on a broker of its own (TLS and SASL, as the scale profile),
with a retention of seconds. A turn whose user text carries a marker goes through the gateway,
the conversation is erased with ``mesh erase``, a later turn is written after the segment time
(so the segment holding the marker is no longer the one being written), and the broker's log
dirs are scanned byte by byte: before the retention passes the marker is in the mesh topics'
files (so the scan can fail), never in ``__consumer_offsets`` or the cluster metadata; after it,
in no file at all.

The broker checks retention every 500 ms from its start and deletes files at once
(``log.segment.delete.delay.ms`` 0); production defaults are 5 min (the first after 30 s) and 1
min, see docs/security.md#erasure for the bound.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from chat.gateway.v1 import gateway_pb2

from mesh.certs import CertDir
from mesh.cli import main as cli_main
from mesh.infra.kafka import KafkaServer, default_jars_dir
from mesh.infra.security import ServerTls
from mesh.launcher import Mesh, MeshConfig, MeshStartError, client_env
from mesh.log import TURN_EVENTS, TURN_REQUESTS
from mesh.settings import default_state_dir
from tests.fixtures.mesh import make_keys
from tests.fixtures.postgres import create_database
from tests.integration.grpc_helpers import auth, gateway, start_request, stream_turn
from tests.integration.test_erasure import found_in_postgres

pytestmark = [pytest.mark.integration, pytest.mark.infra]

ROOT = Path(__file__).resolve().parents[2]
# The mesh topics' retention and segment time. The retention must outlast a turn, its erasure,
# the segment time and a second turn on a busy 2-core machine, so the scan before it passes
# still sees the marker.
RETENTION_S = 12.0
SEGMENT_S = 1.0
# The broker's retention pass interval, and how long the test waits past the bound for it.
CHECK_MS = 500
SLACK_S = 30.0


@pytest.fixture
def broker(tmp_path: Path, server_certs: CertDir) -> Iterator[KafkaServer]:
    state_dir = default_state_dir({"MESH_STATE_DIR": str(ROOT / ".state"), **os.environ})
    server = KafkaServer(
        tmp_path / "kafka",
        jars_dir=default_jars_dir(state_dir),
        data_dir=tmp_path / "kafka",
        tls=ServerTls.issue(server_certs, "kafka"),
        broker_config={
            "log.retention.check.interval.ms": str(CHECK_MS),
            "log.initial.task.delay.ms": "0",  # the first pass, 30 s after start by default
            "log.segment.delete.delay.ms": "0",  # topics' default file.delete.delay.ms
        },
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def kafka_mesh(
    tmp_path: Path, broker: KafkaServer, tiny_model_path: Path, pg_server_dsn: str
) -> Iterator[tuple[Mesh, str]]:
    state_dir = tmp_path / "mesh"
    state_dir.mkdir()
    keys_file = state_dir / "api-keys.json"
    key, _, _ = make_keys(keys_file)
    assert broker.bootstrap is not None
    config = MeshConfig(
        state_dir=state_dir,
        model_path=tiny_model_path,
        api_keys_file=keys_file,
        log_driver="kafka",
        kafka_bootstrap=broker.bootstrap,
        pg_dsn=create_database(pg_server_dsn, prefix="kafka_erase"),
        partitions=1,  # both turns on the same partitions: the second one rolls the segment
        n_ctx=256,
        extra_env={
            **client_env(broker),
            "MESH_LOG_RETENTION_HOURS": str(RETENTION_S / 3600),
            "MESH_LOG_SEGMENT_HOURS": str(SEGMENT_S / 3600),
            "MESH_AGENT_DEFAULT_MAX_TOKENS": "4",
        },
    )
    mesh = Mesh(config)
    try:
        mesh.start(timeout_s=240)
    except MeshStartError as error:
        pytest.fail(f"the mesh on Kafka did not start: {error}")
    try:
        (state_dir / "mesh.json").write_text(json.dumps(mesh.describe()))
        yield mesh, key
    finally:
        mesh.stop()


def files_holding(log_dirs: Path, needle: bytes) -> list[str]:
    """Every file under the broker's log dirs (segments, indexes, snapshots, checkpoints) that
    holds ``needle``, as ``partition-dir/file``."""
    found = []
    for path in sorted(log_dirs.rglob("*")):
        try:
            if path.is_file() and needle in path.read_bytes():
                found.append(f"{path.parent.name}/{path.name}")
        except FileNotFoundError:  # deleted by the broker meanwhile
            continue
    return found


def persisted(stub: object, key: str, conversation_id: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        reply = stub.GetConversation(  # type: ignore[attr-defined]
            gateway_pb2.GetConversationRequest(conversation_id=conversation_id),
            metadata=auth(key),
            timeout=15,
        )
        if len(reply.conversation.messages) == 2:
            return
        assert time.monotonic() < deadline, "the turn was never persisted"
        time.sleep(0.2)


def test_erased_text_leaves_the_kafka_segments_within_the_retention(
    kafka_mesh: tuple[Mesh, str], broker: KafkaServer, pg_server_dsn: str
) -> None:
    mesh, key = kafka_mesh
    log_dirs = broker.data_dir / "data"
    erased = f"quokka{uuid.uuid4().hex[:12]}"
    kept = f"wombat{uuid.uuid4().hex[:12]}"
    with grpc.insecure_channel(mesh.gateway_addr) as channel:
        stub = gateway(channel)
        written = time.monotonic()
        first = stream_turn(stub, key, start_request(f"please remember {erased}", max_tokens=4))
        assert first.finished is not None
        persisted(stub, key, first.conversation_id)
        assert files_holding(log_dirs, erased.encode())  # on the broker's disk

        out, err = io.StringIO(), io.StringIO()
        argv = ["erase", "--tenant", "tenant-a", "--conversation", first.conversation_id]
        argv += ["--state", str(mesh.config.state_dir / "mesh.json")]
        assert cli_main(argv, environ={}, out=out, err=err) == 0, err.getvalue()
        assert "1 conversations, 2 messages" in out.getvalue()
        assert found_in_postgres(mesh.pg_dsn, erased) == []

        # A later write past the segment time: the marker's segment is no longer the active
        # one, as on a partition that keeps being written.
        time.sleep(max(0.0, written + SEGMENT_S + 0.5 - time.monotonic()))
        second = stream_turn(stub, key, start_request(f"keep {kept}", max_tokens=4))
        assert second.finished is not None

    before = files_holding(log_dirs, erased.encode())
    looked_after = time.monotonic() - written
    assert looked_after < RETENTION_S, "too slow to look before retention passed"
    print(f"scanned {looked_after:.1f} s after the erased text was written")
    # The second turn rolled the segments: the marker's is no longer the one being written.
    for topic in (TURN_REQUESTS, TURN_EVENTS):
        assert len(list((log_dirs / f"{topic}-0").glob("*.log"))) >= 2, topic
    assert before and all(name.startswith((TURN_REQUESTS, TURN_EVENTS)) for name in before), before
    assert any(name.endswith(".log") for name in before), before
    assert files_holding(log_dirs, kept.encode())
    # Group offsets and cluster metadata never hold user text (no transactions here).
    internal = [p for p in log_dirs.iterdir() if p.name.startswith("__")]
    assert any(p.name.startswith("__consumer_offsets") for p in internal)
    for directory in internal:
        assert files_holding(directory, erased.encode()) == []
        assert files_holding(directory, kept.encode()) == []

    # Gone within retention + segment time + a retention pass (plus slack for a busy machine).
    deadline = written + RETENTION_S + SEGMENT_S + CHECK_MS / 1000 + SLACK_S
    while files_holding(log_dirs, erased.encode()):
        assert time.monotonic() < deadline, files_holding(log_dirs, erased.encode())
        time.sleep(0.25)
    gone_after = time.monotonic() - written
    print(f"the erased text left the broker's disk {gone_after:.1f} s after it was written")
    assert gone_after > RETENTION_S  # deleted by retention, not by something else
    assert list(log_dirs.glob(f"{TURN_REQUESTS}-0/*.log"))  # the partition itself is there
