"""A real standalone PostgreSQL server from Debian's packages, reached over TCP like any cluster.

The embedded profile runs PostgreSQL from the pgserver wheel over a Unix socket. This is the
other path: the distribution's own server (``apt-get install postgresql``), listening on a
loopback TCP port with password authentication, so the services get a DSN of exactly the shape
they would get for a remote server. Nothing is shared with the system's own clusters: data,
socket and log live under the mesh state directory, and the port is picked at start.

    python -m mesh.infra.postgres install   # apt-get install postgresql (+ pgvector if packaged)
    python -m mesh.infra.postgres run       # start a server, print its DSN, stop on Ctrl-C

PostgreSQL refuses to run as root. Run as root (CI containers, this machine), the server runs as
the ``postgres`` system user the Debian package creates; the data and socket directories are
handed to it, so every parent of the state directory must be traversable by others.

Only for development, tests and single-machine use. Production points ``MESH_PG_DSN`` at a real
server.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from mesh.infra.process import (
    RunAs,
    ServerProcess,
    StartStop,
    free_port,
    run_command,
    serve_until_signalled,
    user_can,
)
from mesh.infra.process import ensure_user as _ensure_user
from mesh.infra.security import ServerTls
from mesh.settings import default_state_dir

log = logging.getLogger(__name__)

PG_ROOT = Path("/usr/lib/postgresql")
RUN_AS_USER = "postgres"
SUPERUSER = "postgres"
DATABASE = "postgres"
_APT_TIMEOUT_S = 900


class PostgresError(RuntimeError):
    """The server could not be installed, initialised or started; the message says why."""


def _major(bin_dir: Path) -> int:
    # /usr/lib/postgresql/<major>/bin
    name = bin_dir.parent.name
    return int(name) if name.isdigit() else -1


def find_bin_dir(root: Path = PG_ROOT) -> Path | None:
    """The newest installed server's ``bin`` directory (the one holding ``pg_ctl``), or None."""
    candidates = [path.parent for path in root.glob("*/bin/pg_ctl") if path.is_file()]
    # A client-only install has pg_ctl's directory without the server binary.
    candidates = [path for path in candidates if (path / "postgres").is_file()]
    return max(candidates, key=_major, default=None)


def _apt_candidate(package: str) -> str | None:
    """The version apt would install for ``package``, or None when no source has it."""
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        return None
    result = subprocess.run(
        [apt_cache, "policy", package], capture_output=True, text=True, check=False, timeout=60
    )
    match = re.search(r"Candidate:\s*(\S+)", result.stdout)
    if match is None or match.group(1) == "(none)":
        return None
    return match.group(1)


def _apt_install(packages: list[str]) -> None:
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise PostgresError(
            f"no apt-get here: install {' '.join(packages)} with the system's package manager"
        )
    if os.geteuid() != 0:
        raise PostgresError(f"installing needs root: sudo apt-get install -y {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = [apt_get, "install", "-y", "-q", "--no-install-recommends", *packages]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, check=False, timeout=_APT_TIMEOUT_S
    )
    if result.returncode != 0:
        # A fresh container has empty package lists; refresh them once and try again.
        subprocess.run(
            [apt_get, "update", "-q"],
            capture_output=True,
            env=env,
            check=False,
            timeout=_APT_TIMEOUT_S,
        )
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, check=False, timeout=_APT_TIMEOUT_S
        )
    if result.returncode != 0:
        raise PostgresError(
            f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


def pgvector_package(bin_dir: Path) -> str:
    return f"postgresql-{_major(bin_dir)}-pgvector"


def has_pgvector(bin_dir: Path) -> bool:
    """Whether the server of ``bin_dir`` has the ``vector`` extension installed."""
    return Path(f"/usr/share/postgresql/{_major(bin_dir)}/extension/vector.control").is_file()


def install_server(*, pgvector: bool = True) -> Path:
    """Install Debian's ``postgresql`` unless a server is there; return its ``bin`` directory.

    With ``pgvector`` the matching ``postgresql-<major>-pgvector`` is installed too when the
    configured apt sources have it (Debian 12's main archive does not; PGDG's does). The mesh
    needs it only for the memory service's PostgreSQL backend.
    """
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _apt_install(["postgresql"])
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresError(f"apt-get installed postgresql but no server is in {PG_ROOT}")
    if pgvector and not has_pgvector(bin_dir):
        package = pgvector_package(bin_dir)
        if _apt_candidate(package) is None:
            log.info("%s is not in the configured apt sources; going on without it", package)
        else:
            try:
                _apt_install([package])
            except PostgresError as error:
                # Optional: only the memory service's PostgreSQL backend needs it.
                log.warning("could not install %s: %s", package, error)
    return bin_dir


def ensure_user(name: str = RUN_AS_USER) -> RunAs:
    """The system user ``name`` (the Debian package creates ``postgres``), created if missing."""
    return _ensure_user(name, refusal="PostgreSQL refuses to run as root", error=PostgresError)


def make_dsn(
    password: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    database: str = DATABASE,
    ca: Path | None = None,
) -> str:
    """A TCP DSN (URI form) for the superuser; ``?`` always present so callers can swap the db.

    With ``ca`` the connection is TLS, and the server's certificate must chain to that bundle
    and name the host (``sslmode=verify-full``).
    """
    dsn = (
        f"postgresql://{SUPERUSER}:{quote(password, safe='')}@{host}:{port}/{database}"
        "?connect_timeout=10"
    )
    if ca is not None:
        dsn += f"&sslmode=verify-full&sslrootcert={quote(str(ca), safe='/')}"
    return dsn


# With TLS, TCP connections without it are refused outright rather than asked for a password.
_HBA_TLS = """# Written by mesh.infra.postgres: TLS and a password on TCP, a password on the socket.
local all all scram-sha-256
hostssl all all 127.0.0.1/32 scram-sha-256
hostssl all all ::1/128 scram-sha-256
hostnossl all all 0.0.0.0/0 reject
hostnossl all all ::/0 reject
"""


# The userinfo password of a URL DSN (``postgres://`` or ``postgresql://``): up to the last '@'
# before the host, since an unquoted password may itself hold '@'.
_URL_PASSWORD = re.compile(r"(?i)\b(postgres(?:ql)?://[^:/@\s]*:)[^\s/]*@")
# ``password=...`` in a keyword DSN or a URL's query, quoted ('it''s', 'a b') or bare.
_KEYWORD_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.|'')*'|[^\s&']+)")


