"""The project CA and its certificates (mesh.certs), the TLS settings and file watcher
(mesh.tls), the identity table (mesh.authz) and `mesh certs` from the command line."""

from __future__ import annotations

import datetime
import io
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mesh import authz
from mesh.certs import CertDir, ensure_mesh_certs
from mesh.cli import main as cli_main
from mesh.settings import ServiceSettings, SettingsError, TlsSettings, is_loopback
from mesh.tls import CertificateError, CertificateFiles, identity_of, load_identity, spiffe_id
from services.gateway.settings import GatewaySettings
from services.memory.settings import MemorySettings


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


@pytest.fixture
def certs(tmp_path: Path) -> CertDir:
    certs = CertDir(tmp_path / "certs")
    assert certs.init()
    return certs


def test_init_creates_a_ca_once(certs: CertDir) -> None:
    ca = load(certs.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(certs.ca_key.stat().st_mode) == 0o600
    before = certs.ca_cert.read_bytes()
    assert not certs.init()  # an existing CA is never replaced by accident
    assert certs.ca_cert.read_bytes() == before
    assert certs.init(force=True)
    assert certs.ca_cert.read_bytes() != before


def test_issue_names_the_service_in_its_sans(certs: CertDir) -> None:
    path = certs.issue("memory", dns=["memory.internal"], ips=["10.0.0.7"])
    cert = load(path)
    names = sans(cert)
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://llm-mesh/memory"]
    assert names.get_values_for_type(x509.DNSName) == ["memory", "localhost", "memory.internal"]
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {
        "10.0.0.7",
        "127.0.0.1",
        "::1",
    }
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == load(certs.ca_cert).subject
    assert stat.S_IMODE(certs.key("memory").stat().st_mode) == 0o600
    identity = load_identity(certs.ca_cert, path, certs.key("memory"))
    assert identity.name == "memory"


@pytest.mark.parametrize("bad", ["", "Memory", "../etc", "a/b", "x" * 70])
def test_issue_refuses_names_that_are_not_identities(certs: CertDir, bad: str) -> None:
    with pytest.raises(CertificateError, match="not a valid identity"):
        certs.issue(bad)


def test_issue_refuses_a_bad_ip_and_needs_a_ca(certs: CertDir, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="not an IP address"):
        certs.issue("memory", ips=["not-an-ip"])
    with pytest.raises(CertificateError, match="mesh certs init"):
        CertDir(tmp_path / "empty").issue("memory")


def test_rotate_reissues_with_new_keys_and_keeps_the_names(certs: CertDir) -> None:
    certs.issue("memory", dns=["memory.internal"], ips=["10.0.0.7"])
    certs.issue("agent")
    old_key, old_cert = certs.key("memory").read_bytes(), load(certs.cert("memory"))
    assert certs.rotate() == ["agent", "memory"]
    new_cert = load(certs.cert("memory"))
    assert certs.key("memory").read_bytes() != old_key
    assert new_cert.serial_number != old_cert.serial_number
    assert sans(new_cert) == sans(old_cert)
    with pytest.raises(CertificateError, match="mesh certs issue gateway"):
        certs.rotate(["gateway"])


def test_rotating_the_ca_keeps_the_old_one_trusted(certs: CertDir) -> None:
    certs.issue("memory")
    old_ca = load(certs.ca_cert)
    certs.rotate(ca=True)
    bundle = x509.load_pem_x509_certificates(certs.ca_cert.read_bytes())
    assert len(bundle) == 2 and bundle[1] == old_ca and bundle[0] != old_ca
    assert load(certs.cert("memory")).issuer == bundle[0].subject


def test_ensure_mesh_certs_keeps_good_certificates_and_replaces_expiring_ones(
    tmp_path: Path,
) -> None:
    certs = ensure_mesh_certs(tmp_path / "c", ["memory", "agent"])
    first = certs.cert("memory").read_bytes()
    now = datetime.datetime.now(datetime.UTC)
    certs.issue("agent", not_after=now + datetime.timedelta(hours=1))
    expiring = certs.cert("agent").read_bytes()
    ensure_mesh_certs(tmp_path / "c", ["memory", "agent"])
    assert certs.cert("memory").read_bytes() == first
    assert certs.cert("agent").read_bytes() != expiring


def test_load_identity_names_what_is_wrong(certs: CertDir, tmp_path: Path) -> None:
    certs.issue("memory")
    certs.issue("agent")
    with pytest.raises(CertificateError, match="is not the key of"):
        load_identity(certs.ca_cert, certs.cert("memory"), certs.key("agent"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nope")
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        load_identity(certs.ca_cert, garbage, certs.key("memory"))
    with pytest.raises(CertificateError, match="cannot read the CA bundle"):
        load_identity(tmp_path / "missing.pem", certs.cert("memory"), certs.key("memory"))


def test_certificate_files_follow_a_rotation_and_skip_a_half_written_one(
    certs: CertDir,
) -> None:
    certs.issue("memory")
    certs.issue("agent")
    files = CertificateFiles(TlsSettings(**_paths(certs, "memory"), reload_s=0))
    assert files.changed() is None  # nothing moved
    first = files.current
    # Halfway through a rotation: a new key next to the old certificate. Not used.
    certs.key("memory").write_bytes(certs.key("agent").read_bytes())
    assert files.changed() is None and files.current == first
    certs.rotate(["memory"])
    rotated = files.changed()
    assert rotated is not None and rotated != first and files.current == rotated
    assert files.generation == 1


def test_certificate_files_look_at_most_once_per_interval(certs: CertDir) -> None:
    certs.issue("memory")
    now = [100.0]
    files = CertificateFiles(
        TlsSettings(**_paths(certs, "memory"), reload_s=5), clock=lambda: now[0]
    )
    certs.rotate(["memory"])
    now[0] += 1
    assert files.changed() is None  # too soon to look
    now[0] += 5
    assert files.changed() is not None


def _paths(certs: CertDir, name: str) -> dict[str, Path]:
    return {"ca": certs.ca_cert, "cert": certs.cert(name), "key": certs.key(name)}


# -- settings ---------------------------------------------------------------------------------


def test_tls_settings_come_from_env_all_or_none(certs: CertDir) -> None:
    certs.issue("memory")
    settings = MemorySettings.from_env(certs.env("memory"))
    assert settings.tls.enabled and settings.tls.cert == certs.cert("memory")
    assert MemorySettings.from_env(settings.to_env()) == settings
    assert not MemorySettings.from_env({}).tls.enabled
    with pytest.raises(SettingsError, match="go together"):
        MemorySettings.from_env({"MESH_TLS_CA": str(certs.ca_cert)})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.3.4.5"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "example.com"])
def test_other_hosts_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_a_service_refuses_a_public_address_without_tls(certs: CertDir) -> None:
    with pytest.raises(SettingsError) as refused:
        MemorySettings.from_env({"MESH_MEMORY_HOST": "0.0.0.0"})
    message = str(refused.value)
    assert "MESH_MEMORY_HOST='0.0.0.0'" in message
    assert "MESH_TLS_CA" in message and "mesh certs" in message and "127.0.0.1" in message
    certs.issue("memory")
    assert MemorySettings.from_env({"MESH_MEMORY_HOST": "0.0.0.0", **certs.env("memory")})


def test_the_gateway_needs_its_edge_certificate_on_a_public_address(
    certs: CertDir, tmp_path: Path
) -> None:
    keys = {"MESH_GATEWAY_API_KEYS_FILE": str(tmp_path / "keys.json")}
    public = {**keys, "MESH_GATEWAY_HOST": "0.0.0.0"}
    certs.issue("gateway")
    # The mesh identity alone is not enough: clients reach the public port.
    with pytest.raises(SettingsError, match="MESH_GATEWAY_TLS_CERT and MESH_GATEWAY_TLS_KEY"):
        GatewaySettings.from_env({**public, **certs.env("gateway")})
    with pytest.raises(SettingsError, match="go together"):
        GatewaySettings.from_env({**keys, "MESH_GATEWAY_TLS_CERT": str(certs.cert("gateway"))})
    edge = {
        "MESH_GATEWAY_TLS_CERT": str(certs.cert("gateway")),
        "MESH_GATEWAY_TLS_KEY": str(certs.key("gateway")),
    }
    assert GatewaySettings.from_env({**public, **edge}).tls_cert == certs.cert("gateway")
    assert not GatewaySettings.from_env(keys).listens_with_tls()  # loopback may stay plaintext


def test_every_service_settings_carries_tls() -> None:
    assert "MESH_TLS_CA" in set(ServiceSettings.variables())


# -- the identity table -----------------------------------------------------------------------


def test_identity_of_reads_only_our_trust_domain() -> None:
    assert identity_of(spiffe_id("memory")) == "memory"
    assert identity_of("spiffe://other-mesh/memory") is None
    assert identity_of("spiffe://llm-mesh/") is None
    assert identity_of("spiffe://llm-mesh/a/b") is None


@pytest.mark.parametrize(
    ("method", "allowed"),
    [
        ("/chat.memory.v1.MemoryService/Remember", {"persister"}),
        ("/chat.memory.v1.MemoryService/Recall", {"agent"}),
        ("/chat.memory.v1.MemoryService/Forget", {"persister", "operator"}),
        ("/chat.persister.v1.PersisterService/DeleteConversation", {"gateway", "operator"}),
        ("/chat.persister.v1.PersisterService/EraseTenant", {"operator"}),
        ("/chat.persister.v1.PersisterService/ClaimRequestId", {"gateway"}),
        ("/chat.persister.v1.PersisterService/GetConversation", {"gateway", "agent"}),
        ("/chat.persister.v1.PersisterService/ListConversations", {"gateway", "agent"}),
        ("/chat.persister.v1.PersisterService/ListMessages", {"gateway", "agent"}),
        ("/chat.persister.v1.PersisterService/LookupTurn", {"gateway"}),
        ("/chat.agent.v1.AgentService/Generate", {"operator"}),
        ("/chat.agent.v1.AgentService/GetNodeInfo", {"operator"}),
        ("/chat.memory.v1.MemoryService/SomethingNew", set()),
    ],
)
def test_the_table(method: str, allowed: set[str]) -> None:
    assert authz.allowed_callers(method) == allowed


def test_every_rpc_of_the_internal_services_is_in_the_table() -> None:
    from chat.agent.v1 import agent_service_pb2
    from chat.memory.v1 import memory_service_pb2
    from chat.persister.v1 import persister_service_pb2

    for module in (agent_service_pb2, memory_service_pb2, persister_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert f"/{service.full_name}/{method.name}" in authz.POLICY


def test_health_and_reflection_are_open() -> None:
    assert authz.is_open("/grpc.health.v1.Health/Check")
    assert authz.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not authz.is_open("/chat.memory.v1.MemoryService/Remember")


def test_a_denial_says_who_called_who_may_and_what_to_do() -> None:
    method = "/chat.memory.v1.MemoryService/Remember"
    message = authz.denial(method, ["agent"], authz.allowed_callers(method))
    assert "spiffe://llm-mesh/agent is not allowed" in message
    assert "only spiffe://llm-mesh/persister may call it" in message
    assert "mesh certs issue" in message and "POLICY" in message


# -- mesh certs ---------------------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli_main(list(argv), environ={}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_mesh_certs_from_the_command_line(tmp_path: Path) -> None:
    where = ["--dir", str(tmp_path / "certs")]
    code, out, _ = run_cli("certs", "init", *where)
    assert code == 0 and "created the CA" in out
    code, _, err = run_cli("certs", "init", *where)
    assert code == 1 and "already exists" in err and "rotate --ca" in err
    code, out, _ = run_cli("certs", "issue", "memory", "--ip", "10.0.0.7", *where)
    assert code == 0 and "spiffe://llm-mesh/memory" in out and "MESH_TLS_CERT=" in out
    cert = load(tmp_path / "certs" / "memory.pem")
    assert ipaddress.ip_address("10.0.0.7") in sans(cert).get_values_for_type(x509.IPAddress)
    code, out, _ = run_cli("certs", "rotate", *where)
    assert code == 0 and "reissued memory" in out
    assert load(tmp_path / "certs" / "memory.pem").serial_number != cert.serial_number
    code, out, _ = run_cli("certs", "list", *where)
    assert code == 0 and out.startswith("memory: spiffe://llm-mesh/memory; expires")
    code, _, err = run_cli("certs", "issue", "Bad/Name", *where)
    assert code == 1 and "not a valid identity" in err
    code, _, err = run_cli("certs", "list", "--dir", str(tmp_path / "none"))
    assert code == 1 and "mesh certs init" in err


def test_make_run_says_what_is_encrypted(tmp_path: Path) -> None:
    from mesh.run import security_note

    default = security_note({"tls": {"MESH_TLS_CA": "ca.pem", "edge": False}}, tmp_path)
    assert "mutual TLS" in default and "PLAINTEXT on loopback" in default
    assert "services talk PLAINTEXT" in security_note({"tls": {}}, tmp_path)
    assert "the gateway serves TLS" in security_note({"tls": {"edge": True}}, tmp_path)


def test_renew_reissues_only_what_expires_soon_or_comes_from_another_ca(
    certs: CertDir, tmp_path: Path
) -> None:
    from mesh.certs import renew

    now = datetime.datetime.now(datetime.UTC)
    certs.issue("memory", dns=["memory.internal"], not_after=now + datetime.timedelta(days=10))
    certs.issue("agent")
    # A persister certificate from another CA, copied in by mistake.
    other = CertDir(tmp_path / "other")
    other.init()
    other.issue("persister")
    certs.cert("persister").write_bytes(other.cert("persister").read_bytes())
    certs.key("persister").write_bytes(other.key("persister").read_bytes())
    agent = certs.cert("agent").read_bytes()

    renewed = renew(certs, ["memory", "agent", "persister"], within=datetime.timedelta(days=30))
    assert renewed == ["memory", "persister"]
    assert certs.cert("agent").read_bytes() == agent
    memory = load(certs.cert("memory"))
    assert memory.not_valid_after_utc > now + datetime.timedelta(days=80)
    assert "memory.internal" in sans(memory).get_values_for_type(x509.DNSName)
    assert load(certs.cert("persister")).issuer == load(certs.ca_cert).subject
    assert renew(certs, ["memory", "agent", "persister"]) == []


def test_the_launcher_keeps_its_certificates_fresh(tmp_path: Path) -> None:
    from mesh.launcher import Mesh, MeshConfig

    config = MeshConfig(
        state_dir=tmp_path, model_path=tmp_path / "m.gguf", api_keys_file=tmp_path / "k.json"
    )
    mesh = Mesh(config)
    certs = mesh.ensure_certs()
    assert certs is not None
    assert certs.issued() == ["agent", "gateway", "memory", "operator", "persister"]
    assert mesh.renew_certs() == []
    now = datetime.datetime.now(datetime.UTC)
    certs.issue("memory", not_after=now + datetime.timedelta(days=3))
    assert mesh.renew_certs() == ["memory"]
    env = mesh.tls_env("memory")
    assert env["MESH_TLS_CERT"] == str(certs.cert("memory"))
    plain = Mesh(MeshConfig(**{**config.__dict__, "mesh_tls": False}))
    assert plain.ensure_certs() is None and plain.tls_env("memory") == {}


async def test_bind_itself_refuses_plaintext_off_loopback() -> None:
    from grpc import aio

    from mesh.server import PlaintextRefused, bind

    server = aio.server()
    with pytest.raises(PlaintextRefused, match="without TLS"):
        bind(server, "0.0.0.0", 0)
    assert bind(server, "127.0.0.1", 0) > 0
    await server.stop(None)
