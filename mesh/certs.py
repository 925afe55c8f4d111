"""The project CA and the service certificates it issues (``mesh certs init | issue | rotate``).

A certificates directory (default ``$MESH_STATE_DIR/certs``) holds:

- ``ca.pem``: the trust bundle every service loads (``MESH_TLS_CA``): the current CA certificate
  first, then any earlier CA certificate that has not expired, so certificates issued before a
  CA rotation stay trusted until they are reissued;
- ``ca.key``: the CA's private key (mode 0600; only ``mesh certs`` reads it);
- ``<name>.pem`` / ``<name>.key``: the certificate and key of identity ``<name>`` (``gateway``,
  ``agent``, ``memory``, ``persister``, ``operator`` for people and probes), pointed at by
  ``MESH_TLS_CERT`` / ``MESH_TLS_KEY``.

Each service certificate carries the URI SAN ``spiffe://llm-mesh/<name>`` (the identity
``mesh.authz`` authorizes), the DNS SAN ``<name>`` (which clients verify the server against), and
``localhost`` / ``127.0.0.1`` / ``::1`` plus any ``--dns`` / ``--ip`` given. Keys are ECDSA P-256.
Every file is replaced atomically, so a running service re-reading them never sees half a file.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.tls import CertificateError, identity_of, spiffe_id, uri_sans, write_private

# The identities of the mesh; ``issue`` accepts other names too (a second operator, a tool).
SERVICES = ("gateway", "agent", "memory", "persister")
OPERATOR = "operator"
CA_DAYS = 3650
LEAF_DAYS = 90
# Certificates are valid from a little before now, for clocks of peers slightly behind.
_BACKDATE = datetime.timedelta(minutes=5)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertDir:
    """A certificates directory; see the module docstring for its files."""

    path: Path

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.path / "ca.key"

    def cert(self, name: str) -> Path:
        return self.path / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.path / f"{name}.key"

    def exists(self) -> bool:
        return self.ca_cert.is_file() and self.ca_key.is_file()

    def issued(self) -> list[str]:
        """Names of the certificates issued here (every ``<name>.pem`` but the CA's)."""
        return sorted(p.stem for p in self.path.glob("*.pem") if p.name != "ca.pem")

    def env(self, name: str) -> dict[str, str]:
        """``MESH_TLS_*`` for a process running as ``name``."""
        return {
            "MESH_TLS_CA": str(self.ca_cert),
            "MESH_TLS_CERT": str(self.cert(name)),
            "MESH_TLS_KEY": str(self.key(name)),
        }

    # -- the CA ------------------------------------------------------------------------------
    def load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise CertificateError(
                f"no CA in {self.path}: run `mesh certs init --dir {self.path}` first"
            )
        cert = x509.load_pem_x509_certificates(self.ca_cert.read_bytes())[0]
        key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{self.ca_key} is not an ECDSA key")
        if key.public_key() != cert.public_key():
            raise CertificateError(f"{self.ca_key} is not the key of {self.ca_cert}")
        return cert, key

    def init(self, *, days: int = CA_DAYS, force: bool = False) -> bool:
        """Create the CA; return False (and change nothing) when one exists, unless ``force``."""
        if self.exists() and not force:
            return False
        self._new_ca(days=days, keep_old=False)
        return True

    def _new_ca(self, *, days: int, keep_old: bool) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llm-mesh"),
                # Unique, so two CAs (before and after a rotation) never share an issuer name.
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"llm-mesh CA {_now():%Y-%m-%d} {secrets.token_hex(4)}"
                ),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        bundle = [cert]
        if keep_old and self.ca_cert.is_file():
            bundle += [
                old
                for old in x509.load_pem_x509_certificates(self.ca_cert.read_bytes())
                if old.not_valid_after_utc > now
            ]
        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o700)
        write_private(self.ca_key, _key_pem(key))
        write_private(self.ca_cert, b"".join(map(_cert_pem, bundle)), mode=0o644)
        return cert

    # -- service certificates ----------------------------------------------------------------
    def issue(
        self,
        name: str,
        *,
        days: int = LEAF_DAYS,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Path:
        """Issue (or reissue, with a new key) the certificate of identity ``name``.

        ``not_before`` / ``not_after`` override the validity (tests issue expired ones).
        Returns the certificate's path.
        """
        if not _NAME.match(name):
            raise CertificateError(
                f"{name!r} is not a valid identity: lower-case letters, digits, '.', '_', '-'"
            )
        ca_cert, ca_key = self.load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe_id(name)),
            x509.DNSName(name),
            x509.DNSName("localhost"),
            *(x509.DNSName(d) for d in dns if d not in (name, "localhost")),
        ]
        addresses = {"127.0.0.1", "::1", *ips}
        for address in sorted(addresses):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError:
                raise CertificateError(f"{address!r} is not an IP address") from None
        now = _now()
        start = not_before or now - _BACKDATE
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llm-mesh"),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(not_after or now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        # Key first: a reader that sees the new key with the old certificate finds they do not
        # match and keeps its old pair until the certificate lands too (mesh.tls).
        write_private(self.key(name), _key_pem(key))
        write_private(self.cert(name), _cert_pem(cert), mode=0o644)
        return self.cert(name)

    def _sans_of(self, name: str) -> tuple[list[str], list[str]]:
        """The extra DNS names and IPs of an issued certificate, to keep them on reissue."""
        cert = x509.load_pem_x509_certificate(self.cert(name).read_bytes())
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return [], []
        dns = [d for d in sans.get_values_for_type(x509.DNSName) if d not in (name, "localhost")]
        ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        return dns, [ip for ip in ips if ip not in ("127.0.0.1", "::1")]

    def rotate(
        self, names: Sequence[str] = (), *, days: int = LEAF_DAYS, ca: bool = False
    ) -> list[str]:
        """Reissue ``names`` (default: every issued certificate) with new keys.

        With ``ca``, first replace the CA itself: the bundle then holds the new CA and the old
        one, so peers that have not reloaded yet are still trusted; a later rotation drops CA
        certificates once they expire. Returns the names reissued.
        """
        if ca:
            self.load_ca()  # the old CA must be sound before it is replaced
            self._new_ca(days=CA_DAYS, keep_old=True)
        targets = list(names) or self.issued()
        for name in targets:
            if not self.cert(name).is_file():
                raise CertificateError(
                    f"no certificate for {name!r} in {self.path}: "
                    f"`mesh certs issue {name}` creates it"
                )
        for name in targets:
            dns, ips = self._sans_of(name)
            self.issue(name, days=days, dns=dns, ips=ips)
        return targets

    def describe(self, name: str) -> str:
        """One line about an issued certificate: identity, expiry, issuer."""
        cert = x509.load_pem_x509_certificate(self.cert(name).read_bytes())
        ids = [i for i in map(identity_of, uri_sans(cert)) if i]
        expires = cert.not_valid_after_utc
        state = "EXPIRED" if expires <= _now() else f"expires {expires:%Y-%m-%d %H:%M}Z"
        return f"{name}: {', '.join(map(spiffe_id, ids)) or 'no mesh identity'}; {state}"


