"""TLS and credentials of the data stores the launcher starts (Kafka, Elasticsearch, PostgreSQL).

Each server gets a certificate from the project CA (``mesh certs``, ``mesh.certs``) under its own
name (``kafka``, ``elasticsearch``, ``postgres``), with the usual loopback SANs, so clients verify
it against the same ``ca.pem`` the services trust. Servers that run as another user (PostgreSQL,
Elasticsearch) or read certificates only from their own config directory get private copies
(``ServerTls.install``). Passwords are random, kept in a 0600 file next to the server's data so a
restart finds the same ones.
"""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from mesh.certs import CertDir, renew
from mesh.infra.process import RunAs

# A server restarted within this of its certificate's expiry gets a new one first.
RENEW_WITHIN = datetime.timedelta(days=30)


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key (PEM), and the CA bundle its clients verify it with."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def issue(cls, certs: CertDir, name: str) -> ServerTls:
        """The certificate of server ``name`` from the CA of ``certs``, issued if missing or
        close to expiry (kept otherwise, so a restarted server keeps its identity)."""
        renew(certs, [name], within=RENEW_WITHIN)
        return cls(certs.cert(name), certs.key(name), certs.ca_cert)

    def install(self, directory: Path, *, owner: RunAs | None = None) -> ServerTls:
        """Copies of the three files in ``directory`` (key 0600), owned by ``owner`` if given.

        PostgreSQL insists on a key only its own user can read, and Elasticsearch reads TLS
        files only from its config directory.
        """
        directory.mkdir(parents=True, exist_ok=True)
        installed = ServerTls(
            directory / "server.pem", directory / "server.key", directory / "ca.pem"
        )
        for source, target, mode in (
            (self.cert, installed.cert, 0o644),
            (self.key, installed.key, 0o600),
            (self.ca, installed.ca, 0o644),
        ):
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, tmp)
            os.chmod(tmp, mode)
            if owner is not None:
                os.chown(tmp, owner.uid, owner.gid)
            os.replace(tmp, target)
        if owner is not None:
            os.chown(directory, owner.uid, owner.gid)
        return installed


def stored_password(path: Path) -> str:
    """The password kept in ``path``, created (random, file mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


__all__ = ["RENEW_WITHIN", "ServerTls", "stored_password"]
