"""PostgreSQL for the embedded profile: a real server from the pgserver wheel, no root needed.

pgserver runs the server binaries shipped in its wheel (with pgvector), over a Unix socket in
the data directory, so nothing listens on the network. When running as root it drops to its own
``pgserver`` user. Any other PostgreSQL works too: services only ever see a DSN.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver import get_server  # type: ignore[attr-defined]

            self._server = get_server(str(self._data_dir), cleanup_mode="stop")
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
