"""Mutual TLS between mesh services: the project CA, service certificates, and credentials that
follow the files as they are rotated.

Every service holds a certificate issued by the project CA whose URI SAN names it,
``spiffe://llm-mesh/<service>`` (its identity, what ``mesh.authz`` authorizes), and whose DNS SAN
is the bare service name, which clients check the server against (``grpc.ssl_target_name_override``)
whatever address they dialled. ``mesh certs`` (``mesh.certs``) writes the files; the settings
here (``MESH_TLS_CA``, ``MESH_TLS_CERT``, ``MESH_TLS_KEY``) point a service at them.

Rotation: a server's credentials are dynamic (``grpc.dynamic_ssl_server_credentials``). grpc asks
the fetcher for the current configuration before each handshake; the fetcher re-reads the files
when their size or modification time changed (at most once per ``reload_s``), so new connections
get the new certificate and trust bundle while open connections, and the streams on them, carry
on. Clients (``ReloadingChannel``) open a new channel for new calls when the files change and
close the old one only when they stop, so their open streams carry on too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.settings import TlsSettings, is_loopback

log = logging.getLogger(__name__)

TRUST_DOMAIN = "llm-mesh"
SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/"


def spiffe_id(name: str) -> str:
    """The URI SAN of identity ``name``: ``spiffe://llm-mesh/<name>``."""
    return SPIFFE_PREFIX + name


def identity_of(uri: str) -> str | None:
    """``spiffe://llm-mesh/memory`` -> ``memory``; anything else (another trust domain) -> None."""
    if not uri.startswith(SPIFFE_PREFIX):
        return None
    name = uri[len(SPIFFE_PREFIX) :]
    return name if name and "/" not in name else None


class CertificateError(ValueError):
    """A certificate, key or CA bundle cannot be used; the message names the file."""


@dataclass(frozen=True)
class Identity:
    """The PEM bytes of one service's TLS material, checked to belong together."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def name(self) -> str | None:
        """The identity in the certificate's URI SAN (``memory``), if it has one of ours."""
        return next(filter(None, map(identity_of, uri_sans(self.certificate))), None)


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CertificateError(f"cannot read the {what} {path}: {error.strerror}") from None


def load_identity(ca: Path, cert: Path, key: Path) -> Identity:
    """Read and check the three files: PEM that parses, a key that matches the certificate.

    Raises:
        CertificateError: naming the file and what is wrong with it.
    """
    ca_pem, cert_pem, key_pem = (
        _read(ca, "CA bundle"),
        _read(cert, "certificate"),
        _read(key, "key"),
    )
    try:
        if not x509.load_pem_x509_certificates(ca_pem):
            raise ValueError("no certificate in it")
    except ValueError as error:
        raise CertificateError(f"{ca} is not a PEM CA bundle: {error}") from None
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as error:
        raise CertificateError(f"{cert} is not a PEM certificate: {error}") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise CertificateError(f"{key} is not an unencrypted PEM private key: {error}") from None
    if private_key.public_key() != certificate.public_key():
        raise CertificateError(
            f"{key} is not the key of {cert} (half-written rotation? run `mesh certs rotate`)"
        )
    return Identity(ca_pem, cert_pem, key_pem)


def _stamp(paths: Sequence[Path]) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            stamps.append((-1, -1))
        else:
            stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class CertificateFiles:
    """The TLS files of one service, re-read when they change.

    ``changed()`` is cheap enough to call before every handshake: it looks at the files at most
    once per ``reload_s`` and reads them only when their size or modification time moved. A
    change that does not load (a key that does not match yet, halfway through a rotation) is
    logged and the last good identity stays.
    """

    def __init__(self, settings: TlsSettings, *, clock: Callable[[], float] = time.monotonic):
        if settings.ca is None or settings.cert is None or settings.key is None:
            raise ValueError("TLS is not configured (MESH_TLS_CA, MESH_TLS_CERT, MESH_TLS_KEY)")
        self._paths = (settings.ca, settings.cert, settings.key)
        self._reload_s = settings.reload_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self._checked = clock()
        self.current = load_identity(*self._paths)
        self.generation = 0

    def changed(self) -> Identity | None:
        """The new identity if the files changed since the last look, else None."""
        with self._lock:
            now = self._clock()
            if now - self._checked < self._reload_s:
                return None
            self._checked = now
            stamp = _stamp(self._paths)
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            try:
                identity = load_identity(*self._paths)
            except CertificateError as error:
                log.warning("TLS files changed but cannot be used yet, keeping the old: %s", error)
                return None
            if identity == self.current:
                return None
            self.current = identity
            self.generation += 1
            log.info("TLS files changed: new connections use the new certificate")
            return identity


def server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Mutual TLS for a server port: clients must present a certificate from the CA bundle.

    The certificate and bundle follow ``files`` (see the module docstring).
    """

    def config(identity: Identity) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem
        )

    def fetch() -> Any:
        # Runs in grpc's handshake path: never raise (grpc would fail the handshake).
        try:
            identity = files.changed()
        except Exception:
            log.exception("checking the TLS files failed; keeping the current certificate")
            return None
        return None if identity is None else config(identity)

    return grpc.dynamic_ssl_server_credentials(
        config(files.current), fetch, require_client_authentication=True
    )


def edge_server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """Server-only TLS for a public port (clients authenticate by API key, not certificate)."""
    cert_pem, key_pem = _read(cert, "certificate"), _read(key, "key")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise CertificateError(f"{cert} / {key}: {error}") from None
    if private_key.public_key() != certificate.public_key():
        raise CertificateError(f"{key} is not the key of {cert}")
    # The full file is the chain: a leaf followed by its intermediates.
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Client credentials presenting ``identity`` and trusting its CA bundle."""
    return grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "SPIFFE_PREFIX",
    "TRUST_DOMAIN",
    "CertificateError",
    "CertificateFiles",
    "Identity",
    "TlsSettings",
    "channel_credentials",
    "edge_server_credentials",
    "identity_of",
    "is_loopback",
    "load_identity",
    "server_credentials",
    "spiffe_id",
    "uri_sans",
    "write_private",
]
