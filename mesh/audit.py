"""The audit trail of API key operations: one JSON object per line, appended and fsynced.

It lives next to the keys file (``<keys file>.audit.jsonl``, mode 0600) and is only ever
appended to: who did what to which key, and when. Key ids only (a prefix of the key's hash),
never a key. Erasures have their own trail in the persister's PostgreSQL (``audit_events``).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def trail_of(keys_file: Path) -> Path:
    return keys_file.with_name(keys_file.name + ".audit.jsonl")


def _user() -> str:
    # A container may run as a uid with no name: the record still gets written.
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def record(keys_file: Path, action: str, **fields: Any) -> None:
    """Append one event (``event.action`` ``action``) to the trail of ``keys_file``."""
    event = {
        "@timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "event.action": action,
        "user.name": _user(),
        "host.name": socket.gethostname(),
        **fields,
    }
    line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
    path = trail_of(keys_file)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one write of one line: O_APPEND keeps concurrent writers whole
        os.fsync(fd)
    finally:
        os.close(fd)