def redact_dsn(dsn: str) -> str:
    """The DSN with every password replaced, for logs and status output.

    Covers URL DSNs (``postgres://u:secret@h/db``, ``postgresql://...``), keyword DSNs
    (``host=h password=secret``, quoted or not) and ``?password=`` in a URL's query.
    """
    redacted = _URL_PASSWORD.sub(lambda m: m.group(1) + "***@", dsn)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + "***", redacted)


def _connect_problem(dsn: str) -> str | None:
    """One real connection and query; None if they work, else why not."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        return str(error).strip() or type(error).__name__
    return None


class PostgresServer(StartStop):
    """One PostgreSQL server from the system's packages; ``start()`` returns its TCP DSN.

    ``state_dir`` is the mesh state directory: data, socket directory, password and log go to
    ``state_dir/infra/postgres`` unless ``root_dir`` says otherwise. Data survives restarts (the
    port is picked anew at each start, so the DSN changes; the password does not).

    Args:
        state_dir: the mesh state directory (``MESH_STATE_DIR``).
        root_dir: where this server keeps ``data/``, ``run/`` (socket), ``password`` and
            ``postgres.log``. Run as root, its parents must be traversable by ``postgres``.
        bin_dir: the server's ``bin`` directory; default the newest under /usr/lib/postgresql.
        install: install Debian's ``postgresql`` with apt-get if no server is found.
        settings: extra ``-c name=value`` server settings.
        tls: the server's certificate (from the project CA, ``mesh.infra.security``). Given,
            the server takes TCP connections over TLS only, and the DSN says
            ``sslmode=verify-full`` with the CA bundle as ``sslrootcert``.
        start_timeout_s: how long ``start`` waits for a real connection to succeed.
        stop_timeout_s: how long ``stop`` waits after a fast shutdown request.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        root_dir: Path | None = None,
        bin_dir: Path | None = None,
        install: bool = True,
        settings: dict[str, str] | None = None,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
        tls: ServerTls | None = None,
    ) -> None:
        self.state_dir = state_dir.absolute()
        self.tls = tls
        self.root_dir = (root_dir or self.state_dir / "infra" / "postgres").absolute()
        self.bin_dir = bin_dir
        self.install = install
        self.settings = dict(settings or {})
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.dsn: str | None = None
        self.port: int | None = None
        self.started_in_s: float | None = None  # how long the last start took, initdb included
        self._server: ServerProcess | None = None

    @property
    def data_dir(self) -> Path:
        return self.root_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root_dir / "run"

    @property
    def log_file(self) -> Path:
        return self.root_dir / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.root_dir / "password"

    def _binary(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    def _resolve_bin_dir(self) -> Path:
        if self.bin_dir is None:
            self.bin_dir = find_bin_dir()
        if self.bin_dir is None and self.install:
            self.bin_dir = install_server()
        if self.bin_dir is None or not (self.bin_dir / "postgres").is_file():
            raise PostgresError(
                f"no PostgreSQL server in {self.bin_dir or PG_ROOT}: "
                "apt-get install postgresql (or python -m mesh.infra.postgres install)"
            )
        return self.bin_dir

    def _password(self) -> str:
        # Only root (or the invoking user) reads it; the server keeps its own hash from initdb.
        if self.password_file.exists():
            return self.password_file.read_text().strip()
        password = secrets.token_urlsafe(24)
        self.password_file.touch(mode=0o600)
        self.password_file.write_text(password + "\n")
        return password

    def _prepare_dirs(self, run_as: RunAs | None) -> None:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.data_dir, self.socket_dir):
            path.mkdir(exist_ok=True)
            path.chmod(0o700)
            if run_as is not None:
                os.chown(path, run_as.uid, run_as.gid)
        if run_as is None:
            return
        if not user_can(run_as, write=[self.data_dir, self.socket_dir]):
            raise PostgresError(
                f"user {run_as.name!r} cannot write {self.data_dir}: every parent directory must "
                "be traversable by others (chmod o+x), e.g. keep the state dir outside /root"
            )

    def _initdb(self, run_as: RunAs | None, password: str) -> None:
        version_file = self.data_dir / "PG_VERSION"
        major = _major(self._resolve_bin_dir())
        if version_file.exists():
            existing = version_file.read_text().strip()
            if existing != str(major):
                raise PostgresError(
                    f"{self.data_dir} holds a PostgreSQL {existing} cluster but the server here "
                    f"is {major}: point the mesh at another state dir, or dump and remove it"
                )
            return
        # initdb reads the superuser's password from a file the server user can read.
        pwfile = self.socket_dir / "initdb-password"
        pwfile.touch(mode=0o600)
        pwfile.write_text(password + "\n")
        if run_as is not None:
            os.chown(pwfile, run_as.uid, run_as.gid)
        try:
            result = subprocess.run(
                [
                    self._binary("initdb"),
                    "--pgdata",
                    str(self.data_dir),
                    "--username",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    # Password auth everywhere: the DSN works like a remote server's would.
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=300,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                cwd=self.root_dir,
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise PostgresError(f"initdb failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def _tls_options(self, run_as: RunAs | None) -> dict[str, str]:
        """Server settings for TLS, with the files copied where the server user owns them
        (PostgreSQL refuses a key that others can read)."""
        assert self.tls is not None
        tls_dir = self.root_dir / "tls"
        installed = self.tls.install(tls_dir, owner=run_as)
        tls_dir.chmod(0o700)
        hba = tls_dir / "pg_hba.conf"
        hba.write_text(_HBA_TLS)
        if run_as is not None:
            os.chown(hba, run_as.uid, run_as.gid)
        return {
            "ssl": "on",
            "ssl_cert_file": str(installed.cert),
            "ssl_key_file": str(installed.key),
            "ssl_min_protocol_version": "TLSv1.2",
            "hba_file": str(hba),
        }

    def start(self) -> str:
        """Install if needed, initialise the cluster once, start it, wait for a real connection.

        Returns the TCP DSN (``postgresql://postgres:...@127.0.0.1:<port>/postgres?...``).
        """
        if self.dsn is not None:
            return self.dsn
        started = time.monotonic()
        self._resolve_bin_dir()
        run_as = ensure_user() if os.geteuid() == 0 else None
        self._prepare_dirs(run_as)
        password = self._password()
        self._initdb(run_as, password)
        port = free_port()
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            # Debian's build defaults to /var/run/postgresql, which belongs to the system's
            # own clusters.
            "unix_socket_directories": str(self.socket_dir),
            "cluster_name": "llm-mesh",
            **self.settings,
        }
        if self.tls is not None:
            options.update(self._tls_options(run_as))
        command = [self._binary("postgres"), "-D", str(self.data_dir)]
        for name, value in options.items():
            command += ["-c", f"{name}={value}"]
        self._server = ServerProcess(
            "PostgreSQL",
            self.log_file,
            error=PostgresError,
            stop_signal=signal.SIGINT,
            stop_timeout_s=self.stop_timeout_s,
        )
        self._server.spawn(
            command,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            cwd=self.root_dir,
            user=run_as,
        )
        dsn = make_dsn(password, port, ca=None if self.tls is None else self.tls.ca)
        self._server.wait_ready(
            lambda: _connect_problem(dsn), timeout_s=self.start_timeout_s, poll_s=0.1
        )
        self.dsn, self.port = dsn, port
        self.started_in_s = time.monotonic() - started
        return dsn

    def reload_tls(self) -> bool:
        """Copy the (reissued) certificate files again and have the running server load them
        (SIGHUP: new connections get the new certificate, open ones carry on). False when
        there is nothing to reload."""
        server = self._server
        if self.tls is None or server is None or server.process is None:
            return False
        run_as = ensure_user() if os.geteuid() == 0 else None
        self.tls.install(self.root_dir / "tls", owner=run_as)
        server.process.send_signal(signal.SIGHUP)
        return True

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients disconnected, a clean checkpoint); SIGKILL if stuck."""
        self._stop_process()
        self.dsn = None
        self.port = None

    def __repr__(self) -> str:
        dsn = redact_dsn(self.dsn) if self.dsn else None
        return f"PostgresServer({self.root_dir}, dsn={dsn})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.infra.postgres", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install postgresql (and pgvector when packaged)")
    sub.add_parser("run", help="start a server and keep it running until interrupted")
    args = parser.parse_args(argv)

    def install() -> None:
        bin_dir = install_server()
        vector = "with" if has_pgvector(bin_dir) else "without"
        print(f"PostgreSQL {_major(bin_dir)} in {bin_dir} ({vector} pgvector)")

    if args.command == "install":
        return run_command(install, PostgresError)
    server = PostgresServer(default_state_dir(os.environ))
    return run_command(lambda: serve_until_signalled(server, "MESH_PG_DSN"), PostgresError)


if __name__ == "__main__":
    sys.exit(main())
