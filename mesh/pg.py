"""PostgreSQL for the embedded profile: a real server from the pgserver wheel, no root needed.

pgserver runs the server binaries shipped in its wheel (with pgvector), over a Unix socket in
the data directory, so nothing listens on the network. When running as root it drops to its own
``pgserver`` user. Any other PostgreSQL works too: services only ever see a DSN.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Where the data lives when running as root and the requested directory is out of reach of
# pgserver's unprivileged user (e.g. under /root or pytest's 0700 temp dirs).
ROOT_FALLBACK_DIR = Path("/var/lib/llm-mesh/pg")


def _reachable_by_others(path: Path) -> bool:
    """Whether every existing ancestor of ``path`` can be traversed by another user."""
    for ancestor in [path, *path.parents]:
        if ancestor.exists() and not ancestor.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def server_data_dir(data_dir: Path) -> Path:
    """The directory pgserver actually uses for ``data_dir``.

    PostgreSQL never runs as root, so as root pgserver runs it as its own user, which must be able
    to reach the data directory. When it cannot, the data goes to a directory under
    ROOT_FALLBACK_DIR instead of loosening permissions on the caller's directories. The requested
    directory keeps a link file naming it, so the data lives exactly as long as the requested
    directory does: delete that and the next start gets a fresh database, as it would without
    the fallback.
    """
    data_dir = data_dir.absolute()
    if os.geteuid() != 0 or _reachable_by_others(data_dir.parent):
        return data_dir
    ROOT_FALLBACK_DIR.mkdir(parents=True, exist_ok=True)
    for directory in (ROOT_FALLBACK_DIR, *ROOT_FALLBACK_DIR.parents):
        if directory == Path("/"):
            break
        directory.chmod(directory.stat().st_mode | stat.S_IXOTH)
    link = data_dir / _FALLBACK_LINK
    if link.exists():
        return Path(link.read_text().strip())
    _remove_orphans()
    actual = ROOT_FALLBACK_DIR / uuid.uuid4().hex
    data_dir.mkdir(parents=True, exist_ok=True)
    link.write_text(str(actual) + "\n")
    (ROOT_FALLBACK_DIR / f"{actual.name}.owner").write_text(str(data_dir) + "\n")
    return actual


_FALLBACK_LINK = "pgserver-data-dir"


def _remove_orphans() -> None:
    """Delete fallback data whose requested directory is gone and whose server is stopped."""
    for owner_file in ROOT_FALLBACK_DIR.glob("*.owner"):
        data = ROOT_FALLBACK_DIR / owner_file.stem
        try:
            owner = Path(owner_file.read_text().strip())
        except FileNotFoundError:
            continue  # another process (a parallel test session) removed it a moment ago
        if (owner / _FALLBACK_LINK).exists() or (data / "postmaster.pid").exists():
            continue
        shutil.rmtree(data, ignore_errors=True)
        owner_file.unlink(missing_ok=True)


class EmbeddedPostgres:
    """Starts (or joins) the pgserver instance for ``data_dir``; ``stop`` shuts it down."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._server: Any = None

    def start(self) -> str:
        """Start the server and return its DSN (a Unix-socket URI)."""
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); the fallback is fine.
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        actual = server_data_dir(self._data_dir)
        if actual != self._data_dir.absolute():
            log.info(
                "PostgreSQL data for %s lives in %s (reachable as pgserver)", self._data_dir, actual
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver import get_server  # type: ignore[attr-defined]

            self._server = get_server(str(actual), cleanup_mode="stop")
        return str(self._server.get_uri())

    def stop(self) -> None:
        if self._server is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server.cleanup()
            self._server = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
