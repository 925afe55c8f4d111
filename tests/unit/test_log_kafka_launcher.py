"""The Kafka launcher's offline parts: jar cache, cluster ids, broker configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mesh.infra import kafka
from mesh.infra.kafka import KafkaError, KafkaServer, default_jars_dir, fetch_jars


def test_a_completed_fetch_is_never_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jars = tmp_path / "lib"
    jars.mkdir()
    (jars / ".complete").write_text("kafka_2.13-x.jar\n")
    monkeypatch.setenv("PATH", "")  # no mvn: any network attempt would fail loudly
    assert fetch_jars(jars) == jars


def test_fetch_without_maven_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(KafkaError, match="mvn"):
        fetch_jars(tmp_path / "lib")


def _fake_maven(bin_dir: Path, jar_text: str) -> Path:
    """An ``mvn`` that writes every pinned jar name, with ``jar_text`` as the broker jar's bytes."""
    bin_dir.mkdir()
    names = " ".join(kafka.KAFKA_JARS)
    script = bin_dir / "mvn"
    script.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do case $arg in -DoutputDirectory=*) out=${arg#*=};; '
        '-Dmaven.repo.local=*) echo "$arg" > "$MVN_ARGS_LOG";; esac; done\n'
        'mkdir -p "$out"\n'
        f'for name in {names}; do echo "$name" > "$out/$name"; done\n'
        f'printf %s "{jar_text}" > "$out/kafka_2.13-{kafka.KAFKA_VERSION}.jar"\n'
    )
    script.chmod(0o755)
    return bin_dir


def test_a_jar_that_differs_from_its_pinned_digest_installs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{_fake_maven(tmp_path / 'bin', 'tampered')}:/usr/bin:/bin")
    monkeypatch.setenv("MVN_ARGS_LOG", str(tmp_path / "args"))
    with pytest.raises(KafkaError) as caught:
        fetch_jars(tmp_path / "lib", fresh=True)
    message = str(caught.value)
    assert f"kafka_2.13-{kafka.KAFKA_VERSION}.jar: expected sha256 " in message
    assert kafka.KAFKA_JARS[f"kafka_2.13-{kafka.KAFKA_VERSION}.jar"] in message
    assert not (tmp_path / "lib").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lib.lock", "args", "bin"]
    # --fresh used a throwaway repository, gone once the fetch ended.
    repository = (tmp_path / "args").read_text().strip().split("=", 1)[1]
    assert repository.rsplit("/", 1)[1].startswith("mesh-m2-")
    assert not Path(repository).exists()


def test_jars_are_cached_per_version_under_the_state_dir(tmp_path: Path) -> None:
    assert default_jars_dir(tmp_path) == (
        tmp_path / "infra" / "kafka" / f"kafka-{kafka.KAFKA_VERSION}" / "lib"
    )


def test_cluster_ids_look_like_kafka_uuids() -> None:
    ids = {kafka._cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for value in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", value)
        assert not value.startswith("-")


def test_broker_config_listens_on_loopback_with_fast_group_failover(tmp_path: Path) -> None:
    server = KafkaServer(tmp_path, data_dir=tmp_path / "broker")
    path = server._write_config(port=1111, controller_port=2222)
    config = dict(
        line.split("=", 1) for line in path.read_text().splitlines() if line and "=" in line
    )
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222"
    assert config["controller.quorum.voters"] == "1@127.0.0.1:2222"
    assert config["log.dirs"] == str(tmp_path / "broker" / "data")
    assert config["auto.create.topics.enable"] == "false"
    assert int(config["group.min.session.timeout.ms"]) <= 2000
    assert (tmp_path / "broker" / "log4j2.properties").exists()
