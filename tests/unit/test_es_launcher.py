"""Pure logic of the Elasticsearch launcher: settings, JVM options, unpacking, fetch caching."""

from __future__ import annotations

import json
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from mesh.infra import elasticsearch as es
from mesh.infra.elasticsearch import (
    ES_VERSION,
    ElasticsearchError,
    ElasticsearchServer,
    default_home_dir,
    fetch_distribution,
    java_home,
    jvm_options,
    node_settings,
    render_settings,
)


def test_node_settings_single_loopback_node_on_os_picked_ports(tmp_path: Path) -> None:
    settings = node_settings(
        data_dir=tmp_path / "data",
        logs_dir=tmp_path / "logs",
        available_modules=frozenset({"x-pack-security", "transport-netty4"}),
    )
    assert settings["network.host"] == "127.0.0.1"
    assert settings["http.port"] == settings["transport.port"] == 0
    assert settings["node.portsfile"] is True
    assert settings["discovery.type"] == "single-node"
    assert settings["cluster.routing.allocation.disk.threshold_enabled"] is False
    assert settings["xpack.security.enabled"] is False
    assert settings["path.data"] == str(tmp_path / "data")
    assert "ingest.geoip.downloader.enabled" not in settings


def test_settings_of_absent_modules_are_left_out(tmp_path: Path) -> None:
    # The node rejects settings nobody registered, so they depend on the modules shipped.
    bare = node_settings(data_dir=tmp_path, logs_dir=tmp_path, available_modules=frozenset())
    assert "xpack.security.enabled" not in bare
    geoip = node_settings(
        data_dir=tmp_path, logs_dir=tmp_path, available_modules=frozenset({"ingest-geoip"})
    )
    assert geoip["ingest.geoip.downloader.enabled"] is False


def test_render_settings_quotes_values_as_yaml_scalars() -> None:
    text = render_settings({"path.data": '/tmp/a b/"x"', "http.port": 0, "node.portsfile": True})
    assert text == 'path.data: "/tmp/a b/\\"x\\""\nhttp.port: 0\nnode.portsfile: true\n'


def test_jvm_options_write_only_into_the_logs_dir() -> None:
    distribution = "\n".join(
        [
            "-XX:+UseG1GC",
            "-XX:+HeapDumpOnOutOfMemoryError",
            "-XX:ErrorFile=hs_err_pid%p.log",
            "-Xlog:gc*,gc+age=trace,safepoint:file=gc.log:utctime,level,pid,tags:"
            "filecount=32,filesize=64m",
        ]
    )
    options = jvm_options(distribution, Path("/n/logs")).splitlines()
    assert options == [
        "-XX:+UseG1GC",
        "-XX:ErrorFile=/n/logs/hs_err_pid%p.log",
        "-Xlog:gc*,gc+age=trace,safepoint:file=/n/logs/gc.log:utctime,level,pid,tags:"
        "filecount=2,filesize=16m",
    ]


def test_read_ports_file(tmp_path: Path) -> None:
    ports = tmp_path / "http.ports"
    assert es._read_ports_file(ports) is None
    ports.write_text("[::1]:9201\n127.0.0.1:9200\n")
    assert es._read_ports_file(ports) == "127.0.0.1:9200"


def _zip(path: Path, entries: dict[str, tuple[str, int]]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, (content, mode) in entries.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            archive.writestr(info, content)


def test_extract_keeps_exec_bits_and_makes_files_readable(tmp_path: Path) -> None:
    archive = tmp_path / "d.zip"
    _zip(archive, {"es/bin/elasticsearch": ("#!/bin/sh\n", 0o750), "es/lib/a.jar": ("x", 0o600)})
    es._extract(archive, tmp_path / "out")
    script = (tmp_path / "out" / "es" / "bin" / "elasticsearch").stat().st_mode
    jar = (tmp_path / "out" / "es" / "lib" / "a.jar").stat().st_mode
    assert script & 0o777 == 0o754
    assert jar & 0o777 == 0o644


def test_extract_refuses_paths_outside_the_target(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    _zip(archive, {"../escape.txt": ("x", 0o644)})
    with pytest.raises(ElasticsearchError, match="outside"):
        es._extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_fetch_is_skipped_once_the_marker_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = default_home_dir(tmp_path)
    assert home == tmp_path / "infra" / "elasticsearch" / f"elasticsearch-{ES_VERSION}"

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a completed fetch must not run Maven again")

    monkeypatch.setattr(subprocess, "run", no_network)
    home.mkdir(parents=True)
    (home / es._MARKER).write_text(json.dumps({"modules": []}))
    assert fetch_distribution(home) == home


def test_a_zip_that_differs_from_its_pinned_digest_is_never_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_maven(args: list[str], **kwargs: object) -> None:
        out = Path(next(a for a in args if a.startswith("-DoutputDirectory=")).split("=", 1)[1])
        out.mkdir(parents=True)
        with zipfile.ZipFile(out / f"elasticsearch-{ES_VERSION}.zip", "w") as zipped:
            zipped.writestr(f"elasticsearch-{ES_VERSION}/bin/elasticsearch", "#!/bin/sh\n")

    monkeypatch.setattr(es, "run_maven", fake_maven)
    with pytest.raises(ElasticsearchError, match=r"elasticsearch-[0-9.]+zip: expected sha256"):
        fetch_distribution(tmp_path / "home")
    assert not (tmp_path / "home").exists()
    assert not (tmp_path / "home.partial").exists()


def test_fetch_without_maven_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(es.shutil, "which", lambda name, path=None: None)
    with pytest.raises(ElasticsearchError, match="apt-get install maven"):
        fetch_distribution(tmp_path / "home")


def test_java_home_prefers_es_java_home(tmp_path: Path) -> None:
    jdk = tmp_path / "jdk"
    (jdk / "bin").mkdir(parents=True)
    (jdk / "bin" / "java").write_text("")
    assert java_home({"ES_JAVA_HOME": str(jdk), "JAVA_HOME": "/nope", "PATH": ""}) == jdk
    assert java_home({"JAVA_HOME": str(jdk), "PATH": ""}) == jdk
    with pytest.raises(ElasticsearchError, match="Java 17"):
        java_home({"PATH": str(tmp_path / "empty")})


def test_server_validates_heap_and_stop_before_start_is_harmless(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heap"):
        ElasticsearchServer(tmp_path, heap="lots")
    server = ElasticsearchServer(tmp_path, heap="1g")
    assert server.node_dir == tmp_path / "infra" / "elasticsearch" / "node"
    assert server.home_dir == default_home_dir(tmp_path)
    server.stop()
    assert server.url is None
