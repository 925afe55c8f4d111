"""The Go and TypeScript clients over TLS: a gateway (the fake one, behind real gRPC TLS) with a
certificate from the project CA, and Envoy's TLS listener in front of it for gRPC-web. With the
CA they chat; without it (plaintext, or TLS without trusting the CA) they are refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from mesh.certs import CertDir
from mesh.infra.envoy import EnvoyProxy
from mesh.tls import edge_server_credentials
from tests.fixtures.envoy import FAKE_API_KEY, envoy_in_front_of, wait_upstreams_healthy
from tests.polyglot.fake_gateway import RunningFake
from tests.polyglot.helpers import json_events, run, scripted_text, tokens_of

pytestmark = [pytest.mark.infra, pytest.mark.timeout(600)]

MAX_TOKENS = 5


@dataclass
class TlsBackend:
    ca: Path
    grpc_addr: str
    envoy: EnvoyProxy


@pytest_asyncio.fixture(scope="module")
async def tls_backend(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsBackend]:
    certs = CertDir(Path(tmp_path_factory.mktemp("tls-clients")) / "certs")
    certs.init()
    certs.issue("gateway-edge")
    credentials = edge_server_credentials(certs.cert("gateway-edge"), certs.key("gateway-edge"))
    fake = RunningFake(FAKE_API_KEY, credentials=credentials, token_interval_s=0.02, queue_s=0.0)
    await fake.start()
    try:
        async with envoy_in_front_of(
            [fake.addr],
            tls_cert=certs.cert("gateway-edge"),
            tls_key=certs.key("gateway-edge"),
            upstream_ca=certs.ca_cert,
        ) as proxy:
            await wait_upstreams_healthy(proxy)
            yield TlsBackend(certs.ca_cert, fake.addr, proxy)
    finally:
        await fake.stop()


def assert_whole_turn(stdout_events: list[dict[str, object]]) -> None:
    tokens = tokens_of(stdout_events)
    assert "".join(text for _, text in tokens) == scripted_text(MAX_TOKENS)
    assert stdout_events[-1]["event"] == "finished", stdout_events


async def test_go_client_over_tls(tls_backend: TlsBackend, go_client: Path) -> None:
    common = [str(go_client), "-addr", tls_backend.grpc_addr, "-api-key", FAKE_API_KEY]
    turn = ["-json", "-max-tokens", str(MAX_TOKENS), "Hi over TLS"]
    result = await run([*common, "-ca", str(tls_backend.ca), *turn])
    assert result.returncode == 0, result.describe()
    assert_whole_turn(json_events(result))

    plaintext = await run([*common, *turn], timeout_s=60)
    assert plaintext.returncode == 1, plaintext.describe()
    untrusted = await run([*common, "-tls", *turn], timeout_s=60)  # the system's CAs only
    assert untrusted.returncode == 1, untrusted.describe()
    assert "certificate" in untrusted.stderr, untrusted.describe()
    missing = await run([*common, "-ca", "/nonexistent/ca.pem", *turn])
    assert missing.returncode == 2 and "CA file" in missing.stderr, missing.describe()


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
async def test_ts_client_over_tls(
    tls_backend: TlsBackend, ts_client: list[str], transport: str
) -> None:
    addr = f"https://{tls_backend.grpc_addr}" if transport == "grpc" else tls_backend.envoy.url
    assert addr.startswith("https://")
    common = [*ts_client, "--transport", transport, "--api-key", FAKE_API_KEY]
    turn = ["--json", "--max-tokens", str(MAX_TOKENS), "--timeout-s", "30", "Hi over TLS"]
    result = await run([*common, "--addr", addr, "--ca", str(tls_backend.ca), *turn])
    assert result.returncode == 0, result.describe()
    assert_whole_turn(json_events(result))

    untrusted = await run([*common, "--addr", addr, *turn], timeout_s=60)
    assert untrusted.returncode != 0, untrusted.describe()
    plaintext = addr.replace("https://", "http://")
    refused = await run([*common, "--addr", plaintext, *turn], timeout_s=60)
    assert refused.returncode != 0, refused.describe()