def default_cert_dir(state_dir: Path) -> Path:
    return state_dir / "certs"


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (its signature, not just a matching issuer name)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def renew(
    certs: CertDir, names: Sequence[str], *, within: datetime.timedelta = datetime.timedelta(days=1)
) -> list[str]:
    """Issue the certificates of ``names`` that are missing, expire within ``within``, or come
    from another CA; keep the others. Returns the names issued."""
    ca_cert, _ = certs.load_ca()
    soon = _now() + within
    issued = []
    for name in names:
        path = certs.cert(name)
        if path.is_file() and certs.key(name).is_file():
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            if cert.not_valid_after_utc > soon and _issued_by(cert, ca_cert):
                continue
        if path.is_file():
            dns, ips = certs._sans_of(name)
            certs.issue(name, dns=dns, ips=ips)
        else:
            certs.issue(name)
        issued.append(name)
    return issued


def ensure_mesh_certs(cert_dir: Path, names: Sequence[str]) -> CertDir:
    """A CA and a certificate for each of ``names`` under ``cert_dir``, created where missing.

    Certificates that exist are kept unless they expire within a day (then reissued), so a
    restarted mesh keeps its identities.
    """
    certs = CertDir(cert_dir)
    certs.init()
    renew(certs, names)
    return certs


__all__ = [
    "CA_DAYS",
    "LEAF_DAYS",
    "OPERATOR",
    "SERVICES",
    "CertDir",
    "default_cert_dir",
    "ensure_mesh_certs",
    "renew",
]
