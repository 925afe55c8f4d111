"""The audit trail of API key operations (mesh/audit.py), through the key functions `mesh keys`
uses."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from mesh.audit import trail_of
from mesh.auth import add_key_to_file, hash_key, revoke_key, rotate_key


def test_every_key_operation_is_appended_without_the_key(tmp_path: Path) -> None:
    keys = tmp_path / "api-keys.json"
    first = add_key_to_file(keys, "acme", expires_at=2_000_000_000)
    first_id = hash_key(first)[:12]
    second, info = rotate_key(keys, first_id, old_expires_at=2_000_000_100)
    revoke_key(keys, first_id)
    trail = trail_of(keys)
    events = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [e["event.action"] for e in events] == ["key-created", "key-rotated", "key-revoked"]
    assert [e["tenant"] for e in events] == ["acme"] * 3
    assert events[0]["key_id"] == first_id and events[0]["expires_at"].startswith("2033-")
    assert (events[1]["old_key_id"], events[1]["key_id"]) == (first_id, info.key_id)
    assert events[2]["key_id"] == first_id
    assert all(e["@timestamp"] and e["user.name"] and e["host.name"] for e in events)
    text = trail.read_text()
    assert first not in text and second not in text  # ids only, never a key
    assert stat.S_IMODE(trail.stat().st_mode) == 0o600
