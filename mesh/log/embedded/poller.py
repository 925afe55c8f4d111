"""The thread that notices commits made by other processes and reports the partitions that grew.

It checks ``PRAGMA data_version`` (a counter that changes whenever another connection commits)
as soon as inotify reports a write in the log's directory (``fs_watch``), with a slow re-check
in case a report is lost; after a lost report, or without inotify, it polls every
``interval_s``. It checks only while some task waits for records.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mesh.log.embedded.changes import Key
from mesh.log.embedded.fs_watch import DirectoryWatch
from mesh.log.embedded.store import connect

_log = logging.getLogger(__name__)

# With inotify, commits are checked when reported and also this often, to catch a lost report.
_WATCH_RECHECK_S = 0.1


class Poller:
    """Thread that notices commits made by other connections and reports grown partitions."""

    def __init__(
        self,
        path: Path,
        interval_s: float,
        busy_timeout_s: float,
        report: Callable[[list[Key]], None],
        *,
        use_inotify: bool = True,
    ) -> None:
        self._path = path
        self._interval_s = interval_s
        self._watch = DirectoryWatch.open(path.parent) if use_inotify else None
        self._busy_timeout_s = busy_timeout_s
        self._report = report
        # Set while some task waits for records: polling costs nothing when nobody listens.
        self.active = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mesh-log-poll", daemon=True)
        self._conn = connect(path, busy_timeout_s)
        self._data_version = -1
        self._heads = self._read_heads()

    def start(self) -> None:
        self._thread.start()

    def _read_heads(self) -> dict[Key, int]:
        self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        rows = self._conn.execute("SELECT topic, part, next_pos FROM heads").fetchall()
        return {(topic, part): next_pos for topic, part, next_pos in rows}

    @property
    def watching(self) -> bool:
        """Whether inotify drives the checks (else they run every ``interval_s``)."""
        return self._watch is not None

    def _poll(self) -> bool:
        """Report grown partitions; True if anything was committed since the last check."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return False
        heads = self._read_heads()
        grown = [key for key, head in heads.items() if self._heads.get(key) != head]
        self._heads = heads
        if grown:
            self._report(grown)
        return True

    def _wait(self) -> bool:
        """Wait for the next check; True if inotify reported a write."""
        if self._watch is None:
            time.sleep(self._interval_s)
            return False
        return self._watch.wait(_WATCH_RECHECK_S)

    def _missed(self) -> None:
        """A commit came without a report: this filesystem's inotify is not to be trusted."""
        if self._watch is None or self._watch.wait(0):
            return  # the report was merely racing the re-check
        _log.warning(
            "inotify missed a commit to %s; the embedded log polls every %.1f ms from now on",
            self._path,
            self._interval_s * 1000,
        )
        self._watch.close()
        self._watch = None

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.active.wait(timeout=0.5):
                    continue
                reported = self._wait()
                try:
                    if self._poll() and not reported:
                        self._missed()
                except sqlite3.Error as error:
                    # A locked or busy file is transient; tails also re-check on a timeout.
                    _log.warning("embedded log poll failed: %s", error)
                    time.sleep(0.1)
        finally:
            self._conn.close()
            if self._watch is not None:
                self._watch.close()

    def stop(self) -> None:
        self._stopping = True
        self.active.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
