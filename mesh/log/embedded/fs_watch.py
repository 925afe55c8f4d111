"""Wake-ups when another process writes a file in a directory: Linux inotify through ctypes.

The embedded log's processes share one SQLite file and have no other channel between them, so a
reader learns of a commit by looking. Looking every couple of milliseconds costs CPU on every
process and adds up to that much latency to every hop; inotify instead reports the write of the
WAL file the moment it happens. Where inotify is missing (not Linux, or a filesystem that does
not report other machines' writes) ``DirectoryWatch.open`` returns None and the caller polls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import sys
from pathlib import Path
from typing import Self

_log = logging.getLogger(__name__)

# From <sys/inotify.h>; the same on every Linux architecture.
_IN_MODIFY = 0x00000002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = 0o2000000
_READ_SIZE = 64 * 1024


class DirectoryWatch:
    """A file descriptor that becomes readable when any file in the directory is written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def open(cls, directory: Path) -> Self | None:
        """Watch ``directory``; None where inotify is unavailable (the caller then polls)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError) as error:
            _log.info("inotify unavailable (%s); the log polls instead", error)
            return None
        if fd < 0:
            _log.info("inotify_init1 failed: %s", os.strerror(ctypes.get_errno()))
            return None
        if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MODIFY) < 0:
            reason = os.strerror(ctypes.get_errno())
            _log.info("inotify_add_watch(%s) failed: %s", directory, reason)
            os.close(fd)
            return None
        return cls(fd)

    def wait(self, timeout_s: float) -> bool:
        """Block until a write is reported or ``timeout_s`` passes; True if one was reported.

        Every pending report is consumed: many writes since the last call count as one.
        """
        if not self._poll.poll(max(0, int(timeout_s * 1000))):
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        while True:
            try:
                if not os.read(self._fd, _READ_SIZE):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


__all__ = ["DirectoryWatch"]
