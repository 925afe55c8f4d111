"""The chat page over HTTPS: Envoy's TLS listener serves the page and gRPC-web on one origin,
and talks TLS to the (fake) gateway. Chromium trusts exactly the listener's key."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.browser.test_web_chat import browser_tools as browser_tools  # noqa: F401 - fixture
from tests.browser.test_web_chat import drive
from tests.fixtures.envoy import FAKE_API_KEY, ChatBackend
from tests.polyglot.helpers import scripted_text
from tests.polyglot.test_clients_tls import TlsBackend
from tests.polyglot.test_clients_tls import tls_backend as tls_backend  # noqa: F401 - fixture

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


def spki_hash(cert: Path) -> str:
    """Chromium's pin format: base64 of the SHA-256 of the certificate's public key info."""
    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


async def test_the_page_chats_over_https(
    tls_backend: TlsBackend,  # noqa: F811
    browser_tools: str,  # noqa: F811
) -> None:
    url = tls_backend.envoy.url
    assert url.startswith("https://")
    backend = ChatBackend(
        "fake-tls", tls_backend.grpc_addr, url, FAKE_API_KEY, scripted=True, token_interval_s=0.02
    )
    edge = tls_backend.ca.with_name("gateway-edge.pem")
    report = await drive(browser_tools, backend, "stream", maxTokens=12, spki=spki_hash(edge))
    final = report["final"]
    assert final["finish"] == "FINISH_REASON_LENGTH", final
    assert final["text"] == scripted_text(12)
